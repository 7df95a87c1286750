"""Shuffle-BN (MoCo, He et al. 2020, Sec. 3.3): encode a batch after permuting it across processes,
so that per-process BatchNorm statistics cannot tell which key belongs to which query."""

from __future__ import annotations

import torch
from torch import nn

from kinship.runtime import all_gather_cat, rank, world_size


def shuffled_forward(encoder: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Encode ``x`` after a random permutation of the global batch across processes, then undo it."""
    if world_size() == 1:
        return encoder(x)
    everything = all_gather_cat(x)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(everything.shape[0], generator=g).to(x.device)
    local = x.shape[0]
    mine = perm[rank() * local : (rank() + 1) * local]
    keys = encoder(everything[mine])
    gathered = all_gather_cat(keys)  # rows in permuted order
    restore = torch.empty_like(perm)
    restore[perm] = torch.arange(perm.numel(), device=x.device)
    return gathered[restore][rank() * local : (rank() + 1) * local]
