"""CoKe (Qian et al., CVPR 2022): online constrained k-means; cluster discrimination on pseudo-labels
from an online clustering whose every cluster keeps at least gamma' N / K images.

    x_v = normalize(g(f(crop_v))), q_v = normalize(h(g(f(crop_v))))     projection and prediction, every crop
    per clustering head (centres C, duals rho, one label per image):
      y_prev = labels[i]                                 read before this step overwrites it (Table 2)
      loss   = pred_weight CE(q_v C_prev / lambda, t_v) + (1 - pred_weight) CE(x_v C_prev / lambda, t_v)   (Eq. 14, App. B.2.4)
               t_v = onehot(y_prev)                                               one view, stage 1
                   | alpha onehot(y_prev) + (1 - alpha) softmax(x_other C_prev / lambda)   two views (Alg. 2)
                   | smoothed moving average of the labels of epochs T'..t-1            one view, stage 2 (Sec. 3.4)
      xbar   = mean_v x_v over the global crops, not renormalised               (Eq. 17)
      y      = argmax(xbar C_run + rho)                                         (Eq. 10; C_prev in stage 2)
      rho   <- rho - eta (counts / b - gamma' / K), clamped at 0 when gamma' < 1 (Eq. 18)
      C_run <- running mean of the epoch's features per cluster, renormalised per batch (official code; Eq. 13: once)
      labels[i] <- y
    end of epoch: C_prev <- C_run (stage 2: a moving average of the epochs' centres)
The loss uses the previous epoch's labels and centres ("decoupling", Table 2: the current labels
collapse). Epoch 0 is a scan (Sec. 3.3): forward, assign, update the centres and duals, no backward,
no optimizer state; its last step also assigns the images that the dropped tail of the epoch left
out, so every image has a label before training. Several heads with different K share the
features, the loss is their mean (Table 4); the clustering evaluated is the head whose K equals the
number of classes (App. B.4), argmax x^T C_prev without the duals (they constrain the training set).
Local crops (multi-crop) predict alpha onehot + (1 - alpha) (p_1 + p_2) / 2 and never assign;
loss = (1 - w) loss_global + w loss_local (``small_crop_weight``, the official code's --coke-beta).

All clustering state (centres, sums, counts, duals, labels, label slots) is buffers, identical on
every process: features and labels of the global batch are all-reduced or gathered
(``blocks.assignment``), in fp32 with autocast off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.assignment import ClusteringHead, constrained_assignment, slot_targets
from kinship.blocks.multicrop import forward_crops
from kinship.config import AugmentConfig, MethodConfig, RunConfig, check
from kinship.losses import soft_cross_entropy
from kinship.methods.base import Batch, Method, StepInfo, TrainData
from kinship.models.heads import mlp
from kinship.runtime import all_gather_cat, rank, section, world_size
from kinship.sampling import Shard


@dataclass
class CoKeConfig(MethodConfig):
    name: str = "coke"
    clusters: list[int] = field(default_factory=lambda: [3000, 4000, 5000])  # K of each head (Table 4); CIFAR: 10..100
    gamma: float = 0.4  # gamma': every cluster >= gamma' N / K (ImageNet 0.4, CIFAR 0.9; 1: balanced, 0: no bound)
    eta: float = 20.0  # dual step (Eq. 18): ImageNet 20 at batch 1024, CIFAR 0.1 at 128; 0: greedy assignment
    temperature: float = 0.05  # lambda (Eq. 14): 0.1 one view, 0.05 two views and multi-crop
    views: int = 2  # 1 | 2 (Sec. 3.4)
    alpha: float = 0.2  # one-hot weight of the two-view target (Alg. 2, Table 11)
    pred_weight: float = 0.5  # prediction head's share of the loss (App. B.2.4, Table 12); 0: no prediction head
    dim: int = 128
    hidden: int = 2048  # projection F-2048-2048-128 ending in BN, prediction 128-2048-128 (official code)
    local_crops: int = 0  # multi-crop: small crops that predict the global crops' targets (ImageNet: 6 x 96)
    small_crop_weight: float = 0.5  # loss = (1 - w) global + w local (official code's --coke-beta)
    scan_epochs: int = 1  # epochs that only assign (Sec. 3.3), before the learning-rate schedule
    loss_labels: Literal["previous", "current"] = "previous"  # the labels the loss uses (Table 2)
    loss_centres: Literal["previous", "current"] = "previous"  # the centres the loss uses (Table 2)
    # per_batch: the official code's running mean, renormalised after every batch (idstcv/CoKe
    # coke/builder_double_view.py), which produced the paper's numbers; mean: Eq. 13 as printed, the
    # epoch's mean feature per cluster normalised once (running centres 0.04-0.07 apart from the official ones)
    centre_update: Literal["per_batch", "mean"] = "per_batch"
    moving_average_after: int = 0  # one view: stage 2 after this many training epochs (Sec. 3.4: 160 of 200); 0: off
    label_slots: int = 5  # L: moving-average labels kept per image (Sec. 3.4)
    label_temperature: float = 0.5  # lambda': smoothing of the moving-average labels (Sec. 3.4)
    per_view_bn: bool = True  # one forward pass (BN statistics) per crop, as the official code
    # two views: the official code's BYOL-style asymmetric pair (jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray
    # 0.2, blur 1.0 / 0.1, solarize 0 / 0.2); blur off at 32 px (kinship's CIFAR convention). One view:
    # SimCLR's strong jitter (0.8, 0.8, 0.8, 0.2), set in the one-view preset
    view1: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=(0.08, 1.0)))
    view2: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=(0.08, 1.0), solarize_p=0.2))
    local: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(
            crop_size=16, crop_scale=(0.05, 0.6), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2
        )
    )

    def validate(self, run: RunConfig) -> None:
        check(
            len(self.clusters) >= 1 and all(k >= 2 for k in self.clusters),
            f"method.clusters: one K >= 2 per head, got {self.clusters}",
        )
        check(
            0 <= self.gamma <= 1, f"method.gamma (the lower bound gamma' N / K as a fraction) must be in [0, 1], got {self.gamma}"
        )
        check(
            self.eta >= 0 and self.temperature > 0 and self.label_temperature > 0,
            "method.eta must be >= 0, method.temperature and label_temperature > 0",
        )
        check(self.views in (1, 2), f"method.views must be 1 or 2, got {self.views}")
        check(
            0 <= self.alpha <= 1 and 0 <= self.pred_weight <= 1 and 0 <= self.small_crop_weight <= 1,
            "method.alpha, pred_weight and small_crop_weight must lie in [0, 1]",
        )
        check(self.local_crops >= 0 and (self.local_crops == 0 or self.views == 2), "method.local_crops needs method.views: 2")
        check(self.scan_epochs >= 0 and self.label_slots >= 1, "method.scan_epochs must be >= 0 and label_slots >= 1")
        check(
            0 <= self.moving_average_after < run.train.epochs,
            f"method.moving_average_after must be in [0, train.epochs), got {self.moving_average_after}",
        )
        check(
            self.moving_average_after == 0 or self.views == 1,
            "method.moving_average_after is the one-view stage 2: set method.views: 1",
        )


class CoKe(Method):
    Config = CoKeConfig

    def __init__(self, config: CoKeConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        self.projector = nn.Sequential(
            *mlp(backbone.feature_dim, config.hidden, config.dim, layers=3), nn.BatchNorm1d(config.dim)
        )
        if config.pred_weight > 0:
            self.predictor = mlp(config.dim, config.hidden, config.dim)
        slots = config.label_slots if config.moving_average_after else 0
        self.heads = nn.ModuleList(
            ClusteringHead(k, config.dim, data.size, slots, config.centre_update == "per_batch") for k in config.clusters
        )
        # the epoch's phase, set by begin_step: the centres the assignment uses, the label averaging
        self.stage2 = self.averaged_targets = False
        self.register_buffer("average_weight", torch.ones(()), persistent=False)  # 1 / epochs averaged (stage 2)

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.view1

    @property
    def scan_epochs(self) -> int:
        return self.config.scan_epochs

    @property
    def evaluated_head(self) -> ClusteringHead:
        """The head whose K is the number of classes (App. B.4), else the first."""
        return next((h for h in self.heads if h.k == self.data_info.num_classes), self.heads[0])

    def cluster_scores(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.projector(features).float(), dim=1)
        return x @ self.evaluated_head.centres.previous.T

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, dim) projections, followed by their (B, dim) predictions when the method has a prediction head."""
        z = self.projector(self.backbone(crops))
        return torch.cat([z, self.predictor(z)], dim=1) if self.config.pred_weight > 0 else z

    def training_epoch(self, epoch: int) -> int:
        return epoch - self.config.scan_epochs

    def in_stage2(self, epoch: int) -> bool:
        return self.config.moving_average_after > 0 and self.training_epoch(epoch) >= self.config.moving_average_after

    def moving_average_weight(self, epoch: int) -> float:
        """1 / (epochs averaged so far, this one included) in stage 2 (Sec. 3.4); 1 outside it."""
        if not self.in_stage2(epoch):
            return 1.0
        return 1.0 / (self.training_epoch(epoch) - self.config.moving_average_after + 1)

    def begin_step(self, step: StepInfo) -> dict[str, float]:
        self.stage2 = self.in_stage2(step.epoch)
        self.averaged_targets = self.in_stage2(step.epoch - 1)  # one view: the averaged labels exist from then on
        self.average_weight.fill_(self.moving_average_weight(step.epoch))
        return {}

    # -- the batch, and in the scan's last step the images the dropped tail left out --------------
    def step_batch(self, batch: Batch, step: StepInfo) -> Batch:
        """In the scan's last step, also the images no batch of the epoch held (``batch.extra``, split
        over the processes), so that every image has a label before training."""
        if step.update or step.step_in_epoch != step.steps_per_epoch - 1:
            return batch
        unlabeled = self.heads[0].labels < 0
        unlabeled[all_gather_cat(batch.index)] = False
        tail = unlabeled.nonzero().squeeze(1)
        if not len(tail):
            return batch
        shares = torch.tensor_split(tail, world_size())
        mine, start = shares[rank()], sum(len(share) for share in shares[: rank()])
        extra = self.data.read(mine) if len(mine) else Batch(mine, None, mine)
        return dataclasses.replace(batch, extra=dataclasses.replace(extra, shard=Shard(start, len(mine), len(tail))))

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        cfg = self.config
        return [cfg.view1, cfg.view2][: cfg.views] + [cfg.local] * cfg.local_crops

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        cfg = self.config
        recipes = self.view_recipes()[: cfg.views + (cfg.local_crops if step.update else 0)]  # the scan: global views only
        views = make_views(batch, recipes, step.generator)
        if batch.extra is not None and len(batch.extra.index):
            views = [torch.cat([v, t]) for v, t in zip(views, make_views(batch.extra, recipes, step.generator))]
        return views

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        index, sizes = batch.index, None
        if batch.extra is not None:  # every process's rows: its batch and its share of the tail
            index = torch.cat([index, batch.extra.index])
            shares = torch.tensor_split(torch.arange(batch.extra.shard.total), world_size())
            sizes = [len(batch.index) + len(share) for share in shares]
        stage2 = self.stage2
        outputs = forward_crops(self.embed, views, cfg.per_view_bn)
        x = [F.normalize(out[:, : cfg.dim].float(), dim=1) for out in outputs]  # projections
        q = [F.normalize(out[:, cfg.dim :].float(), dim=1) for out in outputs] if cfg.pred_weight > 0 else []  # predictions
        xbar = torch.stack(x[: cfg.views]).mean(0).detach()  # Eq. 17: not renormalised
        with section("solver"):
            previous = [head.labels[index] for head in self.heads]  # read before this step writes (Table 2)
            assigned = [
                constrained_assignment(xbar, head.centres.previous if stage2 else head.centres.running, head.duals)
                for head in self.heads
            ]
        if not step.update:  # scan: assignment only
            self.update_clusters(xbar, index, sizes, assigned)
            return torch.zeros((), device=xbar.device), {}
        losses = []
        for head, y_prev, y_now in zip(self.heads, previous, assigned):
            centres = head.centres.previous if cfg.loss_centres == "previous" else head.centres.running.clone()
            labels = y_prev if cfg.loss_labels == "previous" else y_now
            labels = torch.where(labels >= 0, labels, y_now)  # no scan epoch: an image's first epoch uses its current label
            losses.append(self.head_loss(head, centres, labels, index, x, q))
        loss = torch.stack(losses).mean()
        self.update_clusters(xbar, index, sizes, assigned)
        return loss, {"dual_max": self.heads[0].duals.max()}

    def head_loss(
        self,
        head: ClusteringHead,
        centres: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor,
        x: list[torch.Tensor],
        q: list[torch.Tensor],
    ) -> torch.Tensor:
        """Eq. 14 for one head: soft cross-entropy of every crop's projection (and prediction) logits
        against its target, the global crops' mean and the local crops' mean weighted."""
        cfg = self.config
        with torch.autocast(centres.device.type, enabled=False):
            proj = [v @ centres.T for v in x]
            pred = [v @ centres.T for v in q]
        onehot = torch.zeros_like(proj[0]).scatter_(1, labels.unsqueeze(1), 1.0)  # F.one_hot reads the labels' range back
        if cfg.views == 2:  # Alg. 2: the other view's projection against C_prev is the reference
            reference = [torch.softmax(p.detach() / cfg.temperature, dim=1) for p in proj[:2]]
            targets = [cfg.alpha * onehot + (1 - cfg.alpha) * reference[1 - v] for v in range(2)]
            targets += [cfg.alpha * onehot + (1 - cfg.alpha) * (reference[0] + reference[1]) / 2] * cfg.local_crops
        elif self.averaged_targets:  # one view, after the first stage-2 epoch: moving-average labels
            soft = slot_targets(head.slots[index], head.slot_weights[index], head.k, cfg.label_temperature)
            targets = [torch.where(soft.sum(1, keepdim=True) > 0, soft, onehot)]
        else:
            targets = [onehot]

        def crop_loss(v: int) -> torch.Tensor:
            loss = (1 - cfg.pred_weight) * soft_cross_entropy(proj[v], targets[v], cfg.temperature)
            if cfg.pred_weight > 0:
                loss = loss + cfg.pred_weight * soft_cross_entropy(pred[v], targets[v], cfg.temperature)
            return loss

        loss = torch.stack([crop_loss(v) for v in range(cfg.views)]).mean()
        if cfg.local_crops:
            local = torch.stack([crop_loss(v) for v in range(cfg.views, len(x))]).mean()
            loss = (1 - cfg.small_crop_weight) * loss + cfg.small_crop_weight * local
        return loss

    @torch.no_grad()
    def update_clusters(
        self, xbar: torch.Tensor, index: torch.Tensor, sizes: list[int] | None, assigned: list[torch.Tensor]
    ) -> None:
        """Eq. 18 and Eq. 13 on the global batch, then the new labels (gathered) into every table."""
        cfg = self.config
        with section("solver"):
            everyone = all_gather_cat(index, sizes)
            for head, y in zip(self.heads, assigned):
                head.update(xbar, y, cfg.gamma, cfg.eta, per_batch=cfg.centre_update == "per_batch" and not self.stage2)
                head.relabel(everyone, all_gather_cat(y, sizes), self.average_weight if self.stage2 else None)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> dict:
        """Per head, Table 1's cluster sizes and the share of labels that changed; then C_prev <- C_run
        (stage 2: their moving average)."""
        weight = self.moving_average_weight(epoch)
        return {"clusters": [head.end_epoch(self.config.gamma, weight) for head in self.heads]}
