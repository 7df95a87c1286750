"""CLIM (Li et al., "Center-wise Local Image Mixture for Contrastive Representation Learning"):
MoCo v2 whose queries also include an image mixed with one of its kin.

Every ``refresh_every`` epochs from ``refresh_start`` (Sec. 3.2.1):
    V = normalize(f_k(x)) of every training image (key encoder, evaluation view)
    C, c(.) = spherical k-means of V with m centres;  N_k(i) = the k nearest neighbours of i (self excluded)
    candidates[i] = P of Omega_p = {j in N_k(i), c(j) = c(i), d(v_j, C_c(i)) <= d(v_i, C_c(i))}   (Eq. 2),
                    padded with the nearest remaining neighbours when fewer than P remain
Each step, for anchors x and one candidate x~ drawn per anchor:
    x_mix = M * aug(x) + (1 - M) * aug(x~), lambda = the anchor's share of x_mix          (Eq. 3, CutMix)
    per resolution r, r' (the same crop rendered at each r, Eq. 5):
      L_mix = lambda nce(q_mix^r, k_x^r') + (1 - lambda) nce(q_mix^r, k_x~^r')           (Eq. 4)
      L_moco = nce(q_x^r, k_x^r')                                                          (Eq. 1)
    loss = mean over the |R|^2 pairs (r, r') of (w L_moco + L_mix) / (w + 1)               (Eq. 6)
    enqueue the anchor keys at the base resolution only
Before the first refresh there are no candidates and the loss is MoCo v2's.

Readings where the paper is silent, each a config key: the plain MoCo term stays (Sec. 3.2.2: the
mixed samples "as well as traditional data augmentations" are pulled together; weight
``plain_weight``, 0 drops it); Eq. 6 writes a sum over the resolution pairs and the loss here is
their mean (the sum is the mean at |R|^2 times the learning rate), and the two terms are averaged
so that without positives, or with a positive equal to the anchor and ``mixing: none``, the loss is
MoCo v2's; lambda is the area actually pasted after the box is clipped (the CutMix reference code);
the positive's key is a view of its own (a key of the query-side view would leak the pasted
pixels); the clustering features are the key encoder's projections of the evaluation view.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.mixing import mix
from kinship.augment.views import make_views
from kinship.blocks.kmeans import kmeans
from kinship.blocks.knn import nearest_neighbours
from kinship.blocks.positives import Selection, pair_purity, random_candidates, select_positives
from kinship.config import AugmentConfig, RunConfig, check
from kinship.losses import info_nce_with_queue, mixed_info_nce
from kinship.methods.base import Batch, Refresh, StepInfo, TrainData
from kinship.methods.mocov2 import MoCoV2, MoCoV2Config
from kinship.runtime import broadcast


@dataclass
class CLIMConfig(MoCoV2Config):
    name: str = "clim"
    selection: Selection = "centre"  # centre: Eq. 2; the others: Table 6
    mixing: Literal["cutmix", "mixup", "none"] = "cutmix"  # Table 10; none: the positive is a plain second key
    cutmix_alpha: float = 2.0  # Beta(alpha, alpha) of the box (Table 9)
    mixup_alpha: float = 0.2  # the paper's best mixup alpha
    resolutions: list[int] = field(
        default_factory=list
    )  # the crop rendered at each (Eq. 6); empty: crop size only. ImageNet [224, 160]
    clusters: int = 10000  # m: k-means centres (Table 8, ImageNet)
    neighbours: int = 40  # k (Table 8)
    positives: int = 10  # P: candidates kept per anchor (Sec. 3.2.1)
    refresh_every: int = 5  # epochs between refreshes (Sec. 4.1)
    refresh_start: int = 5  # first refresh (not stated in the paper): plain MoCo v2 before it, on random-init features
    kmeans_iters: int = 20
    plain_weight: float = 1.0  # w of the plain MoCo term; 0 with mixing: the plain query is not computed (Eq. 6 alone)

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        check(not self.symmetric, "method.symmetric is not supported by clim (the paper's loss is MoCo v2's asymmetric one)")
        check(self.cutmix_alpha > 0 and self.mixup_alpha > 0, "method.cutmix_alpha and mixup_alpha must be > 0")
        size = self.augment.crop_size
        check(
            all(8 <= r <= size for r in self.resolutions) and (not self.resolutions or size in self.resolutions),
            f"method.resolutions {self.resolutions}: each in [8, crop size {size}], the crop size among them",
        )
        check(
            1 <= self.positives <= self.neighbours,
            f"method.positives (P) must be in [1, neighbours k], got P={self.positives}, k={self.neighbours}",
        )
        check(self.clusters >= 2 and self.kmeans_iters >= 1, "method.clusters must be >= 2 and kmeans_iters >= 1")
        check(self.refresh_every >= 1 and self.refresh_start >= 0, "method.refresh_every must be >= 1 and refresh_start >= 0")
        check(
            self.refresh_start < run.train.epochs,
            f"method.refresh_start ({self.refresh_start}) must be below train.epochs ({run.train.epochs}): "
            "the run would be MoCo v2",
        )
        check(self.plain_weight >= 0, f"method.plain_weight must be >= 0, got {self.plain_weight}")


class CLIM(MoCoV2):
    Config = CLIMConfig

    def __init__(self, config: CLIMConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        check(
            config.clusters <= data.size and config.neighbours < data.size,
            f"method.clusters (m={config.clusters}) and neighbours (k={config.neighbours}) need more training images "
            f"than {data.size}",
        )
        self.resolutions = config.resolutions or [config.augment.crop_size]
        self.register_buffer("candidates", torch.full((data.size, config.positives), -1, dtype=torch.long))
        self.has_candidates = False  # kept on the host: reading the table's first entry would wait for the device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.has_candidates = bool(self.candidates[0, 0] >= 0)  # once per load

    @torch.no_grad()
    def use_candidates(self, table: torch.Tensor) -> None:
        """Each image's P positives from now on: table (N, P) of dataset indices."""
        self.candidates.copy_(table)
        broadcast(self.candidates)  # one table everywhere, whatever the kernels' rounding on each device
        self.has_candidates = True

    # -- the refresh: clusters, neighbours and the candidate table (Eq. 2) -------------------------
    def refreshes(self) -> list[Refresh]:
        return [Refresh("positives", self.config.refresh_every, start=self.config.refresh_start)]

    @torch.no_grad()
    def refresh(self, name: str, step: StepInfo) -> dict:
        cfg, start = self.config, time.perf_counter()
        features = F.normalize(self.data.embed_all(self.key_encoder, cfg.augment), dim=1)  # identical on every process
        clusters = kmeans(
            features,
            cfg.clusters,
            iters=cfg.kmeans_iters,
            seed=step.shared_seed,
            spherical=True,
            init="kmeans++" if cfg.clusters <= 1024 else "random",
        )  # k-means++ is sequential in m
        neighbours = nearest_neighbours(features, cfg.neighbours)
        generator = torch.Generator(device=features.device).manual_seed(step.shared_seed)
        table, kept = select_positives(
            cfg.selection, features, clusters.centroids, clusters.assignments, neighbours, cfg.positives, generator
        )
        self.use_candidates(table)
        metrics = {
            "kept_mean": kept.float().mean(),
            "kept_at_least_p": (kept >= cfg.positives).float().mean(),
            "empty_clusters": int((torch.bincount(clusters.assignments, minlength=cfg.clusters) == 0).sum()),
        }
        truth = self.data.true_labels
        if truth is not None:  # Sec. 4.4's argument: how often the positives share the anchor's class
            metrics.update(
                purity_selected=pair_purity(table, truth),
                purity_knn=pair_purity(neighbours, truth),
                purity_random=pair_purity(random_candidates(len(truth), cfg.positives, generator, truth.device), truth),
            )
        return {**metrics, "seconds": time.perf_counter() - start}

    # -- views: the anchors' query and key, and the positives' query and key -------------------------
    def at_resolutions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The same crop at every resolution (Eq. 5: the crop ratio fixed, K_train changed)."""
        return [
            x
            if r == x.shape[-1]
            else F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False).contiguous(
                memory_format=torch.channels_last
            )
            for r in self.resolutions
        ]

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        return [self.config.augment, self.config.augment]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        """[anchor queries, anchor keys] per resolution; with candidates then [mixed queries (or,
        without mixing, none), positive keys] per resolution and lambda (B,)."""
        cfg = self.config
        query, key = make_views(batch, self.view_recipes(), step.generator)
        views = self.at_resolutions(query) + self.at_resolutions(key)
        if not self.has_candidates:
            return views
        shard = batch.shard
        pick = shard.rows(torch.randint(cfg.positives, (shard.total,), generator=step.generator, device=step.generator.device))
        kin = self.candidates[batch.index, pick.to(batch.index.device)]
        positive = dataclasses.replace(self.data.read(kin), shard=shard)
        positive_query, positive_key = make_views(positive, [cfg.augment, cfg.augment], step.generator)
        if cfg.mixing == "none":
            return views + self.at_resolutions(positive_key)
        mixed, lam = mix(
            query,
            positive_query,
            cfg.mixing,
            cfg.cutmix_alpha if cfg.mixing == "cutmix" else cfg.mixup_alpha,
            step.generator,
            shard,
        )
        return views + self.at_resolutions(mixed) + self.at_resolutions(positive_key) + [lam]

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        cfg, n = self.config, len(self.resolutions)
        negatives = self.queue.rows.clone()  # one snapshot for every term, taken before the enqueue

        def queries(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [F.normalize(self.head(self.backbone(x)), dim=1).to(negatives.dtype) for x in xs]

        def keys(xs: list[torch.Tensor], offset: int) -> list[torch.Tensor]:
            return [self.encode_keys(x, step.shared_seed + offset + i) for i, x in enumerate(xs)]

        def pair_mean(term) -> torch.Tensor:  # Eq. 6 as the mean over the (r, r') resolution pairs
            return torch.stack([term(r, s) for r in range(n) for s in range(n)]).mean()

        anchor_keys = keys(views[n : 2 * n], 0)
        mixing = self.has_candidates and cfg.mixing != "none"
        plain = [] if mixing and cfg.plain_weight == 0 else queries(views[:n])  # w = 0: no plain query to compute
        moco = pair_mean(lambda r, s: info_nce_with_queue(plain[r], anchor_keys[s], negatives, cfg.temperature)) if plain else 0.0
        if not self.has_candidates:  # before the first refresh: MoCo v2
            loss, logs = moco, {}
        elif not mixing:  # the positive's key as a second key of the plain query
            positive_keys = keys(views[2 * n : 3 * n], n)
            kin = pair_mean(lambda r, s: info_nce_with_queue(plain[r], positive_keys[s], negatives, cfg.temperature))
            loss, logs = (cfg.plain_weight * moco + kin) / (cfg.plain_weight + 1), {"loss_kin": kin.detach()}
        else:
            mixed, positive_keys, lam = queries(views[2 * n : 3 * n]), keys(views[3 * n : 4 * n], n), views[4 * n]
            kin = pair_mean(
                lambda r, s: mixed_info_nce(mixed[r], anchor_keys[s], positive_keys[s], negatives, lam, cfg.temperature).mean()
            )
            loss = (cfg.plain_weight * moco + kin) / (cfg.plain_weight + 1)  # Eq. 6
            logs = {"loss_kin": kin.detach(), "lambda": lam.mean()}
        self.queue.push(anchor_keys[self.resolutions.index(cfg.augment.crop_size)])
        return loss, logs
