"""Optimizers (SGD, LARS, AdamW) and the per-step warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from kinship.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta * ||w|| / (||g|| + wd ||w||) (You et al., 2017).

    Groups with ``lars_exclude=True`` (biases, norms) get neither weight decay nor adaptation, as
    in BYOL/SimCLR/SwAV.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not config.exclude_bias_bn:
        return [{"params": [p for _, p in params]}]
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]  # biases and norm scales/shifts
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(model: nn.Module, config: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    lr = config.lr * global_batch / config.lr_batch
    groups = parameter_groups(model, config)
    if config.name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name == "lars":
        return LARS(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, eta=config.lars_eta)
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas, weight_decay=config.weight_decay)


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_ratio: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine from ``base_lr`` to ``base_lr * final_ratio``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    final = base_lr * final_ratio
    return final + (base_lr - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
