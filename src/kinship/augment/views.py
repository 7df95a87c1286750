"""View recipes: one :class:`~kinship.config.AugmentConfig` turned into a batched transform.

Methods list the recipes they need (BYOL's asymmetric pair, MoCo's two identical views, weak and
strong views, multi-crop with global and local sizes, several resolutions) and call
:func:`make_views` on the uint8 batch, on whatever device the data lives.

Images of an ImageFolder are stored whole, resized to a square whatever their shape, with each
one's original width / height (``aspect``): random-resized crops then reach every part of the image
with the geometry torchvision gives on the file, and the evaluation view can be Resize + CenterCrop.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch

from kinship.augment import ops, randaugment
from kinship.config import AugmentConfig
from kinship.runtime import compiled
from kinship.sampling import Shard


class ViewSource(Protocol):
    """What :func:`make_views` reads of a batch (``kinship.data.Batch`` is one): uint8 images (B, 3,
    H, W), or a streamed batch's crops, one per recipe; the batch's place in the global batch; the
    original aspect of images stored as squares."""

    images: torch.Tensor | None
    shard: Shard
    aspect: torch.Tensor | None
    crops: tuple[tuple[AugmentConfig, torch.Tensor], ...] | None


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


Draws = dict[str, dict[str, torch.Tensor]]  # a view's random numbers, by op


def draw_view(
    recipe: AugmentConfig,
    shard: Shard,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device,
    cropped: bool = False,
) -> Draws:
    """Every random number one view of a batch of (height, width) images needs, by op, drawn in the
    order the ops apply, for the global batch (this shard's rows kept: the view of an image does not
    depend on how the batch is split across processes). ``cropped``: the images are this recipe's
    random-resized crops already (cut and flipped while the files were decoded,
    :mod:`kinship.data.stream`), so only the photometric ops are drawn."""
    draws: Draws = {}
    if recipe.crop_mode == "pad":
        draws["flip"] = ops.draw_coin(shard, recipe.flip_p, generator, device)
        draws["pad_crop"] = randaugment.draw_pad_crop(shard, recipe.pad, generator, device)
    elif not cropped:
        draws.update(draw_geometry(recipe, shard, generator, device))
    if recipe.jitter_p > 0:
        draws["jitter"] = ops.draw_color_jitter(
            shard, recipe.jitter_p, recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue, generator, device
        )
    if recipe.grayscale_p > 0:
        draws["grayscale"] = ops.draw_coin(shard, recipe.grayscale_p, generator, device)
    if recipe.blur_p > 0:
        draws["blur"] = ops.draw_gaussian_blur(shard, recipe.blur_p, recipe.blur_sigma, generator, device)
    if recipe.solarize_p > 0:
        draws["solarize"] = ops.draw_coin(shard, recipe.solarize_p, generator, device)
    if recipe.randaugment > 0:
        draws["randaugment"] = randaugment.draw_rand_augment(shard, recipe.randaugment, generator, device)
    if recipe.cutout > 0:
        draws["cutout"] = randaugment.draw_cutout(shard, recipe.crop_size, recipe.crop_size, generator, device)
    return draws


def draw_geometry(recipe: AugmentConfig, shard: Shard, generator: torch.Generator, device: torch.device | str) -> Draws:
    """The draws of a random-resized-crop recipe's geometry: the crop box, then the flip."""
    return {
        "crop": ops.draw_crop_boxes(shard, recipe.crop_scale, recipe.crop_ratio, generator, device),
        "flip": ops.draw_coin(shard, recipe.flip_p, generator, device),
    }


def render_view(images: torch.Tensor, recipe: AugmentConfig, draws: Draws, aspect: torch.Tensor | None = None) -> torch.Tensor:
    """The view of float images (B, 3, H, W) in [0, 1] that ``draws`` (:func:`draw_view`) define:
    normalised, ``crop_size``, channels_last. A pure function: no generator, nothing read back.
    ``aspect``: each image's original width / height when the store resized it to a square (None:
    the stored shape is the original). Without a "crop" draw the images are the crops already."""
    _, _, height, width = images.shape
    if recipe.crop_mode == "pad":
        x = randaugment.pad_crop(resized(images, recipe.crop_size), recipe.pad, draws["flip"]["select"], **draws["pad_crop"])
    elif "crop" not in draws:
        x = images
    else:
        boxes = ops.crop_boxes(height, width, recipe.crop_ratio, **draws["crop"], aspect=aspect)
        x = ops.crop_resize_flip(images, boxes, recipe.crop_size, draws["flip"]["select"])
    if "jitter" in draws:
        x = ops.color_jitter(x, **draws["jitter"])
    if "grayscale" in draws:
        x = ops.random_grayscale(x, **draws["grayscale"])
    if "blur" in draws:
        x = ops.gaussian_blur(x, **draws["blur"])
    if "solarize" in draws:
        x = ops.random_solarize(x, **draws["solarize"])
    if "randaugment" in draws:
        x = randaugment.rand_augment(x, **draws["randaugment"])
    if "cutout" in draws:
        x = randaugment.cutout(x, recipe.cutout, **draws["cutout"])
    return ops.normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)


def augment(
    images: torch.Tensor,
    recipe: AugmentConfig,
    generator: torch.Generator,
    shard: Shard | None = None,
    aspect: torch.Tensor | None = None,
) -> torch.Tensor:
    """One random view per image: float images in [0, 1] -> normalised float views of ``crop_size``.

    ``shard``: where these images sit in the global batch (default: they are the whole batch).
    """
    shard = shard or Shard.whole(len(images))
    return render_view(images, recipe, draw_view(recipe, shard, *images.shape[-2:], generator, images.device), aspect)


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image at ``size`` x ``size`` (bilinear, antialiased); unchanged at that size already."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def make_views(batch: ViewSource, recipes: list[AugmentConfig], generator: torch.Generator) -> list[torch.Tensor]:
    """One view per recipe of the batch's uint8 images: every view's draws first, then the
    transforms in one call of :func:`render_views` (compiled under :func:`compiled_views`). A
    streamed batch carries its crops (``batch.crops``, cut from the files as they were decoded): the
    recipes must then be those the loader cropped for, or a prefix of them."""
    if batch.crops is None:
        height, width = batch.images.shape[-2:]
        draws = [draw_view(recipe, batch.shard, height, width, generator, batch.images.device) for recipe in recipes]
        return _render(batch.images, tuple(recipes), draws, batch.aspect)
    made = batch.crops[: len(recipes)]
    if [r for r, _ in made] != list(recipes):
        raise RuntimeError(
            f"views of {len(recipes)} recipes asked of a streamed batch cropped for {len(batch.crops)} other ones: "
            "a method's views must follow its view_recipes"
        )
    draws = [draw_view(recipe, batch.shard, *crop.shape[-2:], generator, crop.device, cropped=True) for recipe, crop in made]
    return _render([crop for _, crop in made], tuple(recipes), draws, None)


def render_views(
    images: torch.Tensor | list[torch.Tensor],
    recipes: tuple[AugmentConfig, ...],
    draws: list[Draws],
    aspect: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The views of uint8 images (decoded to float once) that ``draws`` define, one per recipe; or
    of a list of uint8 crops, one per recipe."""
    if isinstance(images, list):
        return [render_view(to_float(x), recipe, view_draws) for x, recipe, view_draws in zip(images, recipes, draws)]
    x = to_float(images)
    return [render_view(x, recipe, view_draws, aspect) for recipe, view_draws in zip(recipes, draws)]


_render = render_views


@contextlib.contextmanager
def compiled_views(enabled: bool, backend: str = "inductor", mode: str = "default") -> Iterator[None]:
    """While active (``train.compile``), :func:`make_views` runs :func:`render_views` compiled as one
    graph (``fullgraph``: a graph break is an error), which fuses the views' elementwise ops."""
    global _render
    previous, _render = _render, compiled(render_views, enabled, backend, mode, fullgraph=True)
    try:
        yield
    finally:
        _render = previous


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
