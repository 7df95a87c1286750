"""View recipes: one :class:`~kinship.config.AugmentConfig` turned into a batched transform.

Methods list the recipes they need (BYOL's asymmetric pair, MoCo's two identical views, weak and
strong views, multi-crop with global and local sizes, several resolutions) and call
:func:`make_views` on the uint8 batch, on whatever device the data lives.

Images of an ImageFolder are stored whole, resized to a square whatever their shape, with each
one's original width / height (``aspect``): random-resized crops then reach every part of the image
with the geometry torchvision gives on the file, and the evaluation view can be Resize + CenterCrop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kinship.augment import ops, randaugment
from kinship.config import AugmentConfig
from kinship.sampling import Shard

if TYPE_CHECKING:
    from kinship.data.loader import Batch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def augment(
    images: torch.Tensor, recipe: AugmentConfig, generator: torch.Generator, shard: Shard | None = None,
    aspect: torch.Tensor | None = None,
) -> torch.Tensor:
    """One random view per image: float images in [0, 1] -> normalised float views of ``crop_size``.

    ``shard``: where these images sit in the global batch (default: they are the whole batch); the
    random parameters are drawn for the global batch, so the view of an image does not depend on
    how the batch is split across processes. ``aspect``: each image's original width / height when
    the store resized it to a square (None: the stored shape is the original).
    """
    n, _, height, width = images.shape
    device = images.device
    shard = shard or Shard.whole(n)
    if recipe.crop_mode == "pad":
        flip = shard.rows(torch.rand(shard.total, generator=generator, device=device) < recipe.flip_p)
        x = randaugment.pad_crop(resized(images, recipe.crop_size), recipe.pad, flip, generator, shard)
    else:
        boxes = ops.sample_crop_boxes(shard, height, width, recipe.crop_scale, recipe.crop_ratio, generator, device, aspect)
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
    if recipe.randaugment > 0:
        x = randaugment.rand_augment(x, recipe.randaugment, generator, shard)
    if recipe.cutout > 0:
        x = randaugment.cutout(x, recipe.cutout, generator, shard)
    return ops.normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image at ``size`` x ``size`` (bilinear, antialiased); unchanged at that size already."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def make_views(batch: "Batch", recipes: list[AugmentConfig], generator: torch.Generator) -> list[torch.Tensor]:
    """One view per recipe of the batch's uint8 images (decoded to float once)."""
    x = to_float(batch.images)
    return [augment(x, recipe, generator, batch.shard, batch.aspect) for recipe in recipes]


def center_view(images: torch.Tensor, recipe: AugmentConfig, aspect: torch.Tensor | None = None) -> torch.Tensor:
    """The evaluation view, normalised, no randomness: with ``recipe.eval_resize`` torchvision's
    Resize(eval_resize) + CenterCrop(crop_size) of the original image (ImageNet: 256, 224), else
    the whole image resized to ``crop_size``."""
    x = to_float(images)
    n, _, height, width = x.shape
    if recipe.eval_resize:
        boxes = ops.center_crop_boxes(n, height, width, recipe.crop_size, recipe.eval_resize, aspect, x.device)
        x = ops.crop_resize_flip(x, boxes, recipe.crop_size, torch.zeros(n, dtype=torch.bool, device=x.device))
    else:
        x = resized(x, recipe.crop_size)
    return ops.normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)
