"""Optimizers (SGD, LARS, AdamW), the learning-rate rules (linear scaling, warm-up + cosine) and the
one training step that the trainer, the benchmark, fine-tuning and method-internal classifiers share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kinship.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta * ||w|| / (||g|| + wd ||w||) (You et al., 2017).

    Groups with ``lars_exclude=True`` (biases, norms) get neither weight decay nor adaptation, as
    in BYOL/SimCLR/SwAV. ``clip``: each layer's rate is min(trust, lr) instead of lr * trust (apex's
    LARC in clip mode, which SwAV's code uses; solo-learn's ``clip_lr``).
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001, clip: bool = False
    ) -> None:
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip, lars_exclude=False)
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Each group in a few multi-tensor ops (``torch._foreach_*``), not a loop of ops per parameter."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                if group["clip"]:
                    trust = (trust / group["lr"]).clamp(max=1.0)
                grads = torch._foreach_mul(grads, trust.unbind(0))
            states = [self.state[p] for p in params]
            if all("momentum_buffer" in state for state in states):
                buffers = [state["momentum_buffer"] for state in states]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
            else:  # the first step: the buffers start at the update
                buffers = [torch.clone(g).detach() for g in grads]
                for state, buffer in zip(states, buffers):
                    state["momentum_buffer"] = buffer
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not config.exclude_bias_bn:
        return [{"params": [p for _, p in params]}]
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]  # biases and norm scales/shifts
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def scaled_lr(lr: float, batch: int, reference_batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``lr`` is given at ``reference_batch``."""
    return lr * batch / reference_batch


def build_optimizer(model: nn.Module, config: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    lr = scaled_lr(config.lr, global_batch, config.lr_batch)
    groups = parameter_groups(model, config)
    # on a GPU, SGD and AdamW update every parameter in one fused kernel; LARS in a few multi-tensor ops
    params = [p for g in groups for p in g["params"]]
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if config.name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(
            groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov, **fused
        )
    if config.name == "lars":
        return LARS(
            groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, eta=config.lars_eta, clip=config.lars_clip
        )
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas, weight_decay=config.weight_decay, **fused)


def cosine_ramp(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """A cosine from ``base`` at step 0 to ``final`` at step K: final - (final - base) (cos(pi k / K) + 1) / 2.

    The learning rate after warm-up, BYOL's target momentum (tau_0 -> 1), MIRA's momentum and beta
    (0.7 -> 2/3), fine-tuning's decay to 0."""
    if total_steps <= 0:
        return base
    progress = min(step, total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def learning_rate(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_ratio: float,
    start_lr: float = 0.0,
    schedule: str = "cosine",
) -> float:
    """Linear warm-up from ``start_lr`` (reached just before step 0) to ``base_lr`` over ``warmup_steps``,
    then cosine from ``base_lr`` to ``base_lr * final_ratio``, or with ``schedule="fixmatch"``
    base_lr cos(7 pi k / 16 K) over the K steps after warm-up (FixMatch, Sec. 4; ``final_ratio`` unused)."""
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * (step + 1) / warmup_steps
    k, total = step - warmup_steps, max(1, total_steps - warmup_steps)
    if schedule == "fixmatch":
        return base_lr * math.cos(7 * math.pi * min(k, total) / (16 * total))
    return cosine_ramp(k, total, base_lr, base_lr * final_ratio)


@dataclass(frozen=True)
class LRSchedule:
    """A run's learning rate by global step, built once: :func:`learning_rate` over the training
    steps that follow ``start_step`` (the scan epochs' steps), at the linearly scaled base rate."""

    base_lr: float
    start_step: int
    total_steps: int
    warmup_steps: int
    final_ratio: float
    start_lr: float
    schedule: str

    @classmethod
    def of(cls, config: OptimConfig, global_batch: int, steps_per_epoch: int, start_step: int, total_steps: int) -> "LRSchedule":
        return cls(
            scaled_lr(config.lr, global_batch, config.lr_batch),
            start_step,
            total_steps,
            round(config.warmup_epochs * steps_per_epoch),
            config.final_lr_ratio,
            config.warmup_start_lr,
            config.schedule,
        )

    def __call__(self, global_step: int) -> float:
        return learning_rate(
            global_step - self.start_step,
            self.total_steps - self.start_step,
            self.warmup_steps,
            self.base_lr,
            self.final_ratio,
            self.start_lr,
            self.schedule,
        )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def training_step(
    optimizer: torch.optim.Optimizer,
    compute_loss: Callable[[], tuple[torch.Tensor, dict]],
    autocast_device: str | None = None,
) -> tuple[torch.Tensor, dict]:
    """One optimizer step: the loss (under bf16 autocast on ``autocast_device`` when given), then
    zero_grad, backward, step."""
    with torch.autocast(autocast_device or "cpu", dtype=torch.bfloat16, enabled=autocast_device is not None):
        loss, logs = compute_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logs
