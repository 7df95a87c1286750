"""Pseudo-labels from a small classifier on embeddings, trained apart from the main optimizer on a
cache of labeled embeddings (CMSF Sec. 2.3: a 2-layer MLP on the target embeddings, trained twice
per epoch; widths, passes and SGD settings from UCDvision/CMSF ``semi_supervised/pseudo_cmsf.py``).

Every process holds the same cache (callers pass the rows of all processes) and draws the same
order; rank 0's weights are broadcast after each fit, so non-deterministic kernels cannot make the
processes disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinship.blocks.cache import SampleCache
from kinship.models.heads import mlp
from kinship.optim import training_step
from kinship.runtime import broadcast_module


class PseudoLabeler(nn.Module):
    def __init__(self, size: int, dim: int, classes: int, confidence: float, passes: int, lr: float) -> None:
        super().__init__()
        self.confidence, self.passes, self.lr = confidence, passes, lr
        self.cache = SampleCache(size, dim)  # the embedding and label of every labeled image seen
        self.classifier = mlp(dim, 2 * dim, classes)
        self.classifier.requires_grad_(False).eval()  # trained by :meth:`fit` only

    def train(self, mode: bool = True) -> "PseudoLabeler":
        super().train(mode)
        self.classifier.eval()  # in eval mode during the main steps (CMSF's code)
        return self

    @torch.no_grad()
    def label(self, u: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the known label, else the classifier's argmax where its max probability reaches the
        confidence (boundary included), else -1; and (B,) 1/0 whether a label was given."""
        probs = self.classifier(u).to(u.dtype).softmax(dim=1)
        confidence, guess = probs.max(dim=1)
        known = (labels >= 0).to(u.dtype)
        confident = torch.maximum(known, (confidence >= self.confidence).to(u.dtype))
        pseudo = torch.where(labels >= 0, labels, guess)
        return torch.where(confident > 0, pseudo, torch.full_like(pseudo, -1)), confident

    def remember(self, index: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> None:
        """Cache the rows (of every process) whose label is known (>= 0)."""
        self.cache.exchange(index, u, labels, where=labels >= 0)

    @torch.enable_grad()
    def fit(self, seed: int) -> None:
        """Warm-started SGD passes (batch 256, momentum 0.9, weight decay 1e-4) over the cached rows
        (warm-started across rounds: kinship's choice)."""
        filled = ((self.cache.valid > 0) & (self.cache.labels >= 0)).nonzero().squeeze(1)
        if len(filled) >= 2:
            x, y = self.cache.rows[filled], self.cache.labels[filled]
            params = list(self.classifier.parameters())
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-4)
            g = torch.Generator().manual_seed(seed)
            self.classifier.train()
            for _ in range(self.passes):
                order = torch.randperm(len(x), generator=g).to(x.device)
                for start in range(0, len(x), 256):
                    batch = order[start : start + 256]
                    if len(batch) >= 2:
                        training_step(optimizer, lambda: (F.cross_entropy(self.classifier(x[batch]), y[batch]), {}))
            self.classifier.eval()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        broadcast_module(self.classifier)
