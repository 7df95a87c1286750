"""View recipes: one :class:`~kinship.config.AugmentConfig` turned into a batched transform.

Methods list the recipes they need (BYOL's asymmetric pair, MoCo's two identical views, weak and
strong views, multi-crop with global and local sizes, several resolutions) and call
:func:`make_views` on the uint8 batch, on whatever device the data lives.
"""
from __future__ import annotations

import torch

from kinship.augment import ops
from kinship.config import AugmentConfig
from kinship.sampling import Shard


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def augment(
    images: torch.Tensor, recipe: AugmentConfig, generator: torch.Generator, shard: Shard | None = None
) -> torch.Tensor:
    """One random view per image: float images in [0, 1] -> normalised float views of ``crop_size``.

    ``shard``: where these images sit in the global batch (default: they are the whole batch); the
    random parameters are drawn for the global batch, so the view of an image does not depend on
    how the batch is split across processes.
    """
    n, _, height, width = images.shape
    device = images.device
    shard = shard or Shard.whole(n)
    boxes = shard.rows(ops.sample_crop_boxes(shard.total, height, width, recipe.crop_scale, recipe.crop_ratio, generator, device))
    flip = shard.rows(torch.rand(shard.total, generator=generator, device=device) < recipe.flip_p)
    x = ops.crop_resize_flip(images, boxes, recipe.crop_size, flip)
    if recipe.jitter_p > 0:
        x = ops.color_jitter(
            x, recipe.jitter_p, recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue, generator, shard
        )
    if recipe.grayscale_p > 0:
        x = ops.random_grayscale(x, recipe.grayscale_p, generator, shard)
    if recipe.blur_p > 0:
        x = ops.gaussian_blur(x, recipe.blur_p, recipe.blur_sigma, generator, shard)
    if recipe.solarize_p > 0:
        x = ops.random_solarize(x, recipe.solarize_p, generator, shard)
    return ops.normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)


def make_views(
    images: torch.Tensor, recipes: list[AugmentConfig], generator: torch.Generator, shard: Shard | None = None
) -> list[torch.Tensor]:
    """One view per recipe, all from the same uint8 batch (decoded to float once)."""
    x = to_float(images)
    return [augment(x, recipe, generator, shard) for recipe in recipes]


def center_view(images: torch.Tensor, recipe: AugmentConfig) -> torch.Tensor:
    """The evaluation view: the whole image resized to ``crop_size``, normalised, no randomness."""
    x = to_float(images)
    if x.shape[-1] != recipe.crop_size or x.shape[-2] != recipe.crop_size:
        x = torch.nn.functional.interpolate(x, size=(recipe.crop_size, recipe.crop_size), mode="bilinear", antialias=True, align_corners=False)
    return ops.normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)
