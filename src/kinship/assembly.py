"""Assembly: a run's config, data, method and checkpoint put together one way, for the trainer, the
evaluation suite, export, the benchmark and the command line.

This is the one module that knows both the method registry and the data pipeline; everything
below it (blocks, models, augment, data, methods) imports nothing from here or above.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kinship.checkpoint import read_checkpoint
from kinship.config import MethodConfig, RunConfig, parse_config, read_values
from kinship.data import (
    BatchPlan,
    DataInfo,
    ImageSet,
    LabeledPlan,
    TensorLoader,
    TrainData,
    hide_unlabeled,
    labeled_subset,
    load_split,
)
from kinship.data.store import list_image_folder, seeded_subset
from kinship.data.stream import FileImages, StreamingLoader
from kinship.data.subsets import corrupt_labels, map_labels, read_labeled_file, save_indices
from kinship.errors import CheckpointError, DataError
from kinship.methods import METHODS, Method
from kinship.models.backbones import build_backbone, remove_batch_norm, split_batch_norm
from kinship.optim import build_optimizer
from kinship.runtime import compiled, is_distributed, rank, use_bf16, world_size

__all__ = [
    "RunData",
    "assemble_training",
    "build_config",
    "build_method",
    "load_config",
    "load_pretrained",
    "load_run_data",
    "make_loader",
    "read_checkpoint",
]


def method_configs() -> dict[str, type[MethodConfig]]:
    return {name: method.Config for name, method in METHODS.items()}


def build_config(values: dict) -> RunConfig:
    """A nested dict (from YAML) as a validated :class:`RunConfig`, the method section included."""
    return parse_config(values, method_configs())


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A YAML config file (or none) with ``--set key=value`` overrides, validated."""
    return build_config(read_values(path, overrides))


@dataclass
class RunData:
    handle: TrainData  # what the method sees (labels it may train on, images, embed_all)
    # k-NN bank: train images (or a subset) with ground-truth labels, and the test split: on the
    # device, or (streamed data) files decoded a batch at a time
    bank: ImageSet | FileImages
    test: ImageSet | FileImages
    train: ImageSet | FileImages  # the whole train split with true labels: on the device, or its files

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, FileImages)


def streamed_split(config: RunConfig, split: str, device: torch.device, classes: list[str] | None = None) -> FileImages:
    """An ImageFolder split as a file list (nothing decoded), with ``data.train_limit`` / ``test_limit``
    applied as :func:`~kinship.data.store.load_split` applies them; the test split's classes are
    matched to the train split's by name."""
    dc = config.data
    if split == "test" and not dc.test_path:
        raise DataError("data.test_path (the evaluation split's ImageFolder root) is required for imagefolder")
    files, labels, names = list_image_folder(Path(dc.test_path if split == "test" else dc.path).expanduser())
    if classes is not None and names != classes:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{dc.test_path} has class folders the train split lacks: {', '.join(unknown[:5])}")
        position = {name: i for i, name in enumerate(classes)}
        labels = [position[names[label]] for label in labels]
    images = FileImages(
        files, torch.tensor(labels, dtype=torch.int64), classes or names, dc.image_size, device, dc.decode_threads
    )
    keep = seeded_subset(len(images), dc.train_limit if split == "train" else dc.test_limit, split)
    return images if keep is None else images.subset(keep)


def load_run_data(config: RunConfig, device: torch.device, out_dir: Path | None) -> RunData:
    """Decode the train and test splits once, or list their files (streamed data); hide labels
    outside the labeled subset, if any."""
    dc = config.data
    if dc.streams:
        train = streamed_split(config, "train", device)
        files, gt, classes = train.files, train.labels, train.classes
    else:
        train = load_split(dc, "train")
        files, gt, classes = None, train.labels.clone(), train.classes
    labels, num_classes = training_labels(config, gt, classes, files, out_dir)
    keep = knn_bank_rows(config, gt)
    if dc.streams:
        bank = train if keep is None else train.subset(keep)
        test = streamed_split(config, "test", device, classes)
        image_size = dc.image_size
    else:
        train = train.to(device)  # once: the bank and the method's handle share (or index) these tensors
        bank = train if keep is None else train[keep]  # ground-truth labels
        test = load_split(dc, "test").to(device)
        image_size = bank.images.shape[-1]
    info = DataInfo(size=len(gt), num_classes=num_classes, image_size=image_size, labeled=int((labels >= 0).sum()))
    images, aspect = (None, None) if dc.streams else (train.images, train.aspect)
    handle = TrainData(
        info, labels.to(device), gt.to(device), images, files, use_bf16(config.train.precision, device), dc.decode_threads, aspect
    )
    return RunData(handle, bank, test, train)


def training_labels(
    config: RunConfig, gt: torch.Tensor, classes: list[str], files: list | None, out_dir: Path | None
) -> tuple[torch.Tensor, int]:
    """The labels a method trains on (mapped to coarser classes, corrupted, hidden outside the
    labeled subset, as the config asks; the subset saved in ``out_dir``) and the number of classes."""
    dc = config.data
    if classes and int(gt.max()) >= len(classes):
        raise DataError(
            f"the train split has label {int(gt.max())}, but its data names {len(classes)} classes "
            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): labels must lie in [0, {len(classes) - 1}]"
        )
    labels, num_classes = gt, max(len(classes), int(gt.max()) + 1)
    if dc.label_map:  # train on coarser labels (each class mapped to its parent)
        labels = map_labels(gt, Path(dc.label_map).expanduser(), num_classes)
        num_classes = int(labels.max()) + 1
    if dc.label_noise > 0:  # the method trains on corrupted labels; k-NN and evaluation use the true ones
        labels = corrupt_labels(labels, dc.label_noise, num_classes, config.train.seed)
    if not (dc.labeled_per_class or dc.labeled_fraction or dc.labeled_file):
        return labels, num_classes
    if dc.labeled_file:
        if dc.name == "imagefolder" and dc.train_limit:
            raise DataError("data.labeled_file names images of the whole folder: it cannot be used with data.train_limit")
        if files is None and dc.name == "imagefolder":
            files = list_image_folder(Path(dc.path).expanduser())[0]
        labeled = read_labeled_file(Path(dc.labeled_file).expanduser(), len(gt), files)
    else:
        labeled = labeled_subset(gt, dc.labeled_per_class, dc.labeled_fraction, config.train.seed)
    if out_dir is not None and rank() == 0:
        save_indices(labeled, out_dir / "labeled_indices.json")
    return hide_unlabeled(labels, labeled), num_classes


def knn_bank_rows(config: RunConfig, gt: torch.Tensor) -> torch.Tensor | None:
    """The train rows of the k-NN monitor's bank: the labeled images (STL-10's unlabeled split is no
    one's neighbour), or a seeded subset of them (always a subset when streaming); None: all."""
    limit = config.eval.knn_train_limit or (10_000 if config.data.streams else 0)
    candidates = (gt >= 0).nonzero().squeeze(1)
    if 0 < limit < len(candidates):
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(config.train.seed))
        return candidates[order[:limit]].sort().values
    return None if len(candidates) == len(gt) else candidates


def make_loader(
    data: RunData, config: RunConfig, plan: BatchPlan, device: torch.device, method: Method
) -> TensorLoader | StreamingLoader:
    """The unlabeled stream over the whole train split and, with ``train.labeled_batch_size``, the
    labeled one: from the images in memory, or decoded and cropped from the files for ``method``'s
    view recipes."""
    labeled_plan = None
    if config.train.labeled_batch_size:
        labeled_plan = LabeledPlan(data.handle.labeled, config.train.labeled_batch_size, config.train.seed, rank(), world_size())
    if not data.streamed:
        return TensorLoader(data.train, plan, data.handle.labels, labeled_plan)
    labeled_recipes = method.view_recipes(labeled=True) if labeled_plan is not None else []
    workers = min(config.data.workers, len(os.sched_getaffinity(0)))  # more decoding processes than cores only queue
    return StreamingLoader(
        data.handle.files,
        data.handle.labels,
        plan,
        device,
        method.view_recipes(),
        labeled_recipes,
        labeled_plan,
        workers,
        config.data.prefetch,
        config.train.seed,
        config.data.decoder,
    )


def build_method(config: RunConfig, data: TrainData) -> Method:
    m = config.model
    backbone = build_backbone(m.backbone, m.cifar_stem, m.width, m.stem_padding, m.zero_init_residual)
    if m.norm == "split":
        split_batch_norm(backbone, m.bn_splits)
    method = METHODS[config.method.name](config.method, backbone, data)
    return remove_batch_norm(method) if m.norm == "none" else method


def assemble_training(
    config: RunConfig, data: TrainData, device: torch.device
) -> tuple[Method, nn.Module, torch.optim.Optimizer]:
    """The method on ``device`` (channels-last, SyncBN under DDP on GPU unless it keeps per-process BN),
    the function a step calls (the method, or its DDP and compiled wrappers) and its optimizer: the one
    way the trainer and the bench put a run together."""
    t = config.train
    method = build_method(config, data).to(device)
    if t.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if is_distributed() and device.type == "cuda":
        method = synchronised_batch_norm(method, t.sync_bn)
    model: nn.Module = method
    if is_distributed():
        model = nn.parallel.DistributedDataParallel(method, find_unused_parameters=method.unused_parameters, **no_buffer_sync())
    step_fn = compiled(model, t.compile, t.compile_backend, t.compile_mode)
    return method, step_fn, build_optimizer(method, config.optim, t.batch_size)


def synchronised_batch_norm(method: Method, sync_bn: bool) -> Method:
    """The method with SyncBN under DDP (``train.sync_bn``), unless it keeps per-process BN."""
    if not sync_bn or method.per_process_batch_norm:
        return method
    return nn.SyncBatchNorm.convert_sync_batchnorm(method)


def no_buffer_sync() -> dict[str, bool]:
    """DDP must not overwrite buffers from rank 0 at every forward: the queues and banks are kept
    identical by all-gather, and BN statistics stay per process (or SyncBN). torch >= 2.14 names
    this ``forward_sync_buffers``; older releases ``broadcast_buffers`` (ranks start identical, so
    the newer name's one sync at init changes nothing)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def load_pretrained(path: Path, state: dict, config: RunConfig, info: DataInfo, device: torch.device) -> Method:
    """The method of ``config`` with the checkpoint's weights, in eval mode, or a CheckpointError naming the mismatch."""
    if "data_info" in state:  # the shapes of the method's state follow the data it was trained on
        info = DataInfo(**state["data_info"])
    try:
        method = build_method(config, TrainData.describe(info))
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, ValueError) as exc:
        trained = state["config"].get("model", {})
        raise CheckpointError(
            f"checkpoint {path} does not fit the model of this config: it was trained with method "
            f"'{state['config']['method']['name']}', backbone {trained.get('backbone')} (width {trained.get('width')}, "
            f"cifar_stem {trained.get('cifar_stem')}); this config asks for method '{config.method.name}', backbone "
            f"{config.model.backbone} (width {config.model.width}, cifar_stem {config.model.cifar_stem}). "
            + " ".join(line.strip() for line in str(exc).splitlines()[:2])
        ) from exc
    return method.to(device).eval()
