"""MSF and CMSF: mean shift toward the nearest neighbours of the target in a memory bank.

Mean Shift (MSF; Abbasi Koohpayegani et al., 2021) and Constrained Mean Shift (CMSF; Navaneet et
al., 2022). One step, after the paper's Sec. 2:

    v = normalize(h(g(strong(x))))                    online prediction, with gradient
    u = normalize(f(weak(x)))                         target (EMA of g), no gradient
    M.enqueue(u of all processes)                     before the search: u_i is its own 1st neighbour
    S_i = top-k of <u_i, M_j> over j in C_i           C_i = M gives MSF; k = 1 gives BYOL-asym
    L = mean_i (1/|S_i|) sum_{z in S_i} ||v_i - z||^2  Eq. (1); the mean over the batch, as the code

The constraint C_i (``constraint``):
    none        MSF.
    self        the k' nearest slots to w_i in M', where w_i is the target embedding of image i from
                its previous visit and M'_j the previous-visit embedding of the image in slot j (Sec.
                2.1), looked up by image at search time as the official code does (``previous_lookup``);
                L = (L_MSF + L_CMSF) / 2. Without a previous visit: C_i = M.
    supervised  slots with the query's label (Sec. 2.2); ``top_all`` averages over all of C_i. A query
                with fewer than k such slots completes S_i with other slots (``fill_short``).
    semi        slots whose label equals the query's label (labeled images) or its pseudo-label from a
                2-layer MLP on u when max p >= tau (Sec. 2.3); other queries fall back to MSF. The MLP
                is trained twice per epoch on the cached embeddings of the labeled images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.blocks.cache import SampleCache
from kinship.blocks.ema import EMATarget
from kinship.blocks.knn import masked_topk, rank_of_last, selection_purity
from kinship.blocks.multicrop import forward_crops
from kinship.blocks.pseudo_labels import PseudoLabeler
from kinship.blocks.queue import FifoQueue
from kinship.config import AugmentConfig, ConfigError, MethodConfig, RunConfig, check
from kinship.losses import mean_shift_loss
from kinship.methods.base import Batch, Method, StepInfo, TrainData
from kinship.models.heads import mlp
from kinship.runtime import all_gather_cat, rank, world_size

Constraint = Literal["none", "self", "supervised", "semi"]  # none: MSF


@dataclass
class CMSFConfig(MethodConfig):
    name: str = "cmsf"
    constraint: Constraint = "self"
    topk: int = 5  # k: self 5, supervised 10, semi 10 (paper, Sec. 3)
    topk_constraint: int = 5  # k' of the self constraint (Table 3: 5 best of 5..80)
    top_all: bool = False  # supervised: S_i = C_i
    bank_size: int = 8192  # |M|: ImageNet 128,000 (paper); CIFAR 8,192 (kinship's choice: below N, ~16% of the data)
    momentum: float = 0.99  # constant (paper)
    hidden: int = 0  # projector and predictor hidden width; 0: 2 x feature dim (the official code's rule)
    dim: int = 0  # embedding dim; 0: feature dim / 4 (the official code's rule) (ResNet-50: 4096, 512)
    confidence: float = 0.85  # tau of the semi-supervised pseudo-labels (paper)
    classifier_rounds: int = 2  # semi: classifier trainings per epoch (middle and end) (paper)
    classifier_passes: int = 10  # over the labeled cache, batch 256, SGD 0.01 / 0.9 / 1e-4 (official code)
    classifier_lr: float = 0.01
    cache_confident: bool = False  # semi: also train the classifier on confident pseudo-labels (code's --cache_conf_unsup, off)
    target_view: Literal["weak", "strong"] = "weak"  # weak: weak -> target, strong -> online (MSF's best "w/s"); strong: s/s
    # self: w_i from the previous visit ("cached") or from a third augmentation through the current
    # target ("third_aug": similar accuracy, about 30% slower (paper, Sec. 2.1))
    constraint_view: Literal["cached", "third_aug"] = "cached"
    # self, cached: M'_j for bank slot j. "image": looked up by the slot's image at search time, the
    # previous visit of the image's latest visit (UCDvision/CMSF self_supervised/train_cmsf_self.py, a
    # two-row pool per image), so an image's older slot reads its newer slot's; "slot": stored with
    # the slot at enqueue, the previous visit of that very slot (the paper's Sec. 2.1 as written)
    previous_lookup: Literal["image", "slot"] = "image"
    # supervised / semi: a query with fewer than k slots of its label completes S_i with other filled
    # slots, all ranked equal (the official train_cmsf_sup.py and pseudo_cmsf.py set their distance to
    # 5.0 and average over k); false: S_i holds only the slots of C_i (S_i within C_i, paper Sec. 2.2)
    fill_short: bool = True
    local_crops: int = 0  # extra small crops for the online network only (ImageNet: 4 x 96 px) (paper, Sec. 3)
    # RRC(0.2, 1) for both (official code); strong: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray 0.2. Blur p 0.5 on
    # ImageNet, off at 32 px (kinship's choice).
    weak: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    )
    strong: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.2, 1.0), saturation=0.4, hue=0.1, blur_p=0.0)
    )
    # SwAV's small-crop scale (kinship's choice); 16 px at CIFAR's 32 (ImageNet: 96)
    local: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(crop_size=16, crop_scale=(0.05, 0.14), saturation=0.4, hue=0.1, blur_p=0.0)
    )

    def validate(self, run: RunConfig) -> None:
        check(
            not self.top_all or self.constraint in ("supervised", "semi"),
            "method.top_all is the label-constrained variant: use it with constraint supervised or semi",
        )
        check(
            self.topk >= 1 and self.topk_constraint >= 1 and self.bank_size >= 1,
            "method.topk, topk_constraint and bank_size must be >= 1",
        )
        check(0 <= self.momentum <= 1, f"method.momentum must be in [0, 1], got {self.momentum}")


@dataclass
class MSFConfig(CMSFConfig):
    name: str = "msf"
    constraint: Constraint = "none"


def crop_mean_loss(predictions: list[torch.Tensor], neighbour_mean: torch.Tensor) -> torch.Tensor:
    """Eq. (1) averaged over the batch and, with equal weights, over the online crops (kinship's
    choice; the paper does not weight them)."""
    return sum(mean_shift_loss(v, neighbour_mean).mean() for v in predictions) / len(predictions)


class Queries(NamedTuple):
    """What a constraint knows of this process's queries besides their similarity to the bank."""

    index: torch.Tensor  # (B,) dataset indices
    labels: torch.Tensor  # (B,) the label each query's slot stores (-1: none)
    confident: torch.Tensor  # (B,) semi: 1 where the label is known or the pseudo-label confident
    previous: tuple[torch.Tensor, torch.Tensor] | None  # self: w (B, d) and 1/0 whether the image had a visit


class CMSF(Method):
    Config = CMSFConfig

    def __init__(self, config: CMSFConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        if data.size and config.bank_size >= data.size:
            # one image would hold several slots, and its copies would all map to one cached w
            raise ConfigError(f"method.bank_size {config.bank_size} must be smaller than the {data.size} training images")
        if config.constraint == "supervised" and data.labels is not None and (data.labels < 0).any():
            hidden = int((data.labels < 0).sum())
            raise ConfigError(
                f"method.constraint 'supervised' needs a label for every training image, and {hidden} of {data.size} "
                "are hidden (data.labeled_per_class / labeled_fraction, or an unlabeled split): use constraint 'semi'"
            )
        feat = backbone.feature_dim
        hidden, dim = config.hidden or 2 * feat, config.dim or max(feat // 4, 16)
        self.projector = mlp(feat, hidden, dim)
        self.predictor = mlp(dim, hidden, dim)
        self.target = EMATarget(backbone, self.projector)
        # bank M: target embeddings, the label used by the constraint (-1: none) and the dataset index
        self.bank = FifoQueue(config.bank_size, dim, init="zeros", columns=("label", "index"))
        self.third_view = config.constraint == "self" and config.constraint_view == "third_aug"
        if config.constraint == "self":
            if not self.third_view:
                self.cache = SampleCache(data.size, dim)  # P: each image's latest target embedding
            if self.previous_by_image:  # each image's w at its latest visit: M'_j = its row for slot j's image
                self.previous_of_image = SampleCache(data.size, dim)
            else:  # M', slot by slot
                self.previous_bank = FifoQueue(config.bank_size, dim, init="zeros", columns=("valid",))
        if config.constraint == "semi":
            self.pseudo = PseudoLabeler(
                data.size, dim, data.num_classes, config.confidence, config.classifier_passes, config.classifier_lr
            )
        self.select = {  # S_i, and what the loss pulls v_i toward
            "none": self.select_msf,
            "self": self.select_self,
            "supervised": self.select_labeled,
            "semi": self.select_labeled,
        }[config.constraint]

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.weak

    @property
    def previous_by_image(self) -> bool:
        cfg = self.config
        return cfg.constraint == "self" and cfg.constraint_view == "cached" and cfg.previous_lookup == "image"

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        """[target view, online view, (third view for the constraint), local crops...]."""
        cfg = self.config
        target = cfg.weak if cfg.target_view == "weak" else cfg.strong
        return [target, cfg.strong, *[target] * self.third_view, *[cfg.local] * cfg.local_crops]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        return make_views(batch, self.view_recipes(), step.generator)

    def predict(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.normalize(self.predictor(self.projector(self.backbone(x))).to(dtype), dim=1)

    # -- the step ----------------------------------------------------------------------------
    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        target_view, online_view, *crops = views
        third, crops = (crops[0], crops[1:]) if self.third_view else (None, crops)
        dtype = self.bank.rows.dtype  # fp32 distances and loss, also under bf16 autocast
        # online predictions v: the large crop, then the small crops in one pass (they share S_i)
        predictions = [self.predict(online_view, dtype), *forward_crops(lambda x: self.predict(x, dtype), crops)]
        with torch.no_grad():
            u = F.normalize(self.target(target_view).to(dtype), dim=1)
            labels, confident = self.pseudo.label(u, batch.labels) if self.config.constraint == "semi" else (batch.labels, None)
            all_u, all_index, all_labels = all_gather_cat(u), all_gather_cat(batch.index), all_gather_cat(labels)
            previous = self.previous_visit(third, all_u, all_index)
            if self.config.constraint == "semi":  # the labeled images' u (and confident ones' with cache_confident)
                cached = all_labels if self.config.cache_confident else all_gather_cat(batch.labels)
                self.pseudo.remember(all_index, all_u, cached)
            self.bank.push_gathered(all_u, label=all_labels, index=all_index)  # before the search (paper)
            valid = self.bank.valid().unsqueeze(0)  # (1, M): a broadcast row, never a dense (B, M) mask
            similarity = u @ self.bank.rows.T  # (B, M) fp32: neighbours by the target u
            means, logs = self.select(similarity, valid, Queries(batch.index, labels, confident, previous))
        # Eq. (1) toward each mean; self: equally weighted with plain MSF (Sec. 2.1; the official code's 1/2)
        loss = sum(crop_mean_loss(predictions, mean) for mean in means) / len(means)
        return loss, logs

    @torch.no_grad()
    def previous_visit(
        self, third: torch.Tensor | None, all_u: torch.Tensor, all_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The self constraint's w_i and whether image i had a visit: from the cache (read, then this
        visit written), or from a third augmentation through the current target; M' written alike."""
        if self.config.constraint != "self":
            return None
        if third is not None:
            w = F.normalize(self.target(third).to(all_u.dtype), dim=1)
            self.previous_bank.push_gathered(all_gather_cat(w), valid=torch.ones(len(all_u), device=w.device))
            return w, torch.ones(len(w), device=w.device, dtype=w.dtype)
        w, w_valid = self.cache.exchange(all_index, all_u)
        if self.previous_by_image:
            self.previous_of_image.exchange(all_index, w, where=w_valid > 0)
        else:
            self.previous_bank.push_gathered(w, valid=w_valid)
        everyone = slice(rank() * len(w) // world_size(), (rank() + 1) * len(w) // world_size())  # this process's rows
        return w[everyone], w_valid[everyone]

    # -- the four constraints: S_i, and the neighbour means the loss pulls toward -------------------
    def select_msf(self, similarity: torch.Tensor, valid: torch.Tensor, queries: Queries) -> tuple[list, dict]:
        """C_i = M (MSF): the top-k of the bank."""
        selection = masked_topk(similarity, valid, self.config.topk)
        return [self.neighbour_mean(*selection)], self.purity(selection, queries.index, "purity")

    def select_self(self, similarity: torch.Tensor, valid: torch.Tensor, queries: Queries) -> tuple[list, dict]:
        """S^c within the self constraint, and plain MSF's S^u beside it (Sec. 2.1)."""
        msf = masked_topk(similarity, valid, self.config.topk)  # S^u
        selection = self.self_selection(similarity, *queries.previous, valid, msf)
        logs = {
            **self.purity(selection, queries.index, "purity"),
            **self.purity(msf, queries.index, "purity_msf"),
            "rank_of_last": rank_of_last(similarity, *selection, valid).median(),  # Fig. 5's "m"
        }
        return [self.neighbour_mean(*selection), self.neighbour_mean(*msf)], logs

    def select_labeled(self, similarity: torch.Tensor, valid: torch.Tensor, queries: Queries) -> tuple[list, dict]:
        """C_i = the slots of the query's label (Sec. 2.2); semi: of its label or confident
        pseudo-label, the whole bank for the other queries (Sec. 2.3). ``top_all``: S_i = C_i."""
        cfg = self.config
        same = (self.bank.column("label").unsqueeze(0) == queries.labels.unsqueeze(1)).to(valid.dtype) * valid
        allowed = same if queries.confident is None else torch.lerp(valid, same, queries.confident.unsqueeze(1))
        logs = {} if queries.confident is None else {"confident": queries.confident.mean()}
        if cfg.top_all:  # the masked mean over a variable number of slots
            mean = allowed @ self.bank.rows / allowed.sum(1, keepdim=True).clamp_min(1)
            return [mean], {"neighbours": allowed.sum(1).mean(), **logs}
        selection = masked_topk(similarity, allowed, cfg.topk, fill=valid if cfg.fill_short else None)
        return [self.neighbour_mean(*selection)], {**self.purity(selection, queries.index, "purity"), **logs}

    def neighbour_mean(self, index: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """The mean of the selected bank slots ``index`` (B, k) where ``selected`` is 1 (Eq. (1) needs
        only that mean)."""
        neighbours = self.bank.rows[index]  # (B, k, d)
        return (neighbours * selected.unsqueeze(-1)).sum(1) / selected.sum(1, keepdim=True).clamp_min(1)

    def purity(self, selection: tuple[torch.Tensor, torch.Tensor], query_index: torch.Tensor, name: str) -> dict:
        """{name: Fig. 4's purity of the selection}, by the ground-truth labels as the official code
        measures it (the bank's labels are the constraint's own, pure by construction); {} without them."""
        truth = self.data.true_labels
        if truth is None:
            return {}
        return {name: selection_purity(self.bank.column("index"), *selection, truth, query_index)}

    def self_constraint(self, w: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C_i as slots (B, k') and a 1/0 mask: the k' slots of M' nearest to w_i (Sec. 2.1).

        A slot whose image had no previous visit holds a zero row in M' (the cache starts at zero);
        it ranks after every other slot (as at distance +inf) but stays eligible, so k' >= |M|
        gives C_i = M, i.e. MSF.
        """
        if self.previous_by_image:
            image = self.bank.column("index").clamp_min(0)  # an empty slot is masked by ``valid``
            rows, known = self.previous_of_image.rows[image], self.previous_of_image.valid[image]
        else:
            rows, known = self.previous_bank.rows, self.previous_bank.column("valid")
        no_previous = (known <= 0).to(w.dtype).unsqueeze(0)
        return masked_topk(w @ rows.T - 3.0 * no_previous, valid, self.config.topk_constraint)

    def self_selection(
        self,
        similarity: torch.Tensor,
        w: torch.Tensor,
        w_valid: torch.Tensor,
        valid: torch.Tensor,
        msf: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """S^c_i: the top-k of <u_i, M_j> within C_i, searched among the k' candidates only (no dense
        (B, M) mask); the MSF selection S^u_i where image i has no previous visit (kinship's choice)."""
        candidates, eligible = self.self_constraint(w, valid)
        inner, selected = masked_topk(similarity.gather(1, candidates), eligible, self.config.topk)
        index = candidates.gather(1, inner)
        short = msf[0].shape[1] - index.shape[1]  # k' < k: S^c = C_i, padded with unselected slots
        if short > 0:
            index, selected = F.pad(index, (0, short)), F.pad(selected, (0, short))
        use = w_valid.unsqueeze(1) > 0
        return torch.where(use, index, msf[0]), torch.where(use, selected, msf[1])

    def after_step(self, step: StepInfo) -> None:
        self.target.update(self.config.momentum)
        if self.config.constraint == "semi":  # the pseudo-label classifier, trained `classifier_rounds` times per epoch
            rounds = self.config.classifier_rounds
            if step.step_in_epoch + 1 in {math.ceil(step.steps_per_epoch * (r + 1) / rounds) for r in range(rounds)}:
                self.pseudo.fit(step.shared_seed)


class MSF(CMSF):
    Config = MSFConfig
