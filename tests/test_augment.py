"""Augmentations: parameter statistics, per-sample independence, agreement with torchvision."""

import math

import torch
import torchvision.transforms.v2.functional as TF

from kinship.augment import ops
from kinship.augment.views import make_views
from kinship.config import AugmentConfig
from kinship.data import Batch
from kinship.sampling import Shard


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


CPU = torch.device("cpu")


def crop_boxes(n, height, width, scale, ratio, generator, aspect=None):
    return ops.crop_boxes(
        height, width, ratio, **ops.draw_crop_boxes(Shard.whole(n), scale, ratio, generator, CPU), aspect=aspect
    )


def as_batch(images: torch.Tensor, aspect: torch.Tensor | None = None) -> Batch:
    index = torch.arange(len(images))
    return Batch(index, images, index, aspect=aspect)


def test_crop_boxes_respect_scale_ratio_and_image():
    n, h, w = 20000, 32, 32
    boxes = crop_boxes(n, h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen())
    x0, y0, bw, bh = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + bw <= w).all() and (y0 + bh <= h).all()
    area = bw * bh / (h * w)
    # rounding of w and h to pixels moves the area fraction by at most ~2/32 per side
    assert area.min() >= 0.08 - 0.05 and area.max() <= 1.0
    aspect = bw / bh
    assert aspect.min() >= 0.75 * (1 - 0.15) and aspect.max() <= 4 / 3 * (1 + 0.15)
    # mean area fraction of torchvision's sampler on 32 px is close to the U(0.08, 1) mean 0.54
    # (truncated by the fit test); a one-draw-per-batch bug would give a wildly varying mean
    assert 0.40 < area.mean().item() < 0.60


def test_crop_positions_independent_per_sample():
    boxes = crop_boxes(4000, 32, 32, (0.08, 0.3), (1.0, 1.0), gen(1))
    x0 = boxes[:, 0]
    assert len(torch.unique(x0)) > 10
    corr = torch.corrcoef(torch.stack([x0[:-1], x0[1:]]))[0, 1]
    assert abs(corr) < 0.05


def test_flip_rate_and_full_crop_is_identity_or_mirror():
    images = torch.rand(4000, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(4000, 1)
    flip = torch.rand(4000, generator=gen(2)) < 0.5
    out = ops.crop_resize_flip(images, boxes, 8, flip)
    assert torch.allclose(out[~flip], images[~flip], atol=1e-5)
    assert torch.allclose(out[flip], images[flip].flip(-1), atol=1e-5)
    recipe = AugmentConfig(
        crop_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0, grayscale_p=0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    (views,) = make_views(as_batch((images * 255).round().to(torch.uint8)), [recipe], gen(3))
    original = (images * 255).round() / 255
    same = (views - original).abs().amax(dim=(1, 2, 3)) < 1e-4
    mirrored = (views - original.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert (same | mirrored).all()  # a full-image crop at the same size is exact or mirrored
    rate = mirrored.float().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / 4000)


def test_grayscale_and_solarize_rates():
    images = torch.rand(8000, 3, 4, 4)
    gray = ops.random_grayscale(images, **ops.draw_coin(Shard.whole(len(images)), 0.2, gen(4), CPU))
    is_gray = (gray[:, 0] == gray[:, 1]).all(dim=(1, 2)) & (gray[:, 1] == gray[:, 2]).all(dim=(1, 2))
    assert abs(is_gray.float().mean().item() - 0.2) < 0.02
    sol = ops.random_solarize(images, **ops.draw_coin(Shard.whole(len(images)), 0.3, gen(5), CPU))
    changed = (sol != images).any(dim=(1, 2, 3))
    assert abs(changed.float().mean().item() - 0.3) < 0.02
    assert torch.equal(sol[changed], torch.where(images[changed] >= 0.5, 1 - images[changed], images[changed]))


def test_color_jitter_matches_torchvision_per_sample():
    images = torch.rand(6, 3, 8, 8)
    g = gen(6)
    out = ops.color_jitter(images, **ops.draw_color_jitter(Shard.whole(len(images)), 1.0, 0.4, 0.4, 0.4, 0.1, g, CPU))
    # replay the same draws: apply-coin, then brightness, contrast, saturation, hue factors
    g = gen(6)
    torch.rand(6, generator=g)
    b = 0.6 + 0.8 * torch.rand(6, generator=g)
    c = 0.6 + 0.8 * torch.rand(6, generator=g)
    s = 0.6 + 0.8 * torch.rand(6, generator=g)
    h = -0.1 + 0.2 * torch.rand(6, generator=g)
    for i in range(6):
        ref = TF.adjust_brightness(images[i], b[i].item())
        ref = TF.adjust_contrast(ref, c[i].item())
        ref = TF.adjust_saturation(ref, s[i].item())
        ref = TF.adjust_hue(ref, h[i].item())
        assert torch.allclose(out[i], ref, atol=1e-4)  # fp32 rounding of the blend order


def test_jitter_with_p_zero_is_identity_and_factors_vary_per_sample():
    images = torch.rand(64, 3, 8, 8)
    assert torch.equal(
        ops.color_jitter(images, **ops.draw_color_jitter(Shard.whole(len(images)), 0.0, 0.4, 0.4, 0.4, 0.1, gen(), CPU)), images
    )
    bright = ops.color_jitter(
        torch.full((64, 3, 4, 4), 0.5), **ops.draw_color_jitter(Shard.whole(64), 1.0, 0.4, 0, 0, 0, gen(), CPU)
    )
    assert len(torch.unique(bright[:, 0, 0, 0])) == 64


def test_blur_keeps_constants_and_smooths():
    const = torch.full((10, 3, 16, 16), 0.3)
    assert torch.allclose(
        ops.gaussian_blur(const, **ops.draw_gaussian_blur(Shard.whole(len(const)), 1.0, (0.1, 2.0), gen(), CPU)), const, atol=1e-6
    )
    noise = torch.rand(10, 3, 16, 16)
    blurred = ops.gaussian_blur(noise, **ops.draw_gaussian_blur(Shard.whole(len(noise)), 1.0, (1.5, 2.0), gen(), CPU))
    assert blurred.std() < 0.6 * noise.std()


def test_views_are_seeded_and_shaped():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    recipes = [AugmentConfig(crop_size=24, blur_p=0.5, solarize_p=0.2), AugmentConfig(crop_size=16)]
    a = make_views(as_batch(images), recipes, gen(7))
    b = make_views(as_batch(images), recipes, gen(7))
    assert [v.shape for v in a] == [(32, 3, 24, 24), (32, 3, 16, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = make_views(as_batch(images), recipes, gen(8))
    assert not torch.equal(a[0], c[0])


def test_crops_of_images_stored_as_squares_have_the_original_geometry_and_reach_every_border():
    """An ImageFolder image is stored whole, squeezed to a square, with its original width / height:
    crops are then sampled in the original's geometry (area and aspect as torchvision on the file)."""
    n, size = 20000, 64
    aspect = torch.full((n,), 2.0)  # originals twice as wide as high
    boxes = crop_boxes(n, size, size, (0.08, 1.0), (3 / 4, 4 / 3), gen(4), aspect)
    x0, y0, w, h = boxes.unbind(1)
    original_aspect = (w / size * 2.0) / (h / size)
    assert original_aspect.min() >= 0.75 * 0.9 and original_aspect.max() <= 4 / 3 * 1.1
    assert (w * h / size**2).min() >= 0.08 - 0.03
    assert x0.min() == 0 and y0.min() == 0 and (x0 + w).max() == size and (y0 + h).max() == size
    # the ratio range cannot hold a 2:1 original whole: the fallback is the central 4:3 crop
    full = crop_boxes(4, size, size, (1.0, 1.0), (3 / 4, 4 / 3), gen(5), aspect[:4])
    assert torch.equal(full[0], torch.tensor([10.0, 0.0, 43.0, 64.0]))  # 64 * (4/3) / 2 = 42.7 px wide, centred


def test_evaluation_view_is_resize_then_center_crop_of_the_original():
    """Resize(256) + CenterCrop(224) of a 512 x 256 original stored as a 64 px square: the crop keeps
    224/512 of the width and 224/256 of the height, centred."""
    boxes = ops.center_crop_boxes(2, 64, 64, 224, 256, torch.tensor([2.0, 0.5]), torch.device("cpu"))
    assert torch.allclose(boxes[0], torch.tensor([(64 - 28) / 2, (64 - 56) / 2, 28.0, 56.0]))
    assert torch.allclose(boxes[1], torch.tensor([(64 - 56) / 2, (64 - 28) / 2, 56.0, 28.0]))
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    images[..., 30:34, 30:34] = 255
    recipe = AugmentConfig(crop_size=224, eval_resize=256, mean=(0, 0, 0), std=(1, 1, 1))
    from kinship.augment.views import center_view

    view = center_view(images, recipe, torch.tensor([1.0]))
    assert view.shape == (1, 3, 224, 224) and view[0, 0, 112, 112] > 0.9 and view[0, 0, 0, 0] < 0.1
