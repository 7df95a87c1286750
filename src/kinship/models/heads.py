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

    ``weight_norm=True``: MIRA's weight-normalised Linear whose magnitude is fixed at 1 (official code):
    every prototype row is l2-normalised in the graph, so its gradient is the raw one projected onto
    the sphere's tangent. ``weight_norm=False``: SwAV's plain Linear (``main_swav.py``), its rows put
    back on the sphere before every step by :meth:`renormalize_`, outside the graph, so the gradient
    keeps its radial part (which moves LARS's trust ratio). The embedding is l2-normalised in both. ``frozen=True`` gives the same
    logits with no gradient to the prototypes, so the optimizer leaves them untouched (no update, no
    momentum, no weight decay), as SwAV and MIRA do during their first epoch.
    """

    def __init__(self, dim: int, prototypes: int, weight_norm: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.functional.normalize(torch.randn(prototypes, dim), dim=1))
        self.weight_norm = weight_norm

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Logits in fp32 (fp64 for fp64 inputs) with autocast off: they are divided by temperatures
        as small as 0.05 before the solvers, where bf16's 3 significant digits would be 2e-3 off."""
        weight = self.weight.detach() if frozen else self.weight
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            weight = nn.functional.normalize(weight.to(dtype), dim=1) if self.weight_norm else weight.to(dtype)
            return nn.functional.normalize(z.to(dtype), dim=1) @ weight.T

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Every prototype back to unit norm, in place, outside the graph (SwAV's code, before each step)."""
        self.weight.copy_(nn.functional.normalize(self.weight, dim=1))
