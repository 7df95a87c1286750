"""Projection and prediction heads."""
from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True, layers: int = 2) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks then a final Linear: BYOL's head with BN, MoCo v2's without."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            blocks.append(nn.BatchNorm1d(hidden_dim))
        blocks.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*blocks)


class PrototypeHead(nn.Module):
    """K prototypes on the unit sphere: cosine logits (B, K) in [-1, 1] for embeddings (B, d).

    MIRA's weight-normalised Linear whose magnitude is fixed at 1 [C] (SwAV renormalises its
    prototypes every step to the same effect): both the embedding and every prototype row are
    l2-normalised and the gradient flows through that normalisation. ``frozen=True`` gives the same
    logits with no gradient to the prototypes, so the optimizer leaves them untouched (no update, no
    momentum, no weight decay), as SwAV and MIRA do during their first epoch.
    """

    def __init__(self, dim: int, prototypes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.functional.normalize(torch.randn(prototypes, dim), dim=1))

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        weight = self.weight.detach() if frozen else self.weight
        return nn.functional.normalize(z, dim=1) @ nn.functional.normalize(weight, dim=1).T
