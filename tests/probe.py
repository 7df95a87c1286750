"""A method for testing the trainer's contract: it uses every hook a method can use.

It trains a backbone and a linear classifier on the labeled stream, pulls each image's feature
toward a table that a refresh recomputes with ``embed_all`` every ``refresh_every`` epochs (so a
refresh that ran twice, was skipped or differs across processes changes the weights), counts the
labeled images it has seen and the images of its scan epochs, and reports per-epoch metrics.
The ``probe_method`` fixture (``conftest.py``) registers it as ``probe`` for a test; a spawned
process registers it with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import make_views
from kinship.config import AugmentConfig, MethodConfig, RunConfig, check
from kinship.methods import METHODS, Method, Refresh, StepInfo
from kinship.methods.base import Batch, TrainData
from kinship.runtime import all_gather_cat


@dataclass
class ProbeConfig(MethodConfig):
    name: str = "probe"
    refresh_every: int = 2  # epochs
    scan: int = 0  # scan epochs
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_size=16))

    def validate(self, run: RunConfig) -> None:
        check(self.refresh_every >= 1, "method.refresh_every must be >= 1")


@torch.no_grad()
def count(counter: torch.Tensor, index: torch.Tensor) -> None:
    """Add one per occurrence of each index of every process's batch."""
    everyone = all_gather_cat(index)
    counter.index_add_(0, everyone, torch.ones_like(everyone))


class Probe(Method):
    Config = ProbeConfig

    def __init__(self, config: ProbeConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__(config, backbone, data)
        self.head = nn.Linear(backbone.feature_dim, data.num_classes)
        self.register_buffer("table", torch.zeros(data.size, backbone.feature_dim))
        self.register_buffer("labeled_seen", torch.zeros(data.size, dtype=torch.long))
        self.register_buffer("scanned", torch.zeros(data.size, dtype=torch.long))
        self.register_buffer("refresh_count", torch.zeros((), dtype=torch.long))

    @property
    def eval_recipe(self) -> AugmentConfig:
        return self.config.augment

    @property
    def scan_epochs(self) -> int:
        return self.config.scan

    def view_recipes(self, labeled: bool = False) -> list:
        return [self.config.augment]

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        views = make_views(batch, self.view_recipes(), step.generator)
        if batch.labeled is not None:
            views += make_views(batch.labeled, self.view_recipes(labeled=True), step.generator)
        return views

    def forward(self, views: list[torch.Tensor], batch: Batch, step: StepInfo) -> tuple[torch.Tensor, dict]:
        features = self.backbone(views[0])
        loss = (features - self.table[batch.index]).pow(2).mean()
        if batch.labeled is not None:
            loss = loss + F.cross_entropy(self.head(self.backbone(views[1])), batch.labeled.labels)
            count(self.labeled_seen, batch.labeled.index)
        if not step.update:
            count(self.scanned, batch.index)
        return loss, {}

    def refreshes(self) -> list[Refresh]:
        return [Refresh("table", self.config.refresh_every)]

    def refresh(self, name: str, step: StepInfo) -> dict:
        self.table.copy_(self.data.embed_all(self.backbone, self.config.augment))
        self.refresh_count += 1
        return {"table_mean": self.table.mean()}

    def on_epoch_end(self, epoch: int) -> dict:
        return {"labeled_seen": self.labeled_seen.sum(), "scanned": self.scanned.sum()}


def register() -> None:
    """Make ``method.name: probe`` buildable in this process."""
    METHODS["probe"] = Probe
