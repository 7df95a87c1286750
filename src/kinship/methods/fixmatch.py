"""FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", 2020): a pseudo-label from the weak view, kept where confident, taught to the strong view.

One step, for a labeled batch (x, y) and an unlabeled batch u (the whole train split, labels unused):
    logits = h(f(cat[weak(x), weak(u), strong(u)]))        one forward (BN over all three, as the code)
    L_s = CE(h(weak(x)), y)
    p = softmax(h(weak(u)))                                no gradient
    L_u = mean_u 1(max p > tau) CE(h(strong(u)), argmax p)
    L = L_s + lambda_u L_u
The evaluated model is an EMA of the network (momentum 0.999) that never runs forward in training
and so takes the online network's BN statistics. With lambda_u = 0 only the labeled batch is drawn
and computed: the supervised-only baseline of SsCL's Tables 2 and 3 ("Supervised").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.ema import EMATarget
from kinship.config import AugmentConfig, ConfigError, MethodConfig, RunConfig, check
from kinship.losses import pseudo_label_loss
from kinship.methods.base import Batch, Method, StepInfo, TrainData


def weak_view() -> AugmentConfig:
    """FixMatch's weak view: flip and a translation by up to 12.5 % (reflect padding)."""
    return AugmentConfig(crop_mode="pad", pad=4, jitter_p=0.0, grayscale_p=0.0)


@dataclass
class FixMatchConfig(MethodConfig):
    name: str = "fixmatch"
    needs_labeled_batch: ClassVar[bool] = True
    pseudo_label_weight: float = 1.0  # lambda_u; 0: the supervised-only baseline
    threshold: float = 0.95  # tau; strict: max p > tau
    momentum: float = 0.999  # the evaluated EMA
    weak: AugmentConfig = field(default_factory=weak_view)
    # the weak view's flip and translation, RandAugment (2 operations, random magnitude) and Cutout
    strong: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_mode="pad", pad=4, jitter_p=0.0, grayscale_p=0.0, randaugment=2, cutout=0.5)
    )

    def validate(self, run: RunConfig) -> None:
        for key, recipe in (("weak", self.weak), ("strong", self.strong)):
            check(recipe.randaugment >= 0 and 0 <= recipe.cutout <= 1, f"method.{key}: randaugment >= 0 and cutout in [0, 1]")
        check(self.pseudo_label_weight >= 0, f"method.pseudo_label_weight must be >= 0, got {self.pseudo_label_weight}")
        check(0 <= self.threshold <= 1, f"method.threshold must be in [0, 1], got {self.threshold}")
        check(0 <= self.momentum <= 1, f"method.momentum must be in [0, 1], got {self.momentum}")
        check(
            run.train.labeled_batch_size > 0,
            f"method {self.name} needs a labeled batch at every step: set train.labeled_batch_size (the papers: 64) "
            "and a labeled subset (data.labeled_per_class or data.labeled_fraction)",
        )


class FixMatch(Method):
    Config = FixMatchConfig

    def __init__(self, config: FixMatchConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        self.classifier = nn.Linear(backbone.feature_dim, data.num_classes)  # h
        self.ema = EMATarget(*self.ema_modules())  # the evaluated model: [f, h]
        self.ema.update(config.momentum)  # each step's move made in the previous after_step (see MoCoV2)
        if data.labels is not None and self.uses_unlabeled and len(data.labeled) == data.size:
            raise ConfigError(
                f"method {config.name} learns from unlabeled images and every training label is known: "
                "choose a labeled subset (data.labeled_per_class or data.labeled_fraction)"
            )

    def ema_modules(self) -> tuple[nn.Module, ...]:
        """The online modules the EMA follows, the backbone first and the classifier last."""
        return self.backbone, self.classifier

    @property
    def uses_unlabeled(self) -> bool:
        return self.config.pseudo_label_weight > 0

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.weak

    @property
    def eval_backbone(self) -> nn.Module:
        return self.ema[0]

    def classifiers(self) -> dict[str, nn.Module]:
        return {"ema": self.chain(self.ema[0], self.ema[-1]), "online": self.chain(self.backbone, self.classifier)}

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        cfg = self.config
        return [cfg.weak] if labeled else [cfg.weak, cfg.strong] if self.uses_unlabeled else []

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        """[weak(x)] of the labeled batch, then [weak(u), strong(u)] of the unlabeled one (not drawn
        in a supervised-only run)."""
        if batch.labeled is None:
            raise ConfigError(f"method {self.config.name} needs train.labeled_batch_size > 0")
        views = make_views(batch.labeled, self.view_recipes(labeled=True), step.generator)
        if self.uses_unlabeled:
            views += make_views(batch, self.view_recipes(), step.generator)
        return views

    def classify(self, *views: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The backbone's features of all ``views`` in one pass (BN over all of them), and each
        view's logits (fp32)."""
        features = self.backbone(torch.cat(views))
        return features, self.classifier(features).float().split([len(v) for v in views])

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg, labels = self.config, batch.labeled.labels
        if not self.uses_unlabeled:  # supervised-only: L_s on the labeled batch alone
            loss_sup = F.cross_entropy(self.classifier(self.backbone(views[0])).float(), labels)
            return loss_sup, {"loss_sup": loss_sup.detach()}
        _, (logits_x, logits_weak, logits_strong) = self.classify(*views)
        loss_sup = F.cross_entropy(logits_x, labels)
        p = torch.softmax(logits_weak.detach(), dim=1)
        loss_pl, mask = pseudo_label_loss(logits_strong, p, cfg.threshold)
        loss = loss_sup + cfg.pseudo_label_weight * loss_pl
        return loss, {"loss_sup": loss_sup.detach(), "loss_pl": loss_pl.detach(), **self.pseudo_label_logs(p, mask, batch)}

    def pseudo_label_logs(self, p: torch.Tensor, mask: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The share of confident pseudo-labels and, where the true labels are known, their accuracy."""
        logs = {"mask_rate": mask.mean()}
        truth = self.data.true_labels
        if truth is not None:
            correct = (p.argmax(dim=1) == truth[batch.index]).float()
            logs["pseudo_accuracy"] = (correct * mask).sum() / mask.sum().clamp_min(1)
        return logs

    def after_step(self, step: StepInfo) -> None:
        self.ema.update(self.config.momentum, copy_buffers=True)  # it never runs forward: the online BN statistics
