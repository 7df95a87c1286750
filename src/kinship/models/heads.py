"""Projection and prediction heads."""
from __future__ import annotations

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
