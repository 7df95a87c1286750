"""Supervised pre-training with cross-entropy: the fully labeled baseline the papers compare with
(CMSF Table 2's "Supervised", SsCL Table 2's and Table 3's), trained and evaluated like every method.

    logits = h(f(aug(x)));  L = CE(logits, y)
The view is the standard random-resized crop and flip, without colour augmentation (the ImageNet
recipe of torchvision's reference training). Images whose label is hidden are left out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.config import AugmentConfig, ConfigError, MethodConfig, RunConfig, check
from kinship.methods.base import Batch, Method, StepInfo, TrainData


@dataclass
class SupervisedConfig(MethodConfig):
    name: str = "supervised"
    label_smoothing: float = 0.0
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(jitter_p=0.0, grayscale_p=0.0))

    def validate(self, run: RunConfig) -> None:
        check(0 <= self.label_smoothing < 1, f"method.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class Supervised(Method):
    Config = SupervisedConfig

    def __init__(self, config: SupervisedConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        if data.labels is not None and not (data.labels >= 0).any():
            raise ConfigError("method supervised needs training labels, and this data has none")
        self.classifier = nn.Linear(backbone.feature_dim, data.num_classes)

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.augment

    def classifiers(self) -> dict[str, nn.Module]:
        return {"online": self.chain(self.backbone, self.classifier)}

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        return [self.config.augment]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        return make_views(batch, self.view_recipes(), step.generator)

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        logits = self.classifier(self.backbone(views[0])).float()
        known = (batch.labels >= 0).float()
        per_sample = F.cross_entropy(
            logits, batch.labels.clamp_min(0), reduction="none", label_smoothing=self.config.label_smoothing
        )
        loss = (per_sample * known).sum() / known.sum().clamp_min(1)
        accuracy = ((logits.argmax(1) == batch.labels).float() * known).sum() / known.sum().clamp_min(1)
        return loss, {"train_accuracy": 100 * accuracy}
