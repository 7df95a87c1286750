"""Exponential moving average (momentum) encoders and BYOL's cosine momentum schedule."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_ramp(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """A cosine from ``base`` at step 0 to ``final`` at step K: final - (final - base) (cos(pi k / K) + 1) / 2.

    BYOL's target momentum (tau_0 -> 1) and MIRA's momentum and beta schedules (0.7 -> 2/3)."""
    if total_steps <= 0:
        return base
    progress = min(step, total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be updated only by :func:`ema_update`."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """xi <- m xi + (1 - m) theta for parameters. Buffers are left alone: the target's BN running
    statistics are its own, gathered by its train-mode forwards, as in MoCo, BYOL and MIRA's code;
    they are the ones an evaluated EMA network (MIRA's teacher) needs (mira.md pitfall 13)."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1 - momentum)
