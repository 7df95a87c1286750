"""Batches of dataset indices, identical on every process, and the loaders that turn them into images.

The order of an epoch is a seeded permutation of the dataset, a function of (seed, epoch) only,
so a resumed run replays it exactly. Global batch b of the epoch is ``perm[b*B:(b+1)*B]`` and
process r takes its r-th slice: the concatenation over processes is the single-process batch,
which is what makes N processes equal to one on the concatenated batch. The tail is dropped (a
per-image cache must never see an image twice in one step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from kinship.data.store import ImageSet, read_image_file


@dataclass
class Batch:
    index: torch.Tensor  # int64 (B,), dataset indices
    images: torch.Tensor  # uint8 (B, 3, H, W)
    labels: torch.Tensor  # int64 (B,), -1 where the label is hidden or absent


class BatchPlan:
    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if size < global_batch:
            raise ValueError(f"dataset of {size} images is smaller than one batch of {global_batch}")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self._epoch, self._perm = -1, torch.empty(0)

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm

    def indices(self, epoch: int, step: int) -> torch.Tensor:
        start = step * self.global_batch + self.rank * self.local_batch
        return self.permutation(epoch)[start : start + self.local_batch]


class TensorLoader:
    """Batches from an in-memory :class:`ImageSet` (on the training device), from ``start_step`` on."""

    def __init__(self, data: ImageSet, plan: BatchPlan, labels: torch.Tensor | None = None) -> None:
        self.data, self.plan = data, plan
        self.labels = data.labels if labels is None else labels.to(data.labels.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.plan.steps_per_epoch):
            index = self.plan.indices(epoch, step).to(self.data.images.device)
            yield Batch(index, self.data.images[index], self.labels[index])


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_image_file(self.files[i], self.size)


class StreamingLoader:
    """For image folders too big for memory: DataLoader workers decode each planned batch to uint8.

    Only decoding runs in the workers; augmentation stays batched on the training device.
    """

    def __init__(
        self, files: list[Path], labels: torch.Tensor, size: int, plan: BatchPlan, device: torch.device, workers: int
    ) -> None:
        self.dataset, self.labels, self.plan, self.device, self.workers = _FileDataset(files, size), labels, plan, device, workers

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        batches = [self.plan.indices(epoch, s).tolist() for s in range(start_step, self.plan.steps_per_epoch)]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.workers, pin_memory=self.device.type == "cuda"
        )
        for indices, images in zip(batches, loader):
            index = torch.tensor(indices, device=self.device)
            yield Batch(index, images.to(self.device, non_blocking=True), self.labels.to(self.device)[index])
