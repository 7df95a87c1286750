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
softmax uses gamma_s = gamma. FixMatch is the special case lambda_ctr = 0 with no calibration (``fixmatch``),
supervised-only lambda_pl = lambda_ctr = 0 (the labeled batch alone is then computed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.calibration import CALIBRATIONS, RunningMean, calibrate, class_prototypes, similarity_distribution
from kinship.blocks.ema import EMATarget
from kinship.blocks.positives import class_members, sample_members
from kinship.blocks.queue import FifoQueue
from kinship.blocks.shuffle_bn import shuffled_forward
from kinship.config import AugmentConfig, ConfigError, MethodConfig, RunConfig, check, check_choice
from kinship.losses import margin_contrastive_loss, pseudo_label_loss
from kinship.methods.base import Batch, Method, Refresh, StepInfo, TrainData
from kinship.models.heads import mlp
from kinship.runtime import all_gather_cat, broadcast
from kinship.sampling import Shard, beta


def weak_view() -> AugmentConfig:
    """FixMatch's weak view: flip and a translation by up to 12.5 % (reflect padding)."""
    return AugmentConfig(crop_mode="pad", pad=4, jitter_p=0.0, grayscale_p=0.0)


@dataclass
class SsCLConfig(MethodConfig):
    name: str = "sscl"
    pseudo_label_weight: float = 1.0  # lambda_pl (Table 8: CIFAR 1, ImageNet 1 %: 5, 10 %: 10)
    contrastive_weight: float = 1.0  # lambda_ctr (Table 8: CIFAR 1, ImageNet 1 %: 10, 10 %: 5)
    threshold: float = 0.95  # tau (Table 8: CIFAR 0.95, ImageNet 0.6); strict: max p^ > tau
    gamma: float = 5.0  # 1 / temperature (Table 8: CIFAR 5, ImageNet 10)
    margin: float = -0.25  # m, on the negatives (Table 8)
    positives: int = 3  # n_pos labeled keys of the assigned class (Table 7: 3 best)
    self_paced: bool = True  # alpha from the prototype similarity; false: alpha = 1 (Table 6)
    # the prototype alpha measures against: nearest (Sec. 3.2: "the predefined most similar class
    # prototype") | assigned (the prototype of the class c_u whose keys are the positives)
    alpha_prototype: str = "nearest"
    calibration: str = "ratio"  # ratio | literal | product | none (see blocks/calibration.py)
    # c_u, whose labeled keys are u's positives: fc, the classifier's argmax p_b (Sec. 3.2: "we assign it to
    # class c if argmax p_b = c") | calibrated: the argmax of p^ (the prototypes then steer the selection)
    assign: str = "fc"
    similarity_gamma: float = 0.0  # gamma_s of p_s; 0: gamma
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
    weak: AugmentConfig = field(default_factory=weak_view)
    # the SimCLR recipe, then RandAugment (2 operations, random magnitude) and Cutout (Sec. 4.1:
    # "RandAugment combined with the augmentation strategy in SimCLR")
    strong: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.2, 1.0), saturation=0.4, hue=0.1, randaugment=2, cutout=0.5)
    )

    def validate(self, run: RunConfig) -> None:
        check_choice("method.calibration", self.calibration, CALIBRATIONS)
        check_choice("method.assign", self.assign, ("fc", "calibrated"))
        check_choice("method.alpha_prototype", self.alpha_prototype, ("nearest", "assigned"))
        for key, recipe in (("weak", self.weak), ("strong", self.strong)):
            check_choice(f"method.{key}.crop_mode", recipe.crop_mode, ("resized", "pad"))
            check(recipe.randaugment >= 0 and 0 <= recipe.cutout <= 1, f"method.{key}: randaugment >= 0 and cutout in [0, 1]")
        check(
            min(self.pseudo_label_weight, self.contrastive_weight) >= 0,
            "method.pseudo_label_weight and contrastive_weight must be >= 0",
        )
        check(0 <= self.threshold <= 1, f"method.threshold must be in [0, 1], got {self.threshold}")
        check(self.gamma > 0 and self.similarity_gamma >= 0, "method.gamma must be > 0 and similarity_gamma >= 0")
        check(
            self.positives >= 0 and self.window >= 1 and self.refresh_every >= 1 and self.queue_size >= 1,
            "method.positives >= 0, window, refresh_every and queue_size >= 1",
        )
        check(0 <= self.momentum <= 1 and self.mixup_alpha > 0, "method.momentum must be in [0, 1] and mixup_alpha > 0")
        check(
            not self.runs_key_network or self.refresh_every < run.train.epochs,
            f"method.refresh_every ({self.refresh_every}) must be below train.epochs ({run.train.epochs}): the first refresh, "
            "which calibration and the mined positives wait for, would never come",
        )
        check(
            run.train.labeled_batch_size > 0,
            f"method {self.name} needs a labeled batch at every step: set train.labeled_batch_size (the papers: 64) "
            "and a labeled subset (data.labeled_per_class or data.labeled_fraction)",
        )

    @property
    def uses_unlabeled(self) -> bool:
        return self.pseudo_label_weight > 0 or self.contrastive_weight > 0

    @property
    def runs_key_network(self) -> bool:
        """Keys are computed (and the refresh runs) for the contrastive branch or for calibration."""
        return self.uses_unlabeled and (self.contrastive_weight > 0 or self.calibration != "none")


@dataclass
class FixMatchConfig(SsCLConfig):
    """FixMatch (Sohn et al., 2020) as SsCL without its contrastive branch and calibration."""

    name: str = "fixmatch"
    contrastive_weight: float = 0.0
    calibration: str = "none"
    # FixMatch's strong view: the weak view's flip and translation, RandAugment and Cutout
    strong: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_mode="pad", pad=4, jitter_p=0.0, grayscale_p=0.0, randaugment=2, cutout=0.5)
    )


class SsCL(Method):
    Config = SsCLConfig

    def __init__(self, config: SsCLConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        classes, feat = data.num_classes, backbone.feature_dim
        self.classifier = nn.Linear(feat, classes)  # h
        # g: 2 layers (none where no key is computed: FixMatch, supervised-only)
        self.projector = (
            mlp(feat, config.hidden or feat, config.dim, batch_norm=False) if self.runs_key_network else nn.Identity()
        )
        self.key = EMATarget(backbone, self.projector, self.classifier)  # E_k: [f_k, g_k, h_k]
        self.key.update(config.momentum)  # each step's move made in the previous after_step (see MoCoV2)
        self.queue = FifoQueue(config.queue_size, config.dim)
        self.running = RunningMean(config.window, classes)  # p~_s
        self.register_buffer("prototypes", torch.zeros(classes, config.dim))  # P
        self.register_buffer("assigned", torch.full((data.size,), -1, dtype=torch.long))  # c_u of every image
        self.refreshed = False  # whether a refresh has assigned the images, known on the host
        self.register_buffer("bank", torch.zeros(data.info.labeled, config.dim))  # K_b: labeled keys, by labeled rank
        if data.labels is not None:  # training (not a checkpoint loaded for evaluation)
            labeled = data.labeled
            if len(labeled) == data.size and self.uses_unlabeled:
                raise ConfigError(
                    f"method {config.name} learns from unlabeled images and every training label is known: "
                    "choose a labeled subset (data.labeled_per_class or data.labeled_fraction)"
                )
            self.register_buffer("labeled_classes", data.labels[labeled], persistent=False)
            self.register_buffer("members", class_members(self.labeled_classes, classes), persistent=False)

    @property
    def unused_parameters(self) -> bool:
        return self.config.contrastive_weight == 0 and self.runs_key_network  # keys for calibration only: g untrained

    @property
    def uses_unlabeled(self) -> bool:
        return self.config.uses_unlabeled

    @property
    def runs_key_network(self) -> bool:
        return self.config.runs_key_network

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refreshed = bool(len(self.assigned)) and bool(self.assigned.amax() >= 0)  # once per load

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.weak

    @property
    def eval_backbone(self) -> nn.Module:
        return self.key[0]  # the momentum network, evaluated as FixMatch's EMA model

    @property
    def per_process_batch_norm(self) -> bool:
        return self.config.shuffle_bn and self.runs_key_network

    def classifiers(self) -> dict[str, nn.Module]:
        return {"ema": self.chain(self.key[0], self.key[2]), "online": self.chain(self.backbone, self.classifier)}

    # -- views --------------------------------------------------------------------------------
    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        cfg = self.config
        return [cfg.weak] if labeled else [cfg.weak, cfg.strong] if self.uses_unlabeled else []

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        """[weak(x)] of the labeled batch, then [weak(u), strong(u)] of the unlabeled one (not drawn
        in a supervised-only run); after the first refresh, with labeled positives, also the draw of
        each unlabeled image's positives: its rows of the bank (B, n_pos) and whether found (B, n_pos)
        (random draws stay out of the compiled forward)."""
        cfg = self.config
        if batch.labeled is None:
            raise ConfigError(f"method {cfg.name} needs train.labeled_batch_size > 0")
        views = make_views(batch.labeled, self.view_recipes(labeled=True), step.generator)
        if self.uses_unlabeled:
            views += make_views(batch, self.view_recipes(), step.generator)
        if self.uses_unlabeled and self.refreshed and cfg.contrastive_weight > 0 and cfg.positives > 0:
            classes = self.assigned[batch.index]
            views += sample_members(self.members, classes, cfg.positives, step.generator, batch.shard)
        return views

    # -- the step -----------------------------------------------------------------------------
    def encode_keys(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        with torch.no_grad():
            network = lambda v: self.key[1](self.key[0](v))  # noqa: E731
            keys = shuffled_forward(network, x, seed) if self.config.shuffle_bn else network(x)
        return F.normalize(keys.float(), dim=1)

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        labeled = batch.labeled
        if not self.uses_unlabeled:  # supervised-only: L = L_sup on the labeled batch alone
            loss_sup = F.cross_entropy(self.classifier(self.backbone(views[0])).float(), labeled.labels)
            return loss_sup, {"loss_sup": loss_sup.detach()}
        x_weak, u_weak, u_strong, *positives = views
        n_x, n_u = len(x_weak), len(u_weak)
        features = self.backbone(torch.cat([x_weak, u_weak, u_strong]))
        logits_x, logits_weak, logits_strong = self.classifier(features).float().split([n_x, n_u, n_u])
        loss_sup = F.cross_entropy(logits_x, labeled.labels)  # Eq. 1

        p_b = torch.softmax(logits_weak.detach(), dim=1)
        active = self.refreshed
        keys = self.encode_keys(torch.cat([x_weak, u_weak]), step.shared_seed) if self.runs_key_network else None
        p_hat = p_b
        if keys is not None and active and cfg.calibration != "none":  # co-calibration (Sec. 3.1)
            p_s = similarity_distribution(keys[n_x:], self.prototypes, cfg.similarity_gamma or cfg.gamma)
            self.running.push(p_s.mean(dim=0))
            p_hat = calibrate(p_b, p_s, self.running.mean(), cfg.calibration)
        loss_pl, mask = pseudo_label_loss(logits_strong, p_hat, cfg.threshold)  # Eq. 2

        loss_ctr = torch.zeros((), device=features.device)
        logs: dict = {}
        if cfg.contrastive_weight > 0:
            loss_ctr, logs = self.contrastive(features[n_x + n_u :], keys[n_x:], batch, positives)
        if keys is not None:
            self.write_labeled_keys(labeled.index, keys[:n_x])
            self.queue.push(keys[n_x:])
        loss = loss_sup + cfg.pseudo_label_weight * loss_pl + cfg.contrastive_weight * loss_ctr  # Eq. 3
        truth = self.data.true_labels
        if truth is not None:
            correct = (p_hat.argmax(dim=1) == truth[batch.index]).float()
            logs["pseudo_accuracy"] = (correct * mask).sum() / mask.sum().clamp_min(1)
        return loss, {
            "loss_sup": loss_sup.detach(),
            "loss_pl": loss_pl.detach(),
            "loss_ctr": loss_ctr.detach(),
            "mask_rate": mask.mean(),
            **logs,
        }

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
        # a key network that never runs forward takes the online BN statistics (FixMatch's EMA model)
        self.key.update(self.config.momentum, copy_buffers=not self.runs_key_network)

    # -- the offline refresh (Sec. 3.1 and 4) ---------------------------------------------------
    def refreshes(self) -> list[Refresh]:
        if not self.runs_key_network:
            return []
        return [Refresh("prototypes", self.config.refresh_every, start=self.config.refresh_every)]

    @torch.no_grad()
    def refresh(self, name: str, step: StepInfo) -> dict:
        cfg, data, start = self.config, self.data, time.perf_counter()
        classes, gamma_s = data.num_classes, cfg.similarity_gamma or cfg.gamma
        keys, logits = data.embed_all(KeyNetwork(self.key), cfg.weak)
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
                KeyNetwork(self.key), cfg.weak, labeled[anchors[keep, 0]], mix=(partners[keep, 0], lam[keep])
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


class FixMatch(SsCL):
    Config = FixMatchConfig


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
