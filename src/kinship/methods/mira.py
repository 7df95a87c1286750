"""MIRA (Lee et al., NeurIPS 2022): swapped prediction of mutual-information regularised
pseudo-labels, computed by a fixed-point iteration on the teacher's prototype logits.

    s_v = head(g(f(crop_v)))                         cosine logits of the student, every crop
    t_g = head(g_t(f_t(crop_g)))                     EMA teacher, the 2 global crops, no gradient
    W_g = argmin (1/B) sum KL(w_i || softmax(t_i / tau_t)) - beta I(Y_W; i)   (Eq. 1-7, blocks.assignment)
    loss = mean_g mean_{v != g} CE(W_g, softmax(s_v / tau_s))                   (Eq. 8, code's normalisation)
beta follows a cosine from 0.7 to 2/3 and the EMA momentum from m0 to 1 over all steps (A.4.1); the
teacher uses the student's prototypes (copied, not averaged, as the official code); the prototypes are
frozen in epoch 0 (the code's ``--freeze-head-epochs 1``). No equipartition, centering or queue: the
MI term alone prevents collapse. The EMA backbone is the one evaluated (A.4.1).

Batch norm: with ``per_view_bn`` (default, as the official code) each crop goes through the student
and the teacher in its own pass, so BN never mixes the two asymmetric views; off, the global crops
share one pass (and the local crops another), as SwAV's code groups them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.assignment import mira_targets
from kinship.blocks.ema import EMATarget
from kinship.blocks.multicrop import forward_crops
from kinship.config import AugmentConfig, MethodConfig, RunConfig, check
from kinship.losses import swapped_prediction_loss
from kinship.methods.base import Batch, Method, StepInfo, TrainData
from kinship.models.heads import PrototypeHead, mlp
from kinship.optim import cosine_ramp
from kinship.runtime import section


@dataclass
class MIRAConfig(MethodConfig):
    name: str = "mira"
    prototypes: int = 3000  # K (A.4.1)
    dim: int = 256
    hidden: int = 2048  # projector F-2048-2048-256 (A.4.1)
    tau_student: float = 0.1
    tau_teacher: float = 0.225
    beta_start: float = 0.7  # cosine 0.7 -> 2/3 per step (A.4.1)
    beta_end: float = 2 / 3
    iterations: int = 30  # fixed-point iterations (A.4.1)
    momentum_base: float = 0.99  # EMA m0 -> 1, cosine (A.4.1; 0.996 for 800 epochs)
    ema_teacher: bool = True  # false: the student (without gradient) is its own teacher
    freeze_prototypes_epochs: int = 1  # the official code's --freeze-head-epochs 1
    per_view_bn: bool = True  # one forward pass (BN statistics) per crop, as the official code
    local_crops: int = 0  # multi-crop: extra small crops predicting both targets (ImageNet: 6 x 96)
    # CIFAR (A.4.1 and the official code's CIFARTransform): RRC(0.2, 1), jitter (0.4, 0.4, 0.2, 0.1)
    # p 0.8, gray 0.2, no blur, solarize 0.2 on the second view. ImageNet: blur 1.0 / 0.1 and RRC(0.14, 1).
    view1: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=(0.2, 1.0), blur_p=0.0))
    view2: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=(0.2, 1.0), blur_p=0.0, solarize_p=0.2))
    local: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_size=16, crop_scale=(0.05, 0.14), blur_p=0.0))

    def validate(self, run: RunConfig) -> None:
        check(0 <= self.beta_start < 1 and 0 <= self.beta_end < 1, "method.beta_start and beta_end must lie in [0, 1)")
        check(self.tau_teacher > 0 and self.tau_student > 0, "method.tau_teacher and tau_student must be > 0")
        check(self.prototypes >= 1 and self.iterations >= 1, "method.prototypes and method.iterations must be >= 1")
        check(0 <= self.momentum_base <= 1, f"method.momentum_base must be in [0, 1], got {self.momentum_base}")


class MIRA(Method):
    Config = MIRAConfig

    def __init__(self, config: MIRAConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        self.projector = mlp(backbone.feature_dim, config.hidden, config.dim, layers=3)
        self.head = PrototypeHead(config.dim, config.prototypes)
        if config.ema_teacher:
            self.teacher = EMATarget(backbone, self.projector)
        # this step's beta (set by begin_step) and whether the prototypes are frozen
        self.register_buffer("beta", torch.tensor(float(config.beta_start)), persistent=False)
        self.prototypes_frozen = config.freeze_prototypes_epochs > 0

    @property
    def eval_backbone(self) -> nn.Module:
        return self.teacher[0] if self.config.ema_teacher else self.backbone

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.view1

    @property
    def unused_parameters(self) -> bool:
        return self.config.freeze_prototypes_epochs > 0

    def cluster_scores(self, features: torch.Tensor) -> torch.Tensor:
        projector = self.teacher[1] if self.config.ema_teacher else self.projector
        return self.head(projector(features), frozen=True)

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        cfg = self.config
        return [cfg.view1, cfg.view2, *[cfg.local] * cfg.local_crops]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        return make_views(batch, self.view_recipes(), step.generator)

    def begin_step(self, step: StepInfo) -> dict[str, float]:
        beta = cosine_ramp(step.step, step.total_steps, self.config.beta_start, self.config.beta_end)
        self.beta.fill_(beta)  # a tensor: the compiled forward neither guards on it nor recompiles
        self.prototypes_frozen = step.epoch < self.config.freeze_prototypes_epochs
        return {"beta": beta}

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        frozen = self.prototypes_frozen
        logits = forward_crops(lambda x: self.head(self.projector(self.backbone(x)), frozen), views, cfg.per_view_bn)
        with torch.no_grad():
            teacher = self.teacher if cfg.ema_teacher else nn.Sequential(self.backbone, self.projector)
            teacher_logits = forward_crops(lambda x: self.head(teacher(x), frozen=True), views[:2], cfg.per_view_bn)
            with section("solver"):
                targets = mira_targets(torch.stack(teacher_logits), cfg.tau_teacher, self.beta, cfg.iterations).unbind(0)
        loss = swapped_prediction_loss(targets, logits, cfg.tau_student)
        marginal = torch.cat(targets).mean(0)
        return loss, {"target_entropy": -(marginal * marginal.clamp_min(1e-12).log()).sum()}

    def after_step(self, step: StepInfo) -> None:
        # the official code (movinghoon/mira train.py, Model.forward and _train_step) moves the teacher at
        # the start of step t + 1, before its forward, with the momentum of step t + 1; done here after the
        # optimizer step of step t with that same momentum: the same teacher weights at every forward
        if self.config.ema_teacher:
            self.teacher.update(cosine_ramp(step.step + 1, step.total_steps, self.config.momentum_base, 1.0))
