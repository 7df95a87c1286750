"""FIFO queue of embeddings (MoCo's negatives, MSF/CMSF's memory bank, SwAV's assignment queue).

Rows of every process enter in rank order, so all processes hold the same queue; rows, the optional
integer side columns (labels, dataset indices, flags; -1 until written) and the pointer are buffers
and travel in the method's ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import nn

from kinship.runtime import all_gather_cat


class FifoQueue(nn.Module):
    def __init__(self, size: int, dim: int, init: str = "random", columns: tuple[str, ...] = ()) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        rows = torch.randn(size, dim) if init == "random" else torch.zeros(size, dim)
        self.register_buffer("rows", nn.functional.normalize(rows, dim=1) if init == "random" else rows)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.columns = columns
        for name in columns:
            self.register_buffer(f"column_{name}", torch.full((size,), -1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def column(self, name: str) -> torch.Tensor:
        return getattr(self, f"column_{name}")

    def valid(self) -> torch.Tensor:
        """(size,) float 1/0: slots written at least once (the queue fills from slot 0 up, then wraps)."""
        return (torch.arange(self.size, device=self.rows.device) < self.filled).to(self.rows.dtype)

    @torch.no_grad()
    def push(self, local_rows: torch.Tensor, **local_columns: torch.Tensor) -> None:
        """Gather ``local_rows`` (and side columns) from all processes, then :meth:`push_gathered`."""
        self.push_gathered(all_gather_cat(local_rows.detach()), **{k: all_gather_cat(v) for k, v in local_columns.items()})

    @torch.no_grad()
    def push_gathered(self, rows: torch.Tensor, **columns: torch.Tensor) -> None:
        """Overwrite the oldest slots with ``rows`` (n, dim), already in rank order, wrapping around."""
        n = rows.shape[0]
        if n > self.size:
            raise ValueError(f"{n} rows do not fit a queue of {self.size}")
        if set(columns) != set(self.columns):
            raise ValueError(f"push expects the columns {self.columns}, got {tuple(columns)}")
        slots = (self.ptr + torch.arange(n, device=rows.device)) % self.size
        self.rows[slots] = rows.to(self.rows.dtype)
        for name, values in columns.items():
            self.column(name)[slots] = values.to(torch.long)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
