"""Linear probe on cached frozen features: full-batch multinomial logistic regression by L-BFGS.

The fast CIFAR-scale protocol. Features are l2-normalised and then standardised with the train
statistics (CMSF's linear protocol, after CompRess); the l2 coefficient is chosen on a seeded
held-out part of the train set from a log grid and the model is refitted on the whole train set
(the protocol of MIRA's transfer table). The problem is
convex, so the result does not depend on initialisation or batch order: one number per checkpoint.
The SGD probe with augmentation (ImageNet scale) is in :mod:`kinship.eval.finetune`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinship.blocks.knn import topk_accuracy
from kinship.runtime import progress_bar


class Standardizer(nn.Module):
    """l2-normalise, then subtract the train mean and divide by the train std, per dimension.

    The statistics are buffers: fixed once fitted, moved and saved with a model that holds them."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # (d,)
        self.register_buffer("std", std)  # (d,)

    @classmethod
    def fit(cls, features: torch.Tensor) -> "Standardizer":
        x = F.normalize(features.float(), dim=1)
        return cls(x.mean(0), x.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (F.normalize(features.float(), dim=1) - self.mean) / self.std


def fit_softmax_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300, init: nn.Linear | None = None
) -> nn.Linear:
    """argmin_{W,b} mean CE(x W^T + b, y) + l2 ||W||^2 by full-batch L-BFGS (strong Wolfe line search).

    x (N, d) float, y int64 (N,) -> a Linear(d, num_classes). Bias is not regularised.
    """
    linear = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        if init is None:
            linear.weight.zero_()
            linear.bias.zero_()
        else:
            linear.load_state_dict(init.state_dict())
    optimizer = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear.requires_grad_(False)


@torch.no_grad()
def probe_accuracy(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    return topk_accuracy(linear(x), y)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 300,
    progress: bool = False,
) -> tuple[dict, nn.Linear, Standardizer]:
    """Top-1/top-5 (percent) on the test set, the chosen l2 and the validation accuracy of each l2.

    Returns the result, the fitted head and its standardiser (head(standardiser(features))).
    """
    standardize = Standardizer.fit(train_x)
    x, t = standardize(train_x), standardize(test_x)
    val_top1: dict[str, float] = {}
    best_l2, init = l2_grid[0], None
    if len(l2_grid) > 1 and val_fraction > 0:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
        n_val = max(1, int(round(val_fraction * len(x))))
        val, fit = order[:n_val], order[n_val:]
        best = -1.0
        for l2 in progress_bar(l2_grid, progress, desc="linear probe: l2 search"):
            head = fit_softmax_regression(x[fit], train_y[fit], num_classes, l2, max_iter)
            acc = probe_accuracy(head, x[val], train_y[val])[1]
            val_top1[f"{l2:g}"] = acc
            if acc > best:
                best, best_l2, init = acc, l2, head
    head = fit_softmax_regression(x, train_y, num_classes, best_l2, max_iter, init)
    acc = probe_accuracy(head, t, test_y)
    train_acc = probe_accuracy(head, x, train_y)[1]
    result = {"top1": acc[1], "top5": acc[5], "train_top1": train_acc, "l2": best_l2, "val_top1": val_top1}
    return result, head, standardize
