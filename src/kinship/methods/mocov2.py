"""MoCo v2 (Chen et al., 2020; He et al., 2020): InfoNCE against a queue of momentum-encoded keys.

    q = normalize(head_q(f_q(x1)));  k = normalize(head_k(f_k(x2)))   (key encoder = EMA, no grad)
    logits = [q.k, q.Queue] / T, cross-entropy with target 0
    enqueue the keys of all processes AFTER the logits, so a batch never holds its own keys
    as negatives (MSF/CMSF enqueue before their search: the opposite order).
Under DDP the key batch is shuffled across processes (shuffle-BN) so that BN statistics cannot
leak which key matches which query; on one process that shuffle is a no-op. With shuffle-BN, BN stays
per process (no SyncBN, as ``moco/builder.py``): global statistics would undo the shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.ema import EMATarget
from kinship.blocks.queue import FifoQueue
from kinship.blocks.shuffle_bn import shuffled_forward
from kinship.config import AugmentConfig, MethodConfig, RunConfig, check
from kinship.losses import info_nce_with_queue
from kinship.methods.base import Batch, Method, StepInfo, TrainData
from kinship.models.heads import mlp


@dataclass
class MoCoV2Config(MethodConfig):
    name: str = "mocov2"
    # MoCo CIFAR demo: K 4096, m 0.99, T 0.1, dim 128; ImageNet: 65536, 0.999, 0.2.
    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.1
    dim: int = 128
    head_hidden: int = 0  # 0: the backbone's feature dimension (MoCo v2's 2048 -> 2048 -> 128)
    head_layers: int = 2  # 1: one Linear (MoCo v1 and the MoCo CIFAR demo's fc head)
    symmetric: bool = False
    shuffle_bn: bool = True
    # "aug+" with the CIFAR demo's crop scale and no blur; ImageNet: crop (0.2, 1), blur p 0.5.
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.08, 1.0), saturation=0.4, hue=0.1, blur_p=0.0)
    )

    def validate(self, run: RunConfig) -> None:
        check(self.queue_size >= 1, f"method.queue_size must be >= 1, got {self.queue_size}")
        check(0 <= self.momentum <= 1, f"method.momentum must be in [0, 1], got {self.momentum}")
        check(self.temperature > 0, f"method.temperature must be > 0, got {self.temperature}")
        check(self.head_layers >= 1, f"method.head_layers must be >= 1, got {self.head_layers}")


class MoCoV2(Method):
    Config = MoCoV2Config

    def __init__(self, config: MoCoV2Config, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        hidden = config.head_hidden or backbone.feature_dim
        self.head = mlp(backbone.feature_dim, hidden, config.dim, batch_norm=False, layers=config.head_layers)
        self.key_encoder = EMATarget(backbone, self.head)
        # moco/builder.py moves the key encoder before encoding each step's keys, the first step
        # included; here each step's move is made in the previous step's after_step, and the first
        # one now (a copy moved toward itself: equal up to rounding), so the key encoder passes
        # through the official code's sequence of weights, bit for bit.
        self.key_encoder.update(config.momentum)
        self.queue = FifoQueue(config.queue_size, config.dim)

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.augment

    @property
    def per_process_batch_norm(self) -> bool:
        return self.config.shuffle_bn

    def encode_keys(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.no_grad():
            keys = shuffled_forward(self.key_encoder, x, seed) if self.config.shuffle_bn else self.key_encoder(x)
        return F.normalize(keys.to(self.queue.rows.dtype), dim=1)  # fp32 logits under autocast

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        return [self.config.augment, self.config.augment]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        return make_views(batch, self.view_recipes(), step.generator)

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        x1, x2 = views
        queries = F.normalize(self.head(self.backbone(torch.cat([x1, x2]) if self.config.symmetric else x1)), dim=1)
        keys = [self.encode_keys(x2, step.shared_seed)]
        if self.config.symmetric:
            keys.append(self.encode_keys(x1, step.shared_seed + 1))
        loss = info_nce_with_queue(queries.to(keys[0].dtype), torch.cat(keys), self.queue.rows.clone(), self.config.temperature)
        # after the logits (a batch never sees its own keys as negatives), one view at a time: the
        # queue then holds [keys of view 2 of every process, keys of view 1 ...], the order of one
        # process fed the global batch
        for view_keys in keys:
            self.queue.push(view_keys)
        return loss * (2 if self.config.symmetric else 1), {}

    def after_step(self, step: StepInfo) -> None:
        self.key_encoder.update(self.config.momentum)  # the weights the next step's keys use
