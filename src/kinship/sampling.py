"""Seeded random draws that do not depend on the number of processes.

A training step draws its per-sample randomness (crop boxes, flips, jitter factors, mixing weights)
from a generator seeded by (seed, step) alone. Every process draws the values of the *global*
batch, exactly as one process would, and keeps the rows of its own shard (:class:`Shard`); so N
processes apply the same augmentation to each image as one process fed the concatenated batch,
and a run resumed on another number of processes draws the same numbers. Drawing a few numbers per
image of the global batch costs nothing next to transforming the local images.

Everything takes an explicit ``torch.Generator``: nothing here touches the global RNG, which
``torch.distributions`` would (e.g. its Beta, for CutMix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """This process's rows ``[start, start + size)`` of a global batch of ``total`` rows."""

    start: int
    size: int
    total: int

    @staticmethod
    def whole(size: int) -> "Shard":
        return Shard(0, size, size)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a (total, ...) tensor drawn for the global batch."""
        return values[self.start : self.start + self.size]


def uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def coin(n: int, p: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def gamma(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(concentration, 1) samples, one per entry, from ``generator`` (torch's own sampler)."""
    return torch._standard_gamma(concentration, generator=generator)


def beta(n: int, a: float, b: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """(n,) samples of Beta(a, b) as X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b) (CutMix's and mixup's
    lambda ~ Beta(alpha, alpha)); float32, seeded by ``generator`` only."""
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be positive, got ({a}, {b})")
    x = gamma(torch.full((n,), float(a), device=device), generator)
    y = gamma(torch.full((n,), float(b), device=device), generator)
    # x + y underflows to 0 only for tiny a and b, where Beta's mass sits at the ends: 0 then
    return x / (x + y).clamp_min(torch.finfo(x.dtype).tiny)
