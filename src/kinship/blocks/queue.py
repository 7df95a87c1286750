"""FIFO queue of embeddings (MoCo's negatives, SwAV's assignment queue, memory banks).

Rows of every process enter in rank order, so all processes hold the same queue; the queue and
its pointer are buffers and travel in the method's ``state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from kinship.runtime import all_gather_cat


class FifoQueue(nn.Module):
    def __init__(self, size: int, dim: int, init: str = "random") -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        rows = torch.randn(size, dim) if init == "random" else torch.zeros(size, dim)
        self.register_buffer("rows", nn.functional.normalize(rows, dim=1) if init == "random" else rows)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def push(self, local_rows: torch.Tensor) -> None:
        """Gather ``local_rows`` from all processes and overwrite the oldest slots (wrapping)."""
        new = all_gather_cat(local_rows.detach()).to(self.rows.dtype)
        n = new.shape[0]
        if n > self.size:
            raise ValueError(f"{n} rows do not fit a queue of {self.size}")
        slots = (self.ptr + torch.arange(n, device=new.device)) % self.size
        self.rows[slots] = new
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
