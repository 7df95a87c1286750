"""Image folders of any size, streamed: each process decodes only its rows of each step's batch, in
DataLoader workers that live for the whole run, and cuts each view's geometry while decoding.

For every step a worker gets this process's dataset indices of the global batch (and of the labeled
batch) and returns, for each view recipe the method declares (``Method.view_recipes``), a uint8
(B, 3, S, S) tensor of crops. A random-resized-crop recipe's box and flip are drawn from a generator
seeded by (seed, step) for the *global* batch, this shard's rows kept (:mod:`kinship.sampling`), and
placed on each file's original geometry by torchvision's RandomResizedCrop rule
(:func:`kinship.augment.ops.crop_boxes` with the file's own width and height). The JPEG is decoded at
the strongest DCT-domain reduction (1/2, 1/4 or 1/8, PIL's ``draft``) that keeps every crop of the
image at least as large as its output, then each crop is resized (PIL bilinear, antialiased, as
torchvision's transform on a PIL image) and flipped. A pad-crop recipe (FixMatch's weak view) gets
the whole image at its output size and is translated on the device. The photometric ops (jitter,
grayscale, blur, solarize, RandAugment) run batched on the training device
(:func:`kinship.augment.views.make_views`). Memory per process is the file list plus the batches in
flight, whatever the size of the folder.

A file that cannot be read is replaced by the next readable file of the list (a function of the list
alone, so a resumed run meets the same substitute), reported with its path and counted; the
trainer stops the run once more than ``data.max_bad_files`` of the training images have failed.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from kinship.augment import ops
from kinship.augment.views import draw_geometry
from kinship.blocks.features import View, extract_features
from kinship.config import AugmentConfig
from kinship.data.loader import Batch, BatchPlan, LabeledPlan, Split
from kinship.data.store import UNREADABLE, ImageSet, first_readable, read_image_files
from kinship.runtime import all_gather_cat, progress_bar, rank, world_size
from kinship.sampling import Shard


def open_image(path: Path) -> Image.Image:
    """The file read into memory and its header parsed (size, format); pixels not decoded yet."""
    with open(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
    image.size  # noqa: B018 - parsed by open; an unidentified file has raised by now
    return image


def crop_views(
    image: Image.Image, boxes: list[tuple[float, float, float, float]], sizes: list[int], flips: list[bool]
) -> list[np.ndarray]:
    """Each box (x0, y0, w, h, in the file's pixels) of ``image`` resized to its size (H, W, 3 uint8),
    mirrored where flipped; decoded once, at the strongest JPEG reduction that keeps every box at
    least as large as its output."""
    width, height = image.size
    reduction = min(min(w, h) / size for (_, _, w, h), size in zip(boxes, sizes))
    if reduction >= 2:
        image.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
    image = image.convert("RGB")  # decodes: a truncated or corrupt file raises here
    sx, sy = image.width / width, image.height / height
    out = []
    for (x0, y0, w, h), size, flip in zip(boxes, sizes, flips):
        # cut first, as torchvision does (the filter sees no pixel beyond the box), then resize the box
        # within the cut (the whole cut, unless the reduction made the box's corners fractional)
        left, top, right, bottom = x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy
        cut = (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))
        view = image.crop(cut).resize(
            (size, size), Image.BILINEAR, box=(left - cut[0], top - cut[1], right - cut[0], bottom - cut[1])
        )
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(view))
    return out


def jpeg_source(image: Image.Image, path: Path) -> torch.Tensor:
    """The file's bytes (uint8) for a batched decode on the training device (``data.decoder:
    nvjpeg``), once its compressed data has been checked by a decode at 1/8 scale (1/64 of the
    work); a file that is not an RGB or grayscale JPEG, re-encoded as one (quality 95)."""
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()  # a truncated or corrupt file raises here
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=95)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def crop_on_device(images: list[torch.Tensor], boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, size, size): box i (x0, y0, w, h) of decoded image i (uint8 (3, H, W)) resized by
    ``roi_align`` (each output pixel the mean of about (box / size)^2 samples: antialiased), mirrored
    where ``flip``; boxes and flips on the images' device, so nothing is read back."""
    from torchvision.ops import roi_align

    corners = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    crops = torch.cat(
        [roi_align(image.unsqueeze(0).float(), [corners[i : i + 1]], size, aligned=True) for i, image in enumerate(images)]
    )
    crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def step_seed(seed: int, step: int, stream: int) -> int:
    """The seed of a step's decode-time draws (``stream`` 0: the batch, 1: the labeled batch)."""
    return ((seed * 1_000_003 + step) * 2 + stream) * 7 + 5


class FileCrops(torch.utils.data.Dataset):
    """The worker's side: a task (step, indices, labeled indices) -> the crops of every recipe."""

    def __init__(
        self,
        files: list[Path],
        recipes: list[AugmentConfig],
        labeled_recipes: list[AugmentConfig],
        shards: tuple[Shard, Shard | None],
        seed: int,
        decoder: str = "pil",
    ) -> None:
        self.files, self.recipes, self.labeled_recipes, self.shards, self.seed = files, recipes, labeled_recipes, shards, seed
        self.decoder = decoder  # pil: crops made here | nvjpeg: the file's bytes and boxes, decoded on the device

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, task: tuple[int, list[int], list[int] | None]) -> dict:
        step, index, labeled = task
        out = self.decode(index, self.recipes, self.shards[0], step_seed(self.seed, step, 0))
        if labeled is not None:
            out["labeled"] = self.decode(labeled, self.labeled_recipes, self.shards[1], step_seed(self.seed, step, 1))
        return out

    def decode(self, index: list[int], recipes: list[AugmentConfig], shard: Shard, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        draws = [draw_geometry(r, shard, generator, "cpu") if r.crop_mode == "resized" else None for r in recipes]
        sizes = [r.crop_size for r in recipes]
        bad: list[tuple[str, str]] = []
        images, used = map(list, zip(*(self.readable(i, bad) for i in index)))
        boxes, flips = self.boxes(draws, recipes, [image.size for image in images], slice(None))
        done = []
        for row, (image, i) in enumerate(zip(images, used)):
            try:
                done.append(self.prepare(image, self.files[i], boxes[row], sizes, flips[row]))
            except UNREADABLE as exc:  # the header was fine, the data is not: the next readable file

                def substitute(path: Path) -> tuple:
                    image = open_image(path)
                    (box,), (flip,) = self.boxes(draws, recipes, [image.size], slice(row, row + 1))
                    return self.prepare(image, path, box, sizes, flip), box, flip

                bad.append((str(self.files[i]), f"{type(exc).__name__}: {exc}"))
                (made, boxes[row], flips[row]), _ = first_readable(self.files, (i + 1) % len(self.files), substitute, bad)
                done.append(made)
        out = {"index": torch.tensor(index, dtype=torch.int64), "bad": bad}
        if self.decoder == "pil":
            out["crops"] = [torch.from_numpy(np.stack([c[v] for c in done])).permute(0, 3, 1, 2) for v in range(len(recipes))]
        else:
            out.update(jpeg=done, boxes=torch.tensor(boxes, dtype=torch.float32), flips=torch.tensor(flips, dtype=torch.bool))
        return out

    def readable(self, i: int, bad: list[tuple[str, str]]) -> tuple[Image.Image, int]:
        """File ``i`` opened, or the next file of the list that opens (each failure noted in ``bad``)."""
        return first_readable(self.files, i, open_image, bad)

    def prepare(
        self, image: Image.Image, path: Path, boxes: list, sizes: list[int], flips: list[bool]
    ) -> np.ndarray | torch.Tensor:
        """What the worker sends of one image: its crops (``pil``) or its checked JPEG bytes (``nvjpeg``)."""
        return crop_views(image, boxes, sizes, flips) if self.decoder == "pil" else jpeg_source(image, path)

    @staticmethod
    def boxes(draws: list, recipes: list[AugmentConfig], sizes: list[tuple[int, int]], rows: slice) -> tuple[list, list]:
        """Per image, per recipe: its box (x0, y0, w, h) in the file's pixels and its flip, for the
        images of ``sizes`` (width, height) at rows ``rows`` of the draws."""
        width = torch.tensor([w for w, _ in sizes], dtype=torch.float32)
        height = torch.tensor([h for _, h in sizes], dtype=torch.float32)
        whole = torch.stack([torch.zeros_like(width), torch.zeros_like(width), width, height], 1).tolist()
        boxes, flips = [], []
        for recipe, draw in zip(recipes, draws):
            if draw is None:  # pad-crop: the whole image, translated and flipped on the device
                boxes.append(whole)
                flips.append([False] * len(sizes))
            else:
                crop = {k: v[rows] for k, v in draw["crop"].items()}
                boxes.append(ops.crop_boxes(height, width, recipe.crop_ratio, **crop).tolist())
                flips.append(draw["flip"]["select"][rows].tolist())
        return [list(b) for b in zip(*boxes)], [list(f) for f in zip(*flips)]


class _Steps:
    """The loader's sampler: the task of every global step from ``start`` on (no end: the trainer stops)."""

    def __init__(self, plan: BatchPlan, labeled_plan: LabeledPlan | None, start: int) -> None:
        self.plan, self.labeled_plan, self.start = plan, labeled_plan, start

    def __iter__(self) -> Iterator[tuple[int, list[int], list[int] | None]]:
        for step in itertools.count(self.start):
            epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
            labeled = None if self.labeled_plan is None else self.labeled_plan.indices(step).tolist()
            yield step, self.plan.indices(epoch, in_epoch).tolist(), labeled


class StreamingLoader:
    """Batches of crops from image files, for :class:`~kinship.train.trainer.Trainer`: one DataLoader
    for the run (workers alive across epochs), ``prefetch`` batches per worker prepared ahead in
    pinned memory on a GPU, copied with ``non_blocking``; nothing in a step waits on the host."""

    def __init__(
        self,
        files: list[Path],
        labels: torch.Tensor,
        plan: BatchPlan,
        device: torch.device,
        recipes: list[AugmentConfig],
        labeled_recipes: list[AugmentConfig] = (),
        labeled_plan: LabeledPlan | None = None,
        workers: int = 8,
        prefetch: int = 4,
        seed: int = 0,
        decoder: str = "pil",
    ) -> None:
        self.plan, self.labeled_plan, self.device, self.workers, self.prefetch = plan, labeled_plan, device, workers, prefetch
        self.labels = labels.to(device)
        self.recipes, self.labeled_recipes = tuple(recipes), tuple(labeled_recipes)
        shards = (plan.shard, None if labeled_plan is None else labeled_plan.shard)
        self.dataset = FileCrops(files, list(recipes), list(labeled_recipes), shards, seed, decoder)
        self.bad_files: dict[str, str] = {}  # every file that failed: path -> error
        self.new_bad_files: list[str] = []  # paths not reported yet (the trainer logs and clears them)
        self._batches: Iterator[dict] | None = None
        self._next_step = -1

    def start(self, epoch: int, step_in_epoch: int = 0) -> None:
        """Start the workers on the batches from (``epoch``, ``step_in_epoch``) on; :meth:`epoch` does
        it too, when its first step is not the one the workers prepare next."""
        step = epoch * self.plan.steps_per_epoch + step_in_epoch
        self._batches = iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_size=None,
                sampler=_Steps(self.plan, self.labeled_plan, step),
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=self.prefetch if self.workers else None,
            )
        )
        self._next_step = step

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self._batches is None or self._next_step != epoch * self.plan.steps_per_epoch + start_step:
            self.start(epoch, start_step)
        for _ in range(start_step, self.plan.steps_per_epoch):
            out = next(self._batches)
            self._next_step += 1
            batch = self._batch(out, self.recipes, self.plan)
            if "labeled" in out:
                batch.labeled = self._batch(out["labeled"], self.labeled_recipes, self.labeled_plan)
            yield batch

    def _batch(self, out: dict, recipes: tuple[AugmentConfig, ...], split: Split) -> Batch:
        for path, error in out["bad"]:
            if path not in self.bad_files:
                self.bad_files[path] = error
                self.new_bad_files.append(path)
        index = out["index"].to(self.device, non_blocking=True)
        if "jpeg" in out:  # decoded here, on the training device (nvJPEG on a GPU), in one batched call
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(out["jpeg"], mode=ImageReadMode.RGB, device=self.device)
            boxes, flips = out["boxes"].to(self.device, non_blocking=True), out["flips"].to(self.device, non_blocking=True)
            made = [crop_on_device(images, boxes[:, v], recipe.crop_size, flips[:, v]) for v, recipe in enumerate(recipes)]
        else:
            made = [crop.to(self.device, non_blocking=True) for crop in out["crops"]]
        return Batch(index, None, self.labels[index], split.shard, crops=tuple(zip(recipes, made)))

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected)."""
        self._batches, self._next_step = None, -1


class FileImages:
    """A list of image files with their labels, decoded a slice at a time (to ``size`` squares with
    their aspect ratios, :func:`~kinship.data.store.read_image_file`): the k-NN bank and the test
    split of streamed data, whose features are extracted in batches without holding the pixels."""

    def __init__(
        self,
        files: list[Path],
        labels: torch.Tensor,
        classes: list[str],
        size: int,
        device: torch.device,
        threads: int = 0,
        center: int = 0,
    ) -> None:
        self.files, self.labels, self.classes, self.size, self.device, self.threads = (
            files,
            labels,
            classes,
            size,
            device,
            threads,
        )
        self.center = center  # > 0: decode Resize(center) + CenterCrop(size) of each file (see for_view), not the whole image

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: torch.Tensor) -> "FileImages":
        """The files of ``index``, not decoded."""
        rows = index.cpu()
        return FileImages(
            [self.files[i] for i in rows.tolist()],
            self.labels[rows.to(self.labels.device)],
            self.classes,
            self.size,
            self.device,
            self.threads,
            self.center,
        )

    def for_view(self, view: View) -> tuple["FileImages", View]:
        """These files as :func:`~kinship.blocks.features.extract_features` reads them for ``view``, and
        what is left of the view to apply: a Resize + CenterCrop evaluation view (``eval_resize``) is
        decoded from each file as torchvision makes it, where cutting it from the whole image squeezed
        into a ``data.image_size`` square would lose resolution along the longer side; any other view
        works on the whole images."""
        if not (isinstance(view, AugmentConfig) and view.eval_resize > 0):
            return self, view
        views = FileImages(self.files, self.labels, self.classes, view.crop_size, self.device, self.threads, view.eval_resize)
        return views, dataclasses.replace(view, eval_resize=0)  # the rest: normalisation

    def __getitem__(self, rows: slice | torch.Tensor) -> ImageSet:
        """The images of ``rows`` decoded, on the device (an :class:`ImageSet`'s rows)."""
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else rows.cpu()
        images, aspect = read_image_files(
            [self.files[i] for i in index.tolist()], self.size, self.threads, substitute=True, center=self.center
        )
        labels = self.labels[index.to(self.labels.device)].cpu()
        return ImageSet(images, labels, self.classes, None if self.center else aspect).to(self.device)

    def features(self, network: nn.Module, view: View, batch_size: int, autocast: bool) -> torch.Tensor:
        """:func:`~kinship.blocks.features.extract_features` of every image, each process decoding
        and embedding a contiguous share, the rows gathered in order: every process must call it."""
        world = world_size() if len(self) >= world_size() else 1
        shares = torch.tensor_split(torch.arange(len(self)), world)
        local = extract_features(network, self.subset(shares[rank() if world > 1 else 0]), view, batch_size, autocast)
        return local if world == 1 else all_gather_cat(local, [len(s) for s in shares])


def check_files(files: list[Path], progress: bool = True) -> list[tuple[Path, str]]:
    """Every file of ``files`` that does not decode, with the reason (``kinship check-data``)."""
    bad = []
    for path in progress_bar(files, progress, desc="checking images", unit="img"):
        try:
            open_image(path).convert("RGB")
        except UNREADABLE as exc:
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    return bad
