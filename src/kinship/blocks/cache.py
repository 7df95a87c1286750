"""Per-image cache indexed by dataset index: the most recent embedding (and label) of every image.

CMSF keeps each image's target embedding from its previous visit (the previous epoch) to build its
self-supervised constraint, and the labeled images' embeddings to train its pseudo-label classifier.
Callers pass the rows of all processes (gathered, rank order), so every process holds the same cache.
"""

from __future__ import annotations

import torch
from torch import nn


class SampleCache(nn.Module):
    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("valid", torch.zeros(size))  # 1.0 once written
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))

    @torch.no_grad()
    def exchange(
        self, index: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor | None = None, where: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the cached rows and valid flags of ``index`` (n,), then write ``rows`` (n, dim) there,
        only where ``where`` (n,) bool is True if given (a mask, not a selection of the rows: nothing
        is read back from the device).

        ``index`` must not repeat within one call (the batch plan drops no image twice per step).
        """
        previous, was_valid = self.rows[index].clone(), self.valid[index].clone()
        write = torch.ones_like(index, dtype=torch.bool) if where is None else where
        self.rows[index] = torch.where(write.unsqueeze(1), rows.to(self.rows.dtype), previous)
        self.valid[index] = torch.where(write, torch.ones_like(was_valid), was_valid)
        if labels is not None:
            self.labels[index] = torch.where(write, labels.to(torch.long), self.labels[index])
        return previous, was_valid
