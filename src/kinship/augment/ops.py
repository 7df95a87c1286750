"""Batched image augmentations with an independent random draw per sample.

Each random op comes in two parts: ``draw_<op>`` makes its per-sample random numbers from a
``torch.Generator``, for the global batch, and keeps the batch's :class:`~kinship.sampling.Shard`
rows (see :mod:`kinship.sampling`); the op itself is a pure function of float images (B, 3, H, W)
in [0, 1] and those numbers, so that a view's draws can all be made first and the transforms
compiled as one graph (a generator cannot enter one). They follow torchvision's definitions (same
parameter ranges and formulas), so a recipe from a paper carries over, but with parameters per
sample in one batched call instead of once per PIL image.

An op applied with probability p transforms every image and keeps the result where the image's
coin came up (``torch.where``): selecting the images first would give a shape that depends on the
draws, which the host must read from the device before it can go on.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from kinship.sampling import Shard, coin, uniform


def constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of a few Python numbers, copied to the device once (not at every step); inside a
    compiled graph, a constant of the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device, dtype=dtype)
    return _cached_constant(values, device, dtype)


@functools.lru_cache(maxsize=None)
def _cached_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=dtype)


def draw_crop_boxes(
    shard: Shard,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
    attempts: int = 10,
) -> dict[str, torch.Tensor]:
    """RandomResizedCrop's draws: ``attempts`` area fractions ~ U(scale) and aspects (log-uniform in
    ``ratio``) per sample, then the position of the crop (left, top ~ U(0, 1))."""
    n = shard.total
    return {
        "area_fraction": shard.rows(uniform(n * attempts, *scale, generator, device).view(n, attempts)),
        "crop_aspect": torch.exp(
            shard.rows(uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, device).view(n, attempts))
        ),
        "left": shard.rows(torch.rand(n, generator=generator, device=device)),
        "top": shard.rows(torch.rand(n, generator=generator, device=device)),
    }


def crop_boxes(
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    ratio: tuple[float, float],
    area_fraction: torch.Tensor,
    crop_aspect: torch.Tensor,
    left: torch.Tensor,
    top: torch.Tensor,
    aspect: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampler, vectorised: (n, 4) boxes (x0, y0, w, h) in stored
    pixels from the draws of :func:`draw_crop_boxes`.

    Each sample keeps its first attempt that fits; a sample with none falls back to the central
    crop with the aspect ratio clamped to ``ratio``, as torchvision does. Area and aspect are those
    of the *original* image: ``aspect`` (n,) holds each image's original width / height where the
    store resized it to (height, width) regardless of its shape (ImageFolder data), so that crops
    cover the whole image with the geometry torchvision would give on the file; None: the stored
    shape is the original one. ``height`` and ``width`` may be (n,) tensors, one size per image (the
    files of a streamed batch, cropped at decode time).
    """
    n = len(left)
    height, width = (
        size.float().view(n, 1) if isinstance(size, torch.Tensor) else torch.full((n, 1), float(size), device=left.device)
        for size in (height, width)
    )
    # the original's width / height; lengths in units of the stored height, the original being
    # (original * height) x height
    original = width / height if aspect is None else aspect.to(left.device).float().view(-1, 1)
    target_area = height * height * original * area_fraction
    w = torch.round(torch.sqrt(target_area * crop_aspect) * (width / height) / original)  # back to stored pixels
    h = torch.round(torch.sqrt(target_area / crop_aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # first fitting attempt (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    any_fit = fits.any(dim=1)

    # Fallback: central crop of the whole image, aspect clamped into the ratio range.
    original, height, width = original.squeeze(1), height.squeeze(1), width.squeeze(1)
    fw = torch.where(original > ratio[1], torch.round(width * ratio[1] / original), width)
    fh = torch.where(original < ratio[0], torch.round(height * original / ratio[0]), height)
    w = torch.where(any_fit, w, fw)
    h = torch.where(any_fit, h, fh)
    # torchvision: top = randint(0, H - h + 1), left = randint(0, W - w + 1)
    x0 = torch.where(any_fit, torch.floor(left * (width - w + 1)), torch.div(width - fw, 2, rounding_mode="floor"))
    y0 = torch.where(any_fit, torch.floor(top * (height - h + 1)), torch.div(height - fh, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, w, h], dim=1)


def center_crop_boxes(
    n: int, height: int, width: int, crop: int, resize: int, aspect: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(n, 4) boxes of torchvision's Resize(resize) + CenterCrop(crop) (ImageNet evaluation: 256, 224)
    in stored pixels: the shorter original side is ``resize`` px, the central ``crop`` px square kept."""
    original = torch.full((n,), width / height, device=device) if aspect is None else aspect.to(device).float()
    short = crop / resize  # the crop's share of the shorter side
    w = width * torch.where(original >= 1, short / original, torch.full_like(original, short))
    h = height * torch.where(original >= 1, torch.full_like(original, short), short * original)
    return torch.stack([(width - w) / 2, (height - h) / 2, w, h], dim=1)


def crop_resize_flip(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop each box, resize it to ``size`` x ``size`` (bilinear) and mirror the samples where ``flip``.

    One ``grid_sample`` call does all three: the affine grid maps the output square onto the box,
    with its x axis negated for flipped samples.
    """
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    theta[:, 0, 0] = (w / width) * sign
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision: (B, 1, H, W)."""
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp_(0, 1)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each sample by ``shift`` (in turns), keeping S and V (torchvision's adjust_hue).

    Hue in sixths of a turn from the channel holding the maximum (ties: R, then G, as torchvision),
    then the closed-form HSV -> RGB: channel n in (R, G, B) = (5, 3, 1) is
    max - (max - min) * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
    """
    r, g, b = images.unbind(1)
    # Elementwise max/min and float masks: on CPU a reduction over the 3-channel dim, and
    # bool-mask ops (where, masked_fill), are several times slower than plain arithmetic.
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    r_max = (r == maxc).float()
    g_max = (g == maxc).float() * (1 - r_max)
    b_max = 1 - r_max - g_max
    numerator = r_max * (g - b) + g_max * (b - r) + b_max * (r - g)  # 0 where delta is 0
    hue6 = 2 * g_max + 4 * b_max + numerator / delta.clamp(min=1e-12) + 6 * shift.view(-1, 1, 1)
    k = hue6.unsqueeze(1) + constant((5.0, 3.0, 1.0), images.device, images.dtype).view(1, 3, 1, 1)
    k = k - 6 * torch.floor(k / 6)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def draw_color_jitter(
    shard: Shard,
    p: float,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """ColorJitter's draws: a coin with probability ``p``, then the factors ~ U(max(0, 1 - s), 1 + s)
    of each nonzero strength s and the hue shift ~ U(-hue, hue) (in turns)."""
    n = shard.total
    draws = {"select": shard.rows(coin(n, p, generator, device))}
    for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if s > 0:
            draws[name] = shard.rows(uniform(n, max(0.0, 1 - s), 1 + s, generator, device))
    if hue > 0:
        draws["hue"] = shard.rows(uniform(n, -hue, hue, generator, device))
    return draws


def color_jitter(
    images: torch.Tensor,
    select: torch.Tensor,
    brightness: torch.Tensor | None = None,
    contrast: torch.Tensor | None = None,
    saturation: torch.Tensor | None = None,
    hue: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision ColorJitter where ``select``, with per-sample factors (None: that part is off).

    Order is fixed (brightness, contrast, saturation, hue); torchvision draws a random order per call.
    """
    x = images
    if brightness is not None:
        x = (x * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
    if contrast is not None:
        mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean, contrast)
    if saturation is not None:
        x = _blend(x, rgb_to_grayscale(x), saturation)
    if hue is not None:
        x = _shift_hue(x, hue)
    return torch.where(select.view(-1, 1, 1, 1), x, images)


def draw_coin(shard: Shard, p: float, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The draw of an op applied with probability ``p`` and no other parameter (grayscale, solarize)."""
    return {"select": shard.rows(coin(shard.total, p, generator, device))}


def random_grayscale(images: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    select = select.to(images.dtype).view(-1, 1, 1, 1)
    return images * (1 - select) + rgb_to_grayscale(images) * select  # exact at select 0 and 1


def draw_gaussian_blur(
    shard: Shard, p: float, sigma: tuple[float, float], generator: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    return {
        "select": shard.rows(coin(shard.total, p, generator, device)),
        "sigma": shard.rows(uniform(shard.total, *sigma, generator, device)),
    }


def gaussian_blur(images: torch.Tensor, select: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` (n,) where ``select``.

    Kernel size is ~10% of the side (23 at 224 px, as in BYOL/MoCo v2), odd, at least 3.
    """
    n, c, height, width = images.shape
    k = max(3, 2 * int(round(0.05 * height)) + 1)
    coords = torch.arange(k, device=images.device, dtype=images.dtype) - (k - 1) / 2
    kernel = torch.exp(-(coords.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).unsqueeze(1).expand(n, c, k).reshape(n * c, k)
    x = images.reshape(1, n * c, height, width)
    pad = k // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, k), groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kernel.view(-1, 1, k, 1), groups=n * c)
    return torch.where(select.view(-1, 1, 1, 1), x.view(n, c, height, width), images)


def random_solarize(images: torch.Tensor, select: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    flip = (images >= threshold).to(images.dtype) * select.view(-1, 1, 1, 1).to(images.dtype)
    return images * (1 - flip) + (1.0 - images) * flip  # exact at flip 0 and 1


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = constant(tuple(mean), images.device, images.dtype).view(1, -1, 1, 1)
    s = constant(tuple(std), images.device, images.dtype).view(1, -1, 1, 1)
    return (images - m) / s
