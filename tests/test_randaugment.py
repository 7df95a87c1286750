"""FixMatch's augmentations: each batched op against torchvision's functional op on the same parameter."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from kinship.augment import randaugment as ra
from kinship.augment.views import augment
from kinship.config import AugmentConfig
from kinship.dispatch import OpLog
from kinship.sampling import Shard

CPU = torch.device("cpu")


def images(n: int = 6, size: int = 20, seed: int = 0) -> torch.Tensor:
    """8-bit images as floats, with structure (a smooth gradient plus noise) and one flat image."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size) * torch.linspace(0.2, 1, size).view(1, 1, size, 1)
    x = (0.6 * ramp + 0.4 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    x[-1] = 0.3  # a flat image: autocontrast and equalize keep it
    return (x * 255).round() / 255


def reference(op, x: torch.Tensor, values: list) -> torch.Tensor:
    return torch.stack([op(img, v) for img, v in zip(x, values)])


COLOUR = [
    (ra.brightness, TF.adjust_brightness),
    (ra.color, TF.adjust_saturation),
    (ra.contrast, TF.adjust_contrast),
    (ra.sharpness, TF.adjust_sharpness),
]


@pytest.mark.parametrize("ours, theirs", COLOUR, ids=[o.__name__ for o, _ in COLOUR])
def test_colour_ops_match_torchvision(ours, theirs) -> None:
    """To 1e-6, or 2e-4 where a grey image enters: kinship's luma weighs red 0.299 (ITU-R 601-2),
    torchvision's 0.2989."""
    x = images()
    factor = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.95, 0.6])
    grey = ours in (ra.color, ra.contrast)
    torch.testing.assert_close(ours(x, factor), reference(theirs, x, factor.tolist()), atol=2e-4 if grey else 1e-6, rtol=0)


def test_level_ops_match_torchvision_on_8_bit_images() -> None:
    x = images()
    as_bytes = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(ra.autocontrast(x), torch.stack([TF.autocontrast(i) for i in x]), atol=1e-6, rtol=0)
    assert torch.equal(ra.to_levels(ra.equalize(x)).to(torch.uint8), torch.stack([TF.equalize(i) for i in as_bytes]))
    bits = torch.tensor([4, 5, 6, 7, 8, 4])
    assert torch.equal(
        ra.to_levels(ra.posterize(x, bits)).to(torch.uint8),
        torch.stack([TF.posterize(i, int(b)) for i, b in zip(as_bytes, bits)]),
    )
    threshold = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0, 0.3])
    torch.testing.assert_close(ra.solarize(x, threshold), reference(TF.solarize, x, threshold.tolist()), atol=0, rtol=0)


GEOMETRIC = {
    "rotate": (ra.rotate, lambda img, v: TF.rotate(img, v, fill=[ra.FILL] * 3)),
    "shear_x": (
        ra.shear_x,
        lambda img, v: TF.affine(img, 0.0, [0, 0], 1.0, [math.degrees(math.atan(v)), 0.0], fill=[ra.FILL] * 3, center=[0, 0]),
    ),
    "shear_y": (
        ra.shear_y,
        lambda img, v: TF.affine(img, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(v))], fill=[ra.FILL] * 3, center=[0, 0]),
    ),
    "translate_x": (
        ra.translate_x,
        lambda img, v: TF.affine(img, 0.0, [int(v * img.shape[-1]), 0], 1.0, [0.0, 0.0], fill=[ra.FILL] * 3),
    ),
    "translate_y": (
        ra.translate_y,
        lambda img, v: TF.affine(img, 0.0, [0, int(v * img.shape[-2])], 1.0, [0.0, 0.0], fill=[ra.FILL] * 3),
    ),
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_ops_match_torchvision(name: str) -> None:
    """Nearest-neighbour sampling on the same grid: equal, but for pixels whose source lies within
    float32 rounding of a pixel border (at most 1% of them)."""
    ours, theirs = GEOMETRIC[name]
    x = images(n=8, size=24)
    magnitude = {"rotate": [-30.0, -17.5, -3.0, 0.0, 5.0, 12.0, 29.0, 30.0]}.get(
        name, [-0.3, -0.2, -0.05, 0.0, 0.07, 0.15, 0.25, 0.3]
    )
    got = ours(x, torch.tensor(magnitude))
    want = reference(theirs, x, magnitude)
    differ = (got - want).abs().amax(dim=1) > 1e-6
    assert differ.float().mean() <= 0.01, f"{name}: {differ.sum()} of {differ.numel()} pixels differ"


def test_rand_augment_draws_per_sample_and_does_not_depend_on_the_split() -> None:
    x = images(n=8, size=16)
    whole = ra.rand_augment(x, **ra.draw_rand_augment(Shard.whole(8), 2, torch.Generator().manual_seed(3), CPU))
    halves = [
        ra.rand_augment(
            x[i * 4 : (i + 1) * 4], **ra.draw_rand_augment(Shard(4 * i, 4, 8), 2, torch.Generator().manual_seed(3), CPU)
        )
        for i in range(2)
    ]
    torch.testing.assert_close(torch.cat(halves), whole)
    assert whole.min() >= 0 and whole.max() <= 1
    assert not torch.equal(whole, x)


def test_rand_augment_by_mask_gives_the_same_images_and_never_waits_for_the_device() -> None:
    """The GPU's path (every operation on every image, a mask picks) equals the CPU's (each
    operation on its own images, picked by index), and dispatches nothing that reads back."""
    x = images(n=64, size=16)
    draws = ra.draw_rand_augment(Shard.whole(64), 2, torch.Generator().manual_seed(1), CPU)
    by_index = ra.rand_augment(x, **draws, by_mask=False)
    with OpLog() as log:
        by_mask = ra.rand_augment(x, **draws, by_mask=True)
    assert torch.equal(by_mask, by_index)
    assert not log.syncs


def test_cutout_paints_one_clipped_square_grey() -> None:
    x = torch.zeros(64, 3, 32, 32)
    out = ra.cutout(x, 0.5, **ra.draw_cutout(Shard.whole(64), 32, 32, torch.Generator().manual_seed(0), CPU))
    painted = (out[:, 0] == ra.FILL).sum(dim=(1, 2))
    assert painted.max() == 16 * 16 and painted.min() >= 8 * 8  # clipped at a corner at worst
    rows = (out[:, 0] == ra.FILL).any(dim=2).sum(1)
    assert (rows <= 16).all() and torch.equal(out[:, 0], out[:, 2])


def test_pad_crop_is_a_translation_with_reflected_border() -> None:
    x = images(n=32, size=16)
    flip = torch.zeros(32, dtype=torch.bool)
    out = ra.pad_crop(x, 4, flip, **ra.draw_pad_crop(Shard.whole(32), 4, torch.Generator().manual_seed(0), CPU))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(32):  # every output is one of the 81 windows of the padded image
        windows = padded[i].unfold(1, 16, 1).unfold(2, 16, 1)  # (3, 9, 9, 16, 16)
        assert ((windows - out[i].view(3, 1, 1, 16, 16)).abs().amax(dim=(0, 3, 4)) == 0).any()
    centred = ra.pad_crop(
        x, 0, torch.ones(32, dtype=torch.bool), **ra.draw_pad_crop(Shard.whole(32), 0, torch.Generator().manual_seed(0), CPU)
    )
    assert torch.equal(centred, x.flip(-1))


def test_weak_and_strong_recipes_produce_normalised_views() -> None:
    x = images(n=8, size=32)
    weak = AugmentConfig(crop_mode="pad", jitter_p=0.0, grayscale_p=0.0)
    strong = AugmentConfig(crop_mode="pad", jitter_p=0.0, grayscale_p=0.0, randaugment=2, cutout=0.5)
    for recipe in (weak, strong):
        v = augment(x, recipe, torch.Generator().manual_seed(0))
        assert v.shape == (8, 3, 32, 32) and torch.isfinite(v).all()
