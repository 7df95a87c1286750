"""Exponential moving average (momentum) targets: MoCo's key encoder, BYOL's and CMSF's targets,
MIRA's teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float, copy_buffers: bool = False) -> None:
    """xi <- m xi + (1 - m) theta for parameters. Buffers are left alone: the target's BN running
    statistics are its own, gathered by its train-mode forwards, as in MoCo, BYOL and MIRA's code;
    they are the ones an evaluated EMA network (MIRA's teacher) needs. ``copy_buffers``: a target
    that never runs forward takes the online network's buffers (FixMatch's evaluation EMA)."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(t_params, o_params, 1 - momentum)  # one multi-tensor op for every parameter
    if copy_buffers:
        for t, o in zip(target.buffers(), online.buffers()):
            t.copy_(o)


class EMATarget(nn.Sequential):
    """A frozen copy of the online modules (applied in sequence, e.g. backbone then projector),
    moved toward them by :meth:`update` from the method's ``after_step``.

    Its state-dict keys are those of ``nn.Sequential(*online)`` (``0.*``, ``1.*``). The online
    modules are referenced, not registered, so they are saved once, by the method that owns them.
    """

    def __init__(self, *online: nn.Module) -> None:
        super().__init__(*(copy.deepcopy(module) for module in online))
        self.requires_grad_(False)
        self.online = online  # a tuple: not a submodule

    def update(self, momentum: float, copy_buffers: bool = False) -> None:
        ema_update(self, nn.Sequential(*self.online), momentum, copy_buffers)
