"""SwAV (Caron et al., NeurIPS 2020): swapped prediction of equal-partition codes (Sinkhorn-Knopp).

    z_v = normalize(g(f(crop_v)));  s_v = <z_v, c_k> for unit prototypes c_k     every crop
          (f runs once per crop size, g and the prototypes once on all crops together, so the head's
          BN sees the global and the local crops in one batch: main_swav.py and src/resnet50.py)
    q_s = Sinkhorn(s_s / epsilon), s in the 2 global crops, no gradient; with a queue of past
          embeddings prepended once it is full (small batches), only the batch rows kept
    loss = mean_s mean_{v != s} CE(q_s, softmax(s_v / T))
The prototypes are a plain linear layer put back on the unit sphere before every step, outside the
graph (``main_swav.py``), and frozen for the first epoch(s). The queue receives the embeddings of every
process (so every process, and the checkpoint, holds the whole queue) and each process prepends
its own share of it: Sinkhorn sums over all processes, so each queued row counts once, as in one
process with the whole queue (``main_swav.py`` keeps per-process queues instead, which a
checkpoint written by rank 0 could not restore).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.assignment import sinkhorn
from kinship.blocks.multicrop import forward_crops
from kinship.blocks.queue import FifoQueue
from kinship.config import AugmentConfig, MethodConfig, RunConfig, check
from kinship.losses import swapped_prediction_loss
from kinship.methods.base import Batch, Method, StepInfo, TrainData
from kinship.models.heads import PrototypeHead, mlp
from kinship.runtime import rank, section, world_size


@dataclass
class SwAVConfig(MethodConfig):
    name: str = "swav"
    prototypes: int = 3000
    dim: int = 128
    hidden: int = 2048
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_size: int = 0  # batch-256 recipe: 3840 (from epoch 15 on ImageNet, 50 on CIFAR (solo-learn))
    queue_start_epoch: int = 15
    freeze_prototypes_epochs: int = 1  # ImageNet: one epoch of iterations; CIFAR (solo-learn): 2
    local_crops: int = 0  # ImageNet: 6 x 96
    # colour distortion s = 1: jitter (0.8, 0.8, 0.8, 0.2) p 0.8, gray 0.2; blur p 0.5 on ImageNet, off
    # at 32 px (kinship's choice); global RRC(0.14, 1), local RRC(0.05, 0.14)
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(
            crop_scale=(0.14, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.0
        )
    )
    local: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(
            crop_size=16, crop_scale=(0.05, 0.14), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.0
        )
    )

    def validate(self, run: RunConfig) -> None:
        check(self.prototypes >= 1 and self.sinkhorn_iterations >= 1, "method.prototypes and sinkhorn_iterations must be >= 1")
        check(self.epsilon > 0 and self.temperature > 0, "method.epsilon and method.temperature must be > 0")
        check(self.queue_size >= 0, f"method.queue_size must be >= 0, got {self.queue_size}")


class SwAV(Method):
    Config = SwAVConfig

    def __init__(self, config: SwAVConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        self.projector = mlp(backbone.feature_dim, config.hidden, config.dim)
        self.head = PrototypeHead(config.dim, config.prototypes, weight_norm=False)
        if config.queue_size:
            self.queues = nn.ModuleList([FifoQueue(config.queue_size, config.dim, init="zeros") for _ in range(2)])
        # phases, decided on the host before each step (begin_step)
        self.prototypes_frozen = config.freeze_prototypes_epochs > 0
        self.queue_in_use = self.queue_full = False

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.augment

    @property
    def unused_parameters(self) -> bool:
        return self.config.freeze_prototypes_epochs > 0

    def cluster_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.projector(features), frozen=True)

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        cfg = self.config
        return [cfg.augment] * 2 + [cfg.local] * cfg.local_crops

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        return make_views(batch, self.view_recipes(), step.generator)

    def begin_step(self, step: StepInfo) -> dict[str, float]:
        cfg = self.config
        self.prototypes_frozen = step.epoch < cfg.freeze_prototypes_epochs
        self.queue_in_use = bool(cfg.queue_size) and step.epoch >= cfg.queue_start_epoch
        if not self.queue_in_use:
            self.queue_full = False
        elif not self.queue_full:  # read back only until full (a few steps after the start, once after a load)
            self.queue_full = bool(self.queues[0].filled == cfg.queue_size)
        return {}

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        frozen = self.prototypes_frozen
        features = torch.cat(forward_crops(self.backbone, views))  # one backbone pass per crop size
        z = F.normalize(self.projector(features), dim=1)  # the head once, on every crop
        embeddings = z.chunk(len(views))
        logits = self.head(z, frozen).chunk(len(views))
        with torch.no_grad():
            scores = [logits[s].detach() for s in range(2)]  # fp32: the head and the solver run outside autocast
            queues = self.queues if self.queue_in_use else []
            if self.queue_full:  # SwAV uses the queue once it is full
                scores = [
                    torch.cat([self.head(torch.tensor_split(q.rows, world_size())[rank()], frozen=True), x])
                    for q, x in zip(queues, scores)
                ]
            with section("solver"):  # both crops' problems in one call
                codes = sinkhorn(torch.stack(scores), cfg.epsilon, cfg.sinkhorn_iterations)[:, -len(embeddings[0]) :].unbind(0)
            for q, z in zip(queues, embeddings):
                q.push(z.detach())  # the rows of every process
        return swapped_prediction_loss(codes, logits, cfg.temperature), {}

    def after_step(self, step: StepInfo) -> None:
        # main_swav.py normalises the prototypes before every step; weight decay would shrink them
        self.head.renormalize_()
