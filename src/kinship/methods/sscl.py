"""SsCL (Zhang and Li, "Semi-supervised Contrastive Learning with Similarity Co-calibration", 2021):
FixMatch's pseudo-labels and MoCo's contrast on one network, each branch calibrating the other.

One step, for a labeled batch (x, y) and an unlabeled batch u (the whole train split, labels unused):
    logits = h(f(cat[weak(x), weak(u), strong(u)]))       one forward, as FixMatch (BN over all three)
    k_u, k_x = normalize(g_k(f_k(weak(u)))), of weak(x)   the momentum key network, no gradient
    L_sup = CE(h(weak(x)), y)                                                    (Eq. 1)
    p_b = softmax(h(weak(u))), p_s = softmax(gamma_s <k_u, P>), p^ = calibrate(p_b, p_s, p~_s)  (Sec. 3.1)
    L_pl = mean_u 1(max p^ > tau) CE(h(strong(u)), argmax p^)                   (Eq. 2)
    q = normalize(g(f(strong(u)))); positives: k_u (alpha 1) and n_pos keys of labeled images of
        u's assigned class c_u, weighted alpha_u = clamp(max_c <k_u, P_c>, 0, 1); negatives: the queue
    L_ctr = mean_u softplus(LSE_n gamma (s_n + m) + LSE_p (-gamma alpha_p s_p))  (Eq. 5, rebuilt from Eq. 10)
    L = L_sup + lambda_pl L_pl + lambda_ctr L_ctr                                (Eq. 3)
    enqueue k_u; write k_x into the labeled key bank
Every S epochs from epoch S (Sec. 4, "offline"), through the key network on the evaluation view:
    the labeled key bank, prototypes P0 = class means of the labeled keys, a first assignment
    argmax p^ of every image, Omega_c = the max(n_c, 10) unlabeled images assigned to c nearest to
    P0[c], n_c mixups lam x_c + (1 - lam) x_near, lam ~ Beta(1, 1) (Eq. 4), P = class means of the
    labeled and mixed keys, the assignment c_u = argmax p_b (Sec. 3.2), and the running mean
    restarted at the mean p_s. Before the first refresh: no calibration, no mined positives (the loss is then
    InfoNCE with every negative shifted by the margin).

Readings where the paper is silent or loose, each a config key: Eq. 5 as above (no official code is
public); c_u is the classifier's argmax as Sec. 3.2 says (``assign: calibrated`` takes the calibrated
argmax instead, a reading of Fig. 5, which credits the prototype mixture with better positive
selection, something the prototypes can only bring through the assignment); alpha is the cosine to
"the predefined most similar class prototype", clamped to [0, 1] and detached (``alpha_prototype:
assigned`` measures it against c_u's prototype); labeled images keep their own label as c_u; the
positive keys come from a bank of labeled keys ("maintained in the key encoder"); the similarity
softmax uses gamma_s = gamma. The classifier branch is FixMatch's (:mod:`kinship.methods.fixmatch`);
SsCL adds the key network, the queue, calibration, the refresh and Eq. 5.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kinship.blocks.calibration import Calibration, RunningMean, calibrate, class_prototypes, similarity_distribution
from kinship.blocks.ema import EMATarget
from kinship.blocks.positives import class_members, sample_members
from kinship.blocks.queue import FifoQueue
from kinship.blocks.shuffle_bn import shuffled_forward
from kinship.config import AugmentConfig, RunConfig, check
from kinship.losses import margin_contrastive_loss, pseudo_label_loss
from kinship.methods.base import Batch, Refresh, StepInfo, TrainData
from kinship.methods.fixmatch import FixMatch, FixMatchConfig
from kinship.models.heads import mlp
from kinship.runtime import all_gather_cat, broadcast
from kinship.sampling import Shard, beta


@dataclass
class SsCLConfig(FixMatchConfig):
    name: str = "sscl"
    pseudo_label_weight: float = 1.0  # lambda_pl (Table 8: CIFAR 1, ImageNet 1 %: 5, 10 %: 10)
    contrastive_weight: float = 1.0  # lambda_ctr (Table 8: CIFAR 1, ImageNet 1 %: 10, 10 %: 5)
    threshold: float = 0.95  # tau (Table 8: CIFAR 0.95, ImageNet 0.6); strict: max p^ > tau
    temperature: float = 0.2  # 1 / gamma of Eq. 5 (Table 8: gamma = 5 on CIFAR, 10 on ImageNet)
    margin: float = -0.25  # m, on the negatives (Table 8)
    positives: int = 3  # n_pos labeled keys of the assigned class (Table 7: 3 best)
    self_paced: bool = True  # alpha from the prototype similarity; false: alpha = 1 (Table 6)
    # the prototype alpha measures against: nearest (Sec. 3.2: "the predefined most similar class
    # prototype") | assigned (the prototype of the class c_u whose keys are the positives)
    alpha_prototype: Literal["nearest", "assigned"] = "nearest"
    calibration: Calibration = "ratio"  # see blocks/calibration.py
    # c_u, whose labeled keys are u's positives: fc, the classifier's argmax p_b (Sec. 3.2: "we assign it to
    # class c if argmax p_b = c") | calibrated: the argmax of p^ (the prototypes then steer the selection)
    assign: Literal["fc", "calibrated"] = "fc"
    similarity_temperature: float = 0.0  # 1 / gamma_s of p_s; 0: temperature
    window: int = 128  # t: batches in the running mean of p_s (Sec. 3.1)
    refresh_every: int = 5  # S epochs between offline refreshes, the first at epoch S (Sec. 4)
    prototype_mixture: bool = True  # Eq. 4: prototypes from the labeled and mixed keys; false: labeled only
    mixup_alpha: float = 1.0  # Beta(alpha, alpha) of Eq. 4
    neighbours_min: int = 10  # |Omega_c| = max(n_c, neighbours_min)
    queue_size: int = 4096  # K (Table 8: CIFAR 4096, ImageNet 65536)
    momentum: float = 0.999  # key network (MoCo); also the evaluated EMA, as FixMatch's 0.999
    dim: int = 64  # projection (Sec. 4.1: 64-d on CIFAR)
    hidden: int = 0  # projector hidden width; 0: the backbone's feature dimension
    shuffle_bn: bool = True  # the key network's batch shuffled across processes (MoCo)
    # the SimCLR recipe, then RandAugment (2 operations, random magnitude) and Cutout (Sec. 4.1:
    # "RandAugment combined with the augmentation strategy in SimCLR")
    strong: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.2, 1.0), saturation=0.4, hue=0.1, randaugment=2, cutout=0.5)
    )

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        check(
            self.contrastive_weight > 0 or (self.pseudo_label_weight > 0 and self.calibration != "none"),
            "method sscl without its contrastive branch and calibration is FixMatch, and without both loss terms the "
            "supervised-only baseline: use method.name fixmatch (with method.pseudo_label_weight 0 for the latter)",
        )
        check(self.contrastive_weight >= 0, f"method.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        check(
            self.temperature > 0 and self.similarity_temperature >= 0,
            "method.temperature must be > 0 and similarity_temperature >= 0",
        )
        check(
            self.positives >= 0 and self.window >= 1 and self.refresh_every >= 1 and self.queue_size >= 1,
            "method.positives >= 0, window, refresh_every and queue_size >= 1",
        )
        check(self.mixup_alpha > 0, f"method.mixup_alpha must be > 0, got {self.mixup_alpha}")
        check(
            self.refresh_every < run.train.epochs,
            f"method.refresh_every ({self.refresh_every}) must be below train.epochs ({run.train.epochs}): the first refresh, "
            "which calibration and the mined positives wait for, would never come",
        )

    @property
    def gamma(self) -> float:
        """Eq. 5's scale, 1 / temperature."""
        return 1 / self.temperature

    @property
    def similarity_gamma(self) -> float:
        """gamma_s of the similarity distribution p_s (Sec. 3.1)."""
        return 1 / (self.similarity_temperature or self.temperature)


class SsCL(FixMatch):
    Config = SsCLConfig

    def __init__(self, config: SsCLConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        classes = data.num_classes
        self.queue = FifoQueue(config.queue_size, config.dim)
        self.running = RunningMean(config.window, classes)  # p~_s
        self.register_buffer("prototypes", torch.zeros(classes, config.dim))  # P
        self.register_buffer("assigned", torch.full((data.size,), -1, dtype=torch.long))  # c_u of every image
        self.refreshed = False  # whether a refresh has assigned the images, known on the host
        self.register_buffer("bank", torch.zeros(data.info.labeled, config.dim))  # K_b: labeled keys, by labeled rank
        if data.labels is not None:  # training (not a checkpoint loaded for evaluation)
            self.register_buffer("labeled_classes", data.labels[data.labeled], persistent=False)
            self.register_buffer("members", class_members(self.labeled_classes, classes), persistent=False)

    def ema_modules(self) -> tuple[nn.Module, ...]:
        """The key network E_k = [f_k, g_k, h_k], also the evaluated EMA; g (2 layers) is made here,
        after h and before the copy."""
        feat = self.backbone.feature_dim
        self.projector = mlp(feat, self.config.hidden or feat, self.config.dim, batch_norm=False)
        return self.backbone, self.projector, self.classifier

    @property
    def uses_unlabeled(self) -> bool:
        return True

    @property
    def unused_parameters(self) -> bool:
        return self.config.contrastive_weight == 0  # keys for calibration only: g untrained

    @property
    def per_process_batch_norm(self) -> bool:
        return self.config.shuffle_bn

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refreshed = bool(len(self.assigned)) and bool(self.assigned.amax() >= 0)  # once per load

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        """FixMatch's [weak(x), weak(u), strong(u)]; after the first refresh, with labeled
        positives, also the draw of each unlabeled image's positives: its rows of the bank (B, n_pos)
        and whether found (B, n_pos) (random draws stay out of the compiled forward)."""
        cfg = self.config
        views = super().views(batch, step)
        if self.refreshed and cfg.contrastive_weight > 0 and cfg.positives > 0:
            views += sample_members(self.members, self.assigned[batch.index], cfg.positives, step.generator, batch.shard)
        return views

    # -- the step -----------------------------------------------------------------------------
    def encode_keys(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.no_grad():
            network = lambda v: self.ema[1](self.ema[0](v))  # noqa: E731
            keys = shuffled_forward(network, x, seed) if self.config.shuffle_bn else network(x)
        return F.normalize(keys.float(), dim=1)

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        x_weak, u_weak, u_strong, *positives = views
        n_x = len(x_weak)
        features, (logits_x, logits_weak, logits_strong) = self.classify(x_weak, u_weak, u_strong)
        loss_sup = F.cross_entropy(logits_x, batch.labeled.labels)  # Eq. 1
        keys = self.encode_keys(torch.cat([x_weak, u_weak]), step.shared_seed)
        p_hat = self.co_calibrated(torch.softmax(logits_weak.detach(), dim=1), keys[n_x:])  # Sec. 3.1
        loss_pl, mask = pseudo_label_loss(logits_strong, p_hat, cfg.threshold)  # Eq. 2
        loss_ctr, logs = torch.zeros((), device=features.device), {}
        if cfg.contrastive_weight > 0:
            loss_ctr, logs = self.contrastive(features[n_x + len(u_weak) :], keys[n_x:], batch, positives)  # Eq. 5
        self.write_labeled_keys(batch.labeled.index, keys[:n_x])
        self.queue.push(keys[n_x:])
        loss = loss_sup + cfg.pseudo_label_weight * loss_pl + cfg.contrastive_weight * loss_ctr  # Eq. 3
        logs.update(self.pseudo_label_logs(p_hat, mask, batch))
        return loss, {"loss_sup": loss_sup.detach(), "loss_pl": loss_pl.detach(), "loss_ctr": loss_ctr.detach(), **logs}

    def co_calibrated(self, p_b: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """p^ from the classifier's p_b and the prototype similarity p_s (Sec. 3.1), once a refresh
        has made the prototypes; p_b before."""
        cfg = self.config
        if not self.refreshed or cfg.calibration == "none":
            return p_b
        p_s = similarity_distribution(keys, self.prototypes, cfg.similarity_gamma)
        self.running.push(p_s.mean(dim=0))
        return calibrate(p_b, p_s, self.running.mean(), cfg.calibration)

    def contrastive(
        self, strong_features: torch.Tensor, own_keys: torch.Tensor, batch: Batch, positives: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict]:
        """Eq. 5 over the unlabeled queries: own key (alpha 1) and, after the first refresh, n_pos
        labeled keys of the assigned class (alpha_u; ``positives``: their rows of the bank and
        whether found, drawn with the views), against the queue."""
        cfg = self.config
        query = F.normalize(self.projector(strong_features).float(), dim=1)
        negatives = query @ self.queue.rows.clone().T  # a snapshot: the queue is written after the loss
        positive, weight = (query * own_keys).sum(dim=1, keepdim=True), torch.ones_like(negatives[:, :1])
        valid = torch.ones_like(positive, dtype=torch.bool)
        logs: dict = {}
        if positives:
            rows, found = positives
            classes = self.assigned[batch.index]
            mined = torch.einsum("bd,bpd->bp", query, self.bank[rows])
            alpha = torch.ones(len(query), device=query.device)
            if cfg.self_paced:  # cosine to the nearest (or the assigned) prototype, in [0, 1], no gradient
                cosines = own_keys @ self.prototypes.T
                alpha = (
                    cosines.amax(dim=1)
                    if cfg.alpha_prototype == "nearest"
                    else cosines.gather(1, classes.clamp_min(0).unsqueeze(1)).squeeze(1)
                ).clamp(0, 1)
            positive = torch.cat([positive, mined], dim=1)
            weight = torch.cat([weight, alpha.unsqueeze(1).expand_as(mined)], dim=1)
            valid = torch.cat([valid, found], dim=1)
            logs["alpha"] = alpha.mean()
        return margin_contrastive_loss(positive, negatives, weight, cfg.gamma, cfg.margin, valid).mean(), logs

    @torch.no_grad()
    def write_labeled_keys(self, index: torch.Tensor, keys: torch.Tensor) -> None:
        """The labeled batch's keys (of every process) into their rows of the bank."""
        rows = torch.searchsorted(self.data.labeled, all_gather_cat(index))
        self.bank[rows] = all_gather_cat(keys)

    def after_step(self, step: StepInfo) -> None:
        self.ema.update(self.config.momentum)  # the key network runs forward: BN statistics of its own

    # -- the offline refresh (Sec. 3.1 and 4) ---------------------------------------------------
    def refreshes(self) -> list[Refresh]:
        return [Refresh("prototypes", self.config.refresh_every, start=self.config.refresh_every)]

    @torch.no_grad()
    def refresh(self, name: str, step: StepInfo) -> dict:
        cfg, data, start = self.config, self.data, time.perf_counter()
        classes, gamma_s = data.num_classes, cfg.similarity_gamma
        keys, logits = data.embed_all(KeyNetwork(self.ema), cfg.weak)
        labeled, y = data.labeled, self.labeled_classes
        self.bank.copy_(keys[labeled])
        p_b = torch.softmax(logits, dim=1)
        first = class_prototypes(keys[labeled], y, classes)  # P0: labeled keys only
        prototypes = first
        unlabeled = torch.ones(data.size, dtype=torch.bool, device=keys.device)
        unlabeled[labeled] = False
        if cfg.prototype_mixture:
            generator = torch.Generator(device=keys.device).manual_seed(step.shared_seed)
            first_assigned = self.assignment(p_b, similarity_distribution(keys, first, gamma_s))
            near = nearest_of_class(keys, first, first_assigned, unlabeled, self.members, cfg.neighbours_min)
            anchors, _ = sample_members(self.members, y, 1, generator, Shard.whole(len(y)))  # x_c ~ X_c, n_c per class
            partners, found = sample_members(near, y, 1, generator, Shard.whole(len(y)))  # x_near ~ Omega_c
            lam = beta(len(y), cfg.mixup_alpha, cfg.mixup_alpha, generator, keys.device)
            keep = found[:, 0]
            mixed, _ = data.embed_all(
                KeyNetwork(self.ema), cfg.weak, labeled[anchors[keep, 0]], mix=(partners[keep, 0], lam[keep])
            )
            prototypes = class_prototypes(torch.cat([keys[labeled], mixed]), torch.cat([y, y[keep]]), classes)  # Eq. 4
        p_s = similarity_distribution(keys, prototypes, gamma_s)
        assigned = self.assignment(p_b, p_s)
        assigned[labeled] = y  # a labeled image's class is known
        self.prototypes.copy_(prototypes)
        self.assigned.copy_(assigned)
        self.refreshed = True
        self.running.reset(p_s.mean(dim=0))
        broadcast(self.prototypes, self.assigned, self.bank, self.running.rows)  # one state, whatever each device's rounding
        metrics = {"seconds": time.perf_counter() - start}
        truth = data.true_labels
        if truth is not None and unlabeled.any():  # Table 5 on the unlabeled images
            fc_right = p_b.argmax(1)[unlabeled] == truth[unlabeled]
            prototype_right = p_s.argmax(1)[unlabeled] == truth[unlabeled]
            metrics.update(
                fc_accuracy=100 * fc_right.float().mean(),
                prototype_accuracy=100 * prototype_right.float().mean(),
                both_right=100 * (fc_right & prototype_right).float().mean(),
                assigned_accuracy=100 * (assigned[unlabeled] == truth[unlabeled]).float().mean(),
            )
        return metrics

    def assignment(self, p_b: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
        """c = argmax p^ (``assign: calibrated``, with p~_s the mean p_s over the data) or argmax p_b (``fc``)."""
        if self.config.assign == "fc":
            return p_b.argmax(dim=1)
        return calibrate(p_b, p_s, p_s.mean(dim=0), self.config.calibration).argmax(dim=1)


class KeyNetwork(nn.Module):
    """The key network's unit projection and class logits in one pass (the offline refresh)."""

    def __init__(self, key: EMATarget) -> None:
        super().__init__()
        self.key = key

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.key[0](x)
        return F.normalize(self.key[1](features).float(), dim=1), self.key[2](features)


def nearest_of_class(
    keys: torch.Tensor,
    prototypes: torch.Tensor,
    assigned: torch.Tensor,
    candidates: torch.Tensor,
    members: torch.Tensor,
    minimum: int,
) -> torch.Tensor:
    """Omega_c (Eq. 4) as a (C, M) table of image indices padded with -1: the max(n_c, ``minimum``)
    candidates assigned to class c that are nearest (cosine) to its prototype, nearest first.
    ``members`` (C, .) from :func:`class_members` gives n_c."""
    classes = prototypes.shape[0]
    take = torch.clamp((members >= 0).sum(dim=1), min=minimum)  # (C,)
    pool = candidates.nonzero().squeeze(1)
    cls = assigned[pool]
    score = (keys[pool] * prototypes[cls]).sum(dim=1)  # in [-1, 1]
    order = torch.argsort(cls.double() * 4 - score.double(), stable=True)  # by class, nearest first
    pool, cls = pool[order], cls[order]
    counts = torch.bincount(cls, minlength=classes)
    rank = torch.arange(len(pool), device=pool.device) - (torch.cumsum(counts, 0) - counts)[cls]
    keep = rank < take[cls]
    table = torch.full((classes, max(int(take.max()), 1)), -1, dtype=torch.long, device=pool.device)
    table[cls[keep], rank[keep]] = pool[keep]
    return table
