"""FixMatch's augmentations, batched with a draw per sample: the weak view's reflect-padded
translation and the strong view's RandAugment and Cutout (Sohn et al., 2020, Sec. 2.3 and Table 12).

Every operation takes float images (n, 3, H, W) in [0, 1] and per-sample parameters (n,), and
computes what torchvision's functional op computes on one image with that parameter (the tests
compare them op by op), so no loop runs over samples. :func:`rand_augment` draws, for each of
``ops`` slots, one operation per image among :data:`OPS` and its magnitude uniformly within
FixMatch's ranges (Table 12, "RandAugment with random magnitude"), for the global batch as every
augmentation here does (:mod:`kinship.sampling`), and applies each operation to the images that drew
it: a loop over the 14 operations, not over images. As in :mod:`kinship.augment.ops`, the draws
(``draw_<op>``) are apart from the pure operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinship.augment.mixing import box_masks
from kinship.augment.ops import _blend, constant, rgb_to_grayscale
from kinship.sampling import Shard, uniform


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_brightness``: blend with black."""
    return (x * _column(factor)).clamp(0, 1)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_saturation`` (PIL's ImageEnhance.Color): blend with the grey image."""
    return _blend(x, rgb_to_grayscale(x), factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_contrast``: blend with the mean grey level of each image."""
    return _blend(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_sharpness``: blend with PIL's smoothing filter (3 x 3, centre 5, others 1,
    over 13) applied to the interior, the border pixels kept."""
    kernel = constant((1 / 13, 1 / 13, 1 / 13, 1 / 13, 5 / 13, 1 / 13, 1 / 13, 1 / 13, 1 / 13), x.device, x.dtype)
    kernel = kernel.view(1, 1, 3, 3).expand(x.shape[1], 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=x.shape[1])
    return _blend(x, smooth, factor)


def autocontrast(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision ``autocontrast``: each channel stretched to [0, 1]; constant channels kept."""
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), 1.0 / (high - low).clamp_min(1e-12))
    return ((x - torch.where(flat, torch.zeros_like(low), low)) * scale).clamp(0, 1)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats as the 256 integer levels of 8-bit images."""
    return (x * 255).round_().clamp_(0, 255)


def equalize(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision ``equalize`` (PIL's ImageOps.equalize) of each channel, on the 8-bit levels:
    step = (pixels - the count of the top level) // 255, lut = (cdf + step // 2) // step shifted
    one level up; a channel with step 0 is kept."""
    n, c, h, w = x.shape
    levels = to_levels(x).long().view(n * c, h * w)
    ones = torch.ones_like(levels, dtype=torch.float32)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.float32).scatter_add_(1, levels, ones)
    top = levels.amax(dim=1, keepdim=True)
    step = torch.div(h * w - hist.gather(1, top), 255, rounding_mode="floor")  # (n c, 1)
    cdf = torch.cumsum(hist, dim=1)
    lut = torch.div(cdf + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, levels), levels.float())
    return (out / 255).view(n, c, h, w).to(x.dtype)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """torchvision ``posterize``: keep the ``bits`` (n,) high bits of each 8-bit level."""
    mask = (256 - 2 ** (8 - bits.long())).view(-1, 1, 1, 1)
    return (to_levels(x).long() & mask).to(x.dtype) / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """torchvision ``solarize``: invert the pixels at or above ``threshold`` (n,)."""
    return torch.where(x >= _column(threshold), 1 - x, x)


def affine(
    x: torch.Tensor,
    angle: torch.Tensor,
    translate: tuple[torch.Tensor, torch.Tensor],
    shear: tuple[torch.Tensor, torch.Tensor],
    corner: bool,
    fill: float,
) -> torch.Tensor:
    """torchvision ``affine`` (tensor path, nearest, unit scale) with per-sample ``angle`` and
    ``shear`` (degrees) and ``translate`` (pixels), about the image centre, or with ``corner`` about
    the top-left corner (as RandAugment's shears); pixels from outside the image are ``fill``.

    The inverse matrix is torchvision's ``_get_inverse_affine_matrix`` in float64, the sampling grid
    its ``_gen_affine_grid``, both batched."""
    n, _, h, w = x.shape
    rot, sx, sy = (torch.deg2rad(v.double()) for v in (angle, *shear))
    tx, ty = (t.double() for t in translate)
    cx, cy = (-w / 2, -h / 2) if corner else (0.0, 0.0)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m = torch.stack([d, -b, torch.zeros_like(d), -c, a, torch.zeros_like(d)], dim=1)  # inverse of [[a, b], [c, d]]
    m[:, 2] = m[:, 0] * (-cx - tx) + m[:, 1] * (-cy - ty) + cx
    m[:, 5] = m[:, 3] * (-cx - tx) + m[:, 4] * (-cy - ty) + cy
    theta = m.view(n, 2, 3).float().to(x.device)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=x.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=x.device)
    base = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w), torch.ones(h, w, device=x.device)], dim=-1)
    scaled = theta.transpose(1, 2) / constant((0.5 * w, 0.5 * h), x.device, torch.float32)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    inside = torch.ones(n, 1, h, w, device=x.device, dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, inside], dim=1), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    image, mask = out[:, :-1], out[:, -1:]
    return torch.where(mask < 0.5, torch.full_like(image, fill), image)


def _zeros(values: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(values)


FILL = 0.5  # FixMatch's grey (128) for the pixels a geometric operation brings in


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """torchvision ``rotate`` (counter-clockwise about the centre)."""
    z = _zeros(degrees)
    return affine(x, -degrees, (z, z), (z, z), False, FILL)


def shear_x(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RandAugment's ShearX by the factor ``s``: torchvision ``affine`` with shear atan(s) about the corner."""
    z = _zeros(s)
    return affine(x, z, (z, z), (torch.rad2deg(torch.atan(s)), z), True, FILL)


def shear_y(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    z = _zeros(s)
    return affine(x, z, (z, z), (z, torch.rad2deg(torch.atan(s))), True, FILL)


def translate_x(x: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """RandAugment's TranslateX by ``fraction`` of the width, in whole pixels (truncated, as torchvision's int())."""
    z = _zeros(fraction)
    return affine(x, z, (torch.trunc(fraction * x.shape[-1]), z), (z, z), False, FILL)


def translate_y(x: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    z = _zeros(fraction)
    return affine(x, z, (z, torch.trunc(fraction * x.shape[-2])), (z, z), False, FILL)


def identity(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return x


# FixMatch's RandAugment list and ranges (Table 12): (operation, low, high) of the uniform magnitude
OPS = (
    (autocontrast, 0.0, 0.0),
    (brightness, 0.05, 0.95),
    (color, 0.05, 0.95),
    (contrast, 0.05, 0.95),
    (equalize, 0.0, 0.0),
    (identity, 0.0, 0.0),
    (posterize, 4.0, 8.0),
    (rotate, -30.0, 30.0),
    (sharpness, 0.05, 0.95),
    (shear_x, -0.3, 0.3),
    (shear_y, -0.3, 0.3),
    (solarize, 0.0, 1.0),
    (translate_x, -0.3, 0.3),
    (translate_y, -0.3, 0.3),
)


def draw_rand_augment(shard: Shard, ops: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """RandAugment's draws for ``ops`` slots: per slot, an operation index per image (uniform over
    :data:`OPS`) and a uniform number for its magnitude; (ops, n) each."""
    n = shard.total
    choice, unit = [], []
    for _ in range(ops):
        choice.append(shard.rows(torch.randint(len(OPS), (n,), generator=generator, device=device)))
        unit.append(shard.rows(torch.rand(n, generator=generator, device=device)))
    return {"choice": torch.stack(choice), "unit": torch.stack(unit)}


def rand_augment(x: torch.Tensor, choice: torch.Tensor, unit: torch.Tensor, by_mask: bool | None = None) -> torch.Tensor:
    """Per slot (a row of ``choice`` and ``unit``), operation ``OPS[choice]`` of each image with its
    magnitude uniform in the operation's range (posterize: a whole number of bits, 4 to 8).
    ``by_mask`` (default: on a GPU, and in a compiled graph) every operation runs on every image and
    a mask keeps each image's own, so that the host never waits for the device; else each operation
    runs on its images alone, picked by index (6x less work: the CPU's choice). Both give the same
    images."""
    by_mask = (x.is_cuda or torch.compiler.is_compiling()) if by_mask is None else by_mask
    for slot_choice, slot_unit in zip(choice.unbind(0), unit.unbind(0)):
        out = x if by_mask else x.clone()
        for k, (op, low, high) in enumerate(OPS):
            if op is identity:
                continue
            if by_mask:
                out = torch.where(_column(slot_choice == k), op(x, magnitude(op, low, high, slot_unit)), out)
                continue
            rows = (slot_choice == k).nonzero().squeeze(1)
            if rows.numel():
                out[rows] = op(x[rows], magnitude(op, low, high, slot_unit[rows]))
        x = out
    return x


def magnitude(op, low: float, high: float, unit: torch.Tensor) -> torch.Tensor:
    """Uniform in [low, high] from uniform ``unit`` draws; posterize's bits a whole number."""
    if op is posterize:
        return torch.floor(low + (high - low + 1) * unit).clamp(max=high)
    return low + (high - low) * unit


def draw_cutout(
    shard: Shard, height: int, width: int, generator: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    """Cutout's centre: a uniform pixel (row, column) per image."""
    return {
        "cy": shard.rows(torch.floor(uniform(shard.total, 0, height, generator, device)).long()),
        "cx": shard.rows(torch.floor(uniform(shard.total, 0, width, generator, device)).long()),
    }


def cutout(x: torch.Tensor, fraction: float, cy: torch.Tensor, cx: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """FixMatch's Cutout: a square of side ``fraction`` x the width (16 px at 32) centred on pixel
    (cy, cx), clipped to the image, painted grey."""
    n, _, h, w = x.shape
    side = int(fraction * w)
    boxes = torch.stack(
        [
            (cy - side // 2).clamp(0, h),
            (cy + side - side // 2).clamp(0, h),
            (cx - side // 2).clamp(0, w),
            (cx + side - side // 2).clamp(0, w),
        ],
        dim=1,
    )
    return torch.where(box_masks(boxes, h, w), torch.full_like(x, fill), x)


def draw_pad_crop(shard: Shard, pad: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The padded crop's offsets: top and left, each uniform in 0..2 pad."""
    return {
        "top": shard.rows(torch.randint(2 * pad + 1, (shard.total,), generator=generator, device=device)),
        "left": shard.rows(torch.randint(2 * pad + 1, (shard.total,), generator=generator, device=device)),
    }


def pad_crop(x: torch.Tensor, pad: int, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """FixMatch's weak view: mirror where ``flip``, then torchvision's RandomCrop(padding=pad,
    padding_mode="reflect") at the image's own size: a translation by ``top``, ``left`` - ``pad``
    pixels, the border filled by reflection."""
    n, c, h, w = x.shape
    x = torch.where(_column(flip), x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = (top.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    return padded[
        torch.arange(n, device=x.device).view(n, 1, 1, 1), torch.arange(c, device=x.device).view(1, c, 1, 1), rows, cols
    ]
