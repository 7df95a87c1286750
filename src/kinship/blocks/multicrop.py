"""Multi-crop forward: a network on crops of several resolutions, one batched pass per resolution."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch


def forward_crops(
    network: Callable[[torch.Tensor], torch.Tensor], crops: Sequence[torch.Tensor], per_crop: bool = False
) -> list[torch.Tensor]:
    """``network`` on every crop (each (B, C, H, W)), outputs in crop order. Consecutive crops of the
    same size go through in one pass, as SwAV's code groups them (``unique_consecutive`` of the
    sizes): the global crops together, then the local ones; BN sees one batch per resolution.
    ``per_crop``: one pass per crop instead, so that BN normalises each view with its own statistics
    (BYOL's and MIRA's code)."""
    if per_crop:
        return [network(crop) for crop in crops]
    outputs: list[torch.Tensor] = []
    for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[1:]):
        group = list(group)
        outputs += network(torch.cat(group)).chunk(len(group))
    return outputs
