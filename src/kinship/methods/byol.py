"""BYOL (Grill et al., 2020): predict the EMA target's projection of the other view.

online: backbone -> projector -> predictor;  target: EMA(backbone -> projector), no gradient.
    loss = l(t -> t') + l(t' -> t),   l = 2 - 2 cos(pred(online(t)), target(t'))
    tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, applied after the optimizer step.
``symmetric: false`` keeps one direction only (BYOL-asym of the CMSF/MSF tables). With ``per_view_bn``
(default, as BYOL's code) each view goes through the online and the target network in its own pass,
so BN statistics never mix the two asymmetric views; off, the symmetric loss forwards both in one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.ema import EMATarget
from kinship.blocks.multicrop import forward_crops
from kinship.config import AugmentConfig, MethodConfig, RunConfig, check
from kinship.losses import byol_loss
from kinship.methods.base import Batch, Method, StepInfo, TrainData
from kinship.models.heads import mlp
from kinship.optim import cosine_ramp


@dataclass
class BYOLConfig(MethodConfig):
    name: str = "byol"
    projector_hidden: int = 4096
    projector_dim: int = 256
    predictor_hidden: int = 4096
    momentum_base: float = 0.99  # 0.996 for 1000 ImageNet epochs
    momentum_final: float = 1.0
    symmetric: bool = True
    per_view_bn: bool = True  # one forward pass (BN statistics) per view, as the official code
    # CIFAR recipe (solo-learn asymmetric.yaml): no blur, solarize 0 / 0.2. ImageNet: blur 1.0 / 0.1.
    view1: AugmentConfig = field(default_factory=lambda: AugmentConfig(blur_p=0.0, solarize_p=0.0))
    view2: AugmentConfig = field(default_factory=lambda: AugmentConfig(blur_p=0.0, solarize_p=0.2))

    def validate(self, run: RunConfig) -> None:
        check(
            0 <= self.momentum_base <= self.momentum_final <= 1,
            f"method.momentum_base <= momentum_final must lie in [0, 1], got {self.momentum_base}, {self.momentum_final}",
        )


class BYOL(Method):
    Config = BYOLConfig

    def __init__(self, config: BYOLConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        self.projector = mlp(backbone.feature_dim, config.projector_hidden, config.projector_dim)
        self.predictor = mlp(config.projector_dim, config.predictor_hidden, config.projector_dim)
        self.target = EMATarget(backbone, self.projector)

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.view1

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        return [self.config.view1, self.config.view2]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        return make_views(batch, self.view_recipes(), step.generator)

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        online_views = views if cfg.symmetric else views[:1]
        predictions = forward_crops(lambda x: self.predictor(self.projector(self.backbone(x))), online_views, cfg.per_view_bn)
        with torch.no_grad():
            targets = forward_crops(self.target, views[::-1] if cfg.symmetric else views[1:], cfg.per_view_bn)
        loss = sum(byol_loss(p, z) for p, z in zip(predictions, targets))  # l(v1 -> v2) [+ l(v2 -> v1)]
        return loss, {}

    def begin_step(self, step: StepInfo) -> dict[str, float]:
        return {"momentum": self.momentum(step)}

    def momentum(self, step: StepInfo) -> float:
        return cosine_ramp(step.step, step.total_steps, self.config.momentum_base, self.config.momentum_final)

    def after_step(self, step: StepInfo) -> None:
        self.target.update(self.momentum(step))
