"""The contract between the trainer and a method.

A method is an ``nn.Module`` that owns its networks and all of its cross-sample state (queues,
banks, caches, centres) as parameters or buffers, so that ``state_dict`` is the whole state a
resumed run needs. Each step the trainer calls ``views(batch, step)`` (augmentation, outside any
autograd or DDP wrapper), then ``forward(views, batch, step)`` for a loss and logs, steps the
optimizer, then ``after_step``; ``on_epoch_start`` / ``on_epoch_end`` frame each epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kinship.config import AugmentConfig, MethodConfig
from kinship.data.loader import Batch


@dataclass
class DataInfo:
    size: int  # training images
    num_classes: int
    image_size: int


@dataclass
class StepInfo:
    epoch: int
    step: int  # global optimizer step, from 0
    total_steps: int
    generator: torch.Generator  # augmentation draws of this process at this step
    shared_seed: int  # identical on every process at this step (e.g. shuffle-BN permutation)
    steps_per_epoch: int = 1


class Method(nn.Module):
    Config: type[MethodConfig] = MethodConfig

    def __init__(self, config: MethodConfig, backbone: nn.Module, data: DataInfo) -> None:
        super().__init__()
        self.config, self.backbone, self.data_info = config, backbone, data

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone that evaluation and export use (the online one; a method with an EMA teacher
        that its paper evaluates, as MIRA does, returns the teacher's)."""
        return self.backbone

    def cluster_scores(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N, K) scores of the method's own cluster or prototype head for eval-backbone features
        (N, D), whose argmax is its clustering; None for methods without one."""
        return None

    @property
    def eval_recipe(self) -> AugmentConfig:
        """Crop size and normalisation of the evaluation view."""
        raise NotImplementedError

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        """The augmented views of ``batch`` this method trains on."""
        raise NotImplementedError

    def forward(
        self, views: list[torch.Tensor], batch: Batch, step: StepInfo
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimizer step (EMA updates live here)."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass
