"""Batches of dataset indices, identical on every process, and the loaders that turn them into images.

The data are read in passes, each a seeded permutation of the dataset, a function of (seed, pass)
only, so a resumed run replays it exactly. Global batch b of a pass is ``perm[b*B:(b+1)*B]`` and
process r takes its r-th slice: the concatenation over processes is the single-process batch,
which is what makes N processes equal to one on the concatenated batch. The tail is dropped (a
per-image cache must never see an image twice in one step). An epoch is one pass, or a fixed
number of steps (``train.steps_per_epoch``: FixMatch-style papers count 1,024 steps as an epoch),
in which case the passes run on across epoch boundaries.

Semi-supervised methods also get a labeled batch at every step (:class:`LabeledPlan`): a function of
(seed, step) that wraps around the labeled set as often as needed, sliced across processes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from kinship.config import AugmentConfig
from kinship.data.store import ImageSet
from kinship.errors import DataError
from kinship.sampling import Shard


@dataclass
class Batch:
    index: torch.Tensor  # int64 (B,), dataset indices
    images: torch.Tensor | None  # uint8 (B, 3, H, W); None for a streamed batch, which carries its crops
    labels: torch.Tensor  # int64 (B,), -1 where the label is hidden or absent
    shard: Shard | None = None  # where these rows sit in the global batch (None: they are all of it)
    labeled: "Batch | None" = None  # the labeled stream's batch of this step, when the run has one
    aspect: torch.Tensor | None = None  # float (B,): original width / height of images stored as squares
    # a streamed batch: (recipe, uint8 (B, 3, S, S)) per view recipe of the method, the geometry
    # (random-resized crop and flip) applied while the files were decoded (kinship.data.stream)
    crops: tuple[tuple[AugmentConfig, torch.Tensor], ...] | None = None
    # rows a method appends to this step (:meth:`kinship.methods.base.Method.step_batch`), with draws of
    # their own and a shard within the appended rows of every process
    extra: "Batch | None" = None

    def __post_init__(self) -> None:
        if self.shard is None:
            self.shard = Shard.whole(len(self.index))


class Split:
    """A global batch of ``global_batch`` rows cut into equal slices, slice r for process r."""

    def __init__(self, global_batch: int, rank: int, world: int, key: str) -> None:
        if global_batch % world:
            raise DataError(f"{key} {global_batch} is not divisible by the {world} processes")
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.local_batch = global_batch // world

    @property
    def shard(self) -> Shard:
        return Shard(self.rank * self.local_batch, self.local_batch, self.global_batch)


class BatchPlan(Split):
    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1, steps_per_epoch: int = 0) -> None:
        super().__init__(global_batch, rank, world, "train.batch_size")
        if size < global_batch:
            raise DataError(
                f"train.batch_size {global_batch} is larger than the {size} training images: lower it "
                "(batches are drawn without repeats, the tail of each epoch is dropped)"
            )
        self.size, self.seed = size, seed
        self.steps_per_pass = size // global_batch
        self.steps_per_epoch = steps_per_epoch or self.steps_per_pass
        self._pass, self._perm, self._on_device = -1, torch.empty(0), torch.empty(0)

    def permutation(self, number: int, device: torch.device | None = None) -> torch.Tensor:
        """Pass ``number``'s permutation, drawn on the CPU (the same numbers on every device); with
        ``device``, copied there once per pass, so that a step's indices need no copy."""
        if number != self._pass:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
            self._pass, self._perm = number, torch.randperm(self.size, generator=g)
            self._on_device = self._perm
        if device is None:
            return self._perm
        if self._on_device.device != torch.device(device):
            self._on_device = self._perm.to(device)
        return self._on_device

    def indices(self, epoch: int, step: int, device: torch.device | None = None) -> torch.Tensor:
        number, batch = divmod(epoch * self.steps_per_epoch + step, self.steps_per_pass)  # with one pass per epoch: (epoch, step)
        start = batch * self.global_batch + self.rank * self.local_batch
        return self.permutation(number, device)[start : start + self.local_batch]


class LabeledPlan(Split):
    """The labeled stream: the global labeled batch of step s is positions [s B, (s + 1) B) of an
    endless sequence of seeded shuffles of the labeled set (pass p shuffled by (seed, p)), so 40
    labels feed a labeled batch of 64 as well as 4,000 do; process r takes its r-th slice."""

    def __init__(self, labeled: torch.Tensor, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(labeled) == 0:
            raise DataError("train.labeled_batch_size > 0 needs labeled training images, and this data has none")
        super().__init__(global_batch, rank, world, "train.labeled_batch_size")
        self.labeled, self.seed = labeled.cpu(), seed
        self._passes: dict[int, torch.Tensor] = {}

    def permutation(self, number: int) -> torch.Tensor:
        if number not in self._passes:
            if len(self._passes) > 8:
                self._passes.clear()
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + number) * 2 + 1)  # never an epoch's seed
            self._passes[number] = torch.randperm(len(self.labeled), generator=g)
        return self._passes[number]

    def indices(self, step: int) -> torch.Tensor:
        n = len(self.labeled)
        positions = step * self.global_batch + self.rank * self.local_batch + torch.arange(self.local_batch)
        out = torch.empty(self.local_batch, dtype=torch.long)
        passes = positions.div(n, rounding_mode="floor")
        for number in passes.unique().tolist():
            here = passes == number
            out[here] = self.labeled[self.permutation(number)[positions[here] % n]]
        return out


class TensorLoader:
    """Batches from an in-memory :class:`ImageSet` (on the training device), from ``start_step`` on."""

    def __init__(
        self, data: ImageSet, plan: BatchPlan, labels: torch.Tensor | None = None, labeled_plan: LabeledPlan | None = None
    ) -> None:
        self.data, self.plan, self.labeled_plan = data, plan, labeled_plan
        self.labels = data.labels if labels is None else labels.to(data.labels.device)

    def read(self, index: torch.Tensor) -> Batch:
        index = index.to(self.data.images.device)
        aspect = None if self.data.aspect is None else self.data.aspect[index]
        return Batch(index, self.data.images[index], self.labels[index], aspect=aspect)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.plan.steps_per_epoch):
            batch = self.read(self.plan.indices(epoch, step, self.data.images.device))
            batch.shard = self.plan.shard
            batch.labeled = labeled_batch(self, self.labeled_plan, epoch * self.plan.steps_per_epoch + step)
            yield batch


def labeled_batch(loader: TensorLoader, plan: LabeledPlan | None, global_step: int) -> Batch | None:
    if plan is None:
        return None
    batch = loader.read(plan.indices(global_step))
    batch.shard = plan.shard
    return batch
