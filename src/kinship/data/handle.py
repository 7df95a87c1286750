"""What a method may see of its training data: the handle the trainer gives it at build time.

Methods that look beyond their batch use it from their hooks: CLIM embeds the whole train split
every few epochs and fetches each anchor's positives by index; SsCL reads the labeled images and
refreshes class prototypes; CoKe keeps one label per image. ``embed_all`` runs a network over the
whole split (or chosen indices) in eval mode without autograd, each process embedding its share,
and gathers the rows so that every process holds the identical table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from kinship.blocks.features import View, extract_features
from kinship.data.loader import Batch
from kinship.data.store import ImageSet, read_image_files
from kinship.data.subsets import hide_unlabeled
from kinship.errors import DataError
from kinship.runtime import all_gather_cat, rank, world_size

NO_DATA = "this method was built without training data (a checkpoint loaded for evaluation)"


@dataclass
class DataInfo:
    """The shape of the training data that a method's state depends on (saved in checkpoints)."""

    size: int  # training images
    num_classes: int
    image_size: int
    labeled: int = 0  # training images whose label a method may train on (a labeled subset's size)


@dataclass
class TrainData:
    """The training split as a method sees it. ``labels`` are the labels the method may train on
    (-1 where hidden: outside the labeled subset, or none); ``true_labels`` are for metrics only
    (e.g. the purity of selected positives), never for training."""

    info: DataInfo
    labels: torch.Tensor | None = None  # int64 (N,) on the device
    true_labels: torch.Tensor | None = None  # int64 (N,) on the device, -1 where unknown
    images: torch.Tensor | None = None  # uint8 (N, 3, H, W) on the device; None when streaming
    files: list[Path] | None = None  # streaming: the image files, decoded on demand
    autocast: bool = False  # bf16 autocast for embed_all, as in training
    decode_threads: int = 0
    aspect: torch.Tensor | None = None  # float (N,): original width / height of images stored as squares

    @staticmethod
    def describe(info: DataInfo) -> "TrainData":
        """A handle without images or labels: building a method to load a checkpoint into."""
        return TrainData(info)

    @staticmethod
    def of(data: ImageSet, labeled: torch.Tensor | None = None) -> "TrainData":
        """A handle on an in-memory image set (views, benchmarks) whose labels are all known, or only
        those of the indices ``labeled`` (the others hidden)."""
        labels = data.labels if labeled is None else hide_unlabeled(data.labels, labeled.to(data.labels.device))
        info = DataInfo(
            len(data), max(len(data.classes), int(data.labels.max()) + 1), data.images.shape[-1], int((labels >= 0).sum())
        )
        return TrainData(info, labels, data.labels, data.images, aspect=data.aspect)

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def has_images(self) -> bool:
        return self.images is not None or self.files is not None

    @cached_property
    def labeled(self) -> torch.Tensor:
        """Sorted indices of the images whose training label is known."""
        if self.labels is None:
            raise DataError(NO_DATA)
        return (self.labels >= 0).nonzero().squeeze(1)

    def read(self, index: torch.Tensor) -> Batch:
        """The images (uint8 (n, 3, H, W), on the device), training labels and aspect ratios of the
        dataset indices ``index``."""
        if self.labels is None or not self.has_images:
            raise DataError(NO_DATA)
        index = index.to(self.labels.device)
        if self.images is not None:
            aspect = None if self.aspect is None else self.aspect[index]
            return Batch(index, self.images[index], self.labels[index], aspect=aspect)
        images, aspect = read_image_files(
            [self.files[i] for i in index.tolist()], self.image_size, self.decode_threads, substitute=True
        )
        return Batch(index, images.to(index.device), self.labels[index], aspect=aspect.to(index.device))

    @torch.no_grad()
    def embed_all(
        self,
        network: nn.Module,
        view: View,
        index: torch.Tensor | None = None,
        batch_size: int = 512,
        mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``network`` (eval mode, no autograd) on ``view`` of every training image, or of ``index``:
        (n, D) float32 rows in the order of ``index``, identical on every process. Each process
        embeds a contiguous share and the shares are gathered in rank order. ``mix`` = (partners (n,),
        lam (n,)): embed instead the pixel mixup lam x_index + (1 - lam) x_partner of each pair (on
        the stored 8-bit pixels, rounded; SsCL's prototype mixture)."""
        if not self.has_images:
            raise DataError(NO_DATA)
        device = self.labels.device if self.labels is not None else next(network.parameters()).device
        index = torch.arange(self.size, device=device) if index is None else index.to(device)
        world = world_size() if len(index) >= world_size() else 1  # fewer rows than processes: all on each
        shares = torch.tensor_split(index, world)
        part = rank() if world > 1 else 0
        mine = shares[part]
        if mix is not None:
            mix = tuple(torch.tensor_split(m.to(device), world)[part] for m in mix)
        local = extract_features(network, _Reader(self, mine, mix), view, batch_size, self.autocast)
        if world == 1:
            return local
        sizes = [len(s) for s in shares]
        if isinstance(local, tuple):
            return tuple(all_gather_cat(part, sizes) for part in local)
        return all_gather_cat(local, sizes)


class _Reader:
    """Chunks of ``index``'s images, read when sliced (no copy of the whole share up front), each
    mixed with its partner's when ``mix`` = (partners, lam) is given."""

    def __init__(self, data: TrainData, index: torch.Tensor, mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.data, self.index, self.mix = data, index, mix

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: slice) -> Batch:
        batch = self.data.read(self.index[rows])
        if self.mix is not None:
            partners, lam = (m[rows] for m in self.mix)
            other = self.data.read(partners).images.float()
            weight = lam.to(other.device, other.dtype).view(-1, 1, 1, 1)
            batch.images = (weight * batch.images.float() + (1 - weight) * other).round_().clamp_(0, 255).to(torch.uint8)
        return batch
