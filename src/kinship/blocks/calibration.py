"""Pseudo-labels calibrated by similarity to class prototypes (SsCL, Sec. 3.1), with the running
mean of distribution alignment (ReMixMatch, Berthelot et al., 2020).

    prototype_c  = normalize(mean of the unit embeddings of class c)
    p_s          = softmax(gamma * <v, prototype_c>)              a sample's similarity distribution
    p~_s         = mean of the batch means of p_s over the last t batches   (t = 128)
    p^           = normalize(p_b * p_s / p~_s)                      ("ratio")

The paper says both that p_b is refined "via the similarity distribution p_s" and that it is scaled
"with p~_s then re-normalised"; "ratio" reads the running mean as a fairness correction, dividing by
it as distribution alignment does, and keeps the per-sample p_s. "literal" (p_b * p~_s), "product"
(p_b * p_s) and "none" (p_b) are the other readings, for ablation.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from kinship.runtime import all_reduce, world_size

Calibration = Literal["ratio", "literal", "product", "none"]


def calibrate(p_b: torch.Tensor, p_s: torch.Tensor, running: torch.Tensor, mode: Calibration = "ratio") -> torch.Tensor:
    """Calibrated pseudo-label distributions (B, C) from the classifier's p_b (B, C), the similarity
    distributions p_s (B, C) and their running mean (C,); rows sum to 1. ``none`` returns p_b itself."""
    if mode == "none":
        return p_b
    if mode == "ratio":
        scores = p_b * p_s / running.clamp_min(1e-12)
    elif mode == "literal":
        scores = p_b * running
    elif mode == "product":
        scores = p_b * p_s
    else:
        raise ValueError(f"unknown calibration '{mode}' (choose from {', '.join(get_args(Calibration))})")
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(C, d) unit prototypes: the normalised mean of each class's unit features (a class without any
    gets a zero row, similar to nothing)."""
    sums = torch.zeros(classes, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, labels, F.normalize(features, dim=1))
    return F.normalize(sums, dim=1)


def similarity_distribution(features: torch.Tensor, prototypes: torch.Tensor, gamma: float) -> torch.Tensor:
    """p_s (B, C) = softmax(gamma * cosine to each prototype) of unit features (B, d)."""
    return torch.softmax(gamma * F.normalize(features, dim=1) @ prototypes.T, dim=1)


class RunningMean(nn.Module):
    """The mean of the last ``window`` pushed vectors (a ring buffer): each push is a batch's mean
    over all processes, so every process holds the same window. Its rows, pointer and count are
    buffers, saved in checkpoints."""

    def __init__(self, window: int, dim: int) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"the running mean's window must be >= 1, got {window}")
        self.register_buffer("rows", torch.zeros(window, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, batch_mean: torch.Tensor) -> None:
        """Add this process's batch mean (dim,), averaged over processes (equal batch sizes)."""
        value = all_reduce(batch_mean.detach().to(self.rows.dtype).clone()) / world_size()
        self.rows.index_copy_(0, self.ptr.view(1), value.unsqueeze(0))  # a tensor index: no read-back
        self.ptr.copy_((self.ptr + 1) % self.rows.shape[0])
        self.count.copy_(torch.clamp(self.count + 1, max=self.rows.shape[0]))

    def mean(self) -> torch.Tensor:
        """The mean of the rows pushed so far (row 0, zeros, before any push), by a mask: no read-back."""
        written = torch.arange(len(self.rows), device=self.rows.device) < self.count.clamp_min(1)
        return (self.rows * written.unsqueeze(1)).sum(dim=0) / self.count.clamp_min(1)

    @torch.no_grad()
    def reset(self, fill: torch.Tensor) -> None:
        """Restart the window as if ``window`` copies of ``fill`` had been pushed."""
        self.rows.copy_(fill.to(self.rows.dtype).expand_as(self.rows))
        self.ptr.zero_()
        self.count.fill_(self.rows.shape[0])
