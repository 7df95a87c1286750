"""Frozen-network feature extraction: one deterministic view per image, in chunks, BN in eval mode.

Used by the k-NN monitor, the evaluation suite and the data handle's ``embed_all`` (which shards it
across processes). ``images`` is anything with ``len`` and slicing that yields uint8 (n, 3, H, W)
batches on the network's device: a tensor, or something whose slices carry ``.images`` and
``.aspect`` (an image set, or a reader that decodes files chunk by chunk).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from kinship.augment.views import center_view
from kinship.config import AugmentConfig
from kinship.runtime import progress_bar

View = AugmentConfig | Callable[[torch.Tensor], torch.Tensor]


class Images(Protocol):
    images: torch.Tensor  # uint8 (n, 3, H, W)
    aspect: torch.Tensor | None  # float (n,): original width / height, where stored as squares


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, rows: slice) -> torch.Tensor | Images: ...


def unpack(images: torch.Tensor | Images) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 pixels, aspect ratios or None) of a tensor or of something carrying both."""
    return (images, None) if isinstance(images, torch.Tensor) else (images.images, images.aspect)


def apply_view(view: View, images: torch.Tensor | Images) -> torch.Tensor:
    """A recipe's evaluation view (:func:`center_view`), or any function of the uint8 batch."""
    pixels, aspect = unpack(images)
    return center_view(pixels, view, aspect) if isinstance(view, AugmentConfig) else view(pixels)


@torch.no_grad()
def extract_features(
    network: nn.Module,
    images: torch.Tensor | ImageSource,
    view: View,
    batch_size: int = 512,
    autocast: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """uint8 images -> float32 outputs (N, D) of ``network`` in eval mode (a tuple when the network
    returns several tensors, e.g. a projection and class logits from one pass). A source that decodes
    files may decode them as the view needs (``for_view``: streamed files, a Resize + CenterCrop view
    cut from each file)."""
    if hasattr(images, "for_view"):
        images, view = images.for_view(view)
    was_training = network.training
    network.eval()
    try:
        chunks: list = []
        for start in progress_bar(range(0, len(images), batch_size), progress, desc=desc):
            batch = images[start : start + batch_size]
            with torch.autocast(unpack(batch)[0].device.type, dtype=torch.bfloat16, enabled=autocast):
                out = network(apply_view(view, batch))
            chunks.append(tuple(o.float() for o in out) if isinstance(out, tuple) else out.float())
        if chunks and isinstance(chunks[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*chunks))
        return torch.cat(chunks)
    finally:
        network.train(was_training)


def pixel_features(images: torch.Tensor | ImageSource, recipe: AugmentConfig, batch_size: int = 512) -> torch.Tensor:
    """Raw normalised pixels of the evaluation view, flattened, a chunk at a time: the 'no learning
    at all' k-NN baseline."""
    return extract_features(nn.Flatten(), images, recipe, batch_size)
