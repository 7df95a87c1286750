"""One trainer for every method: data on the device, DDP, schedules, exact resume, k-NN monitor.

Exactness of resume rests on three facts: the batch order is a function of (seed, epoch); the
augmentation generator is re-seeded from (seed, rank, global step) at every step; and every
piece of state (weights, optimizer, the method's queues and caches, position, RNG) is in the
checkpoint. So 2 epochs straight and 1 + resume + 1 run the same computation.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kinship.blocks.knn import knn_accuracy
from kinship.config import RunConfig, save_config, to_dict
from kinship.data import (
    Batch, BatchPlan, DataError, ImageSet, StreamingLoader, TensorLoader, hide_unlabeled, labeled_subset, load_split,
)
from kinship.data.store import list_image_folder, read_image_files
from kinship.data.subsets import corrupt_labels, map_labels, save_indices
from kinship.eval.features import extract_features, pixel_features
from kinship.methods import METHODS, DataInfo, Method, StepInfo
from kinship.models.backbones import build_backbone
from kinship.runtime import (
    init_distributed, is_distributed, rank, resolve_device, tune_cpu_allocator, use_bf16, world_size,
)
from kinship.train import checkpoint
from kinship.train.optim import build_optimizer, learning_rate, set_learning_rate


def no_buffer_sync() -> dict[str, bool]:
    """DDP must not overwrite buffers from rank 0 at every forward: the queues and banks are kept
    identical by all-gather, and BN statistics stay per process (or SyncBN). torch >= 2.14 names
    this ``forward_sync_buffers``; older releases ``broadcast_buffers`` (ranks start identical, so
    the newer name's one sync at init changes nothing)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class Position:
    epoch: int = 0  # epoch being (or about to be) trained
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class RunData:
    info: DataInfo
    labels: torch.Tensor  # train labels on the device, -1 outside the labeled subset
    bank: ImageSet  # k-NN bank: train images (or a subset) with ground-truth labels, on the device
    test: ImageSet  # on the device
    train: ImageSet | None = None  # the whole train split on the device (None when streaming)
    files: list[Path] | None = None  # streaming: the train image files


def load_run_data(config: RunConfig, device: torch.device, out_dir: Path | None) -> RunData:
    """Decode the train and test splits once; hide labels outside the labeled subset, if any."""
    dc = config.data
    if dc.streaming:
        if dc.name != "imagefolder":
            raise DataError("data.streaming is for data.name: imagefolder")
        files, file_labels, classes = list_image_folder(Path(dc.path).expanduser())
        gt = torch.tensor(file_labels, dtype=torch.int64)
        train = None
    else:
        train = load_split(dc, "train")
        files, gt, classes = None, train.labels.clone(), train.classes
    labels = gt
    num_classes = max(len(classes), int(gt.max()) + 1)
    if dc.label_map:  # train on coarser labels (each class mapped to its parent)
        labels = map_labels(gt, Path(dc.label_map).expanduser(), num_classes)
        num_classes = int(labels.max()) + 1
    if dc.label_noise > 0:  # the method trains on corrupted labels; k-NN and evaluation use the true ones
        labels = corrupt_labels(labels, dc.label_noise, num_classes, config.train.seed)
    if dc.labeled_per_class or dc.labeled_fraction:
        labeled = labeled_subset(gt, dc.labeled_per_class, dc.labeled_fraction, config.train.seed)
        labels = hide_unlabeled(labels, labeled)
        if out_dir is not None and rank() == 0:
            save_indices(labeled, out_dir / "labeled_indices.json")
    # k-NN bank: the whole train split, or a seeded subset (always a subset when streaming)
    limit = config.eval.knn_train_limit or (10_000 if dc.streaming else 0)
    keep = None
    if 0 < limit < len(gt):
        keep = torch.randperm(len(gt), generator=torch.Generator().manual_seed(config.train.seed))[:limit].sort().values
    if train is None:
        bank_files = files if keep is None else [files[i] for i in keep.tolist()]
        bank_images = read_image_files(bank_files, dc.image_size, dc.decode_threads).to(device)
    else:
        train = train.to(device)  # once: the bank shares (or indexes) these device tensors
        bank_images = train.images if keep is None else train.images[keep.to(device)]
    bank = ImageSet(bank_images, (gt if keep is None else gt[keep]).to(device), classes)
    test = load_split(dc, "test")
    info = DataInfo(size=len(gt), num_classes=num_classes, image_size=bank.images.shape[-1])
    return RunData(info, labels.to(device), bank, test.to(device), train, files)


def make_loader(data: RunData, plan: BatchPlan, device: torch.device, workers: int) -> TensorLoader | StreamingLoader:
    if data.train is not None:
        return TensorLoader(data.train, plan, data.labels)
    return StreamingLoader(data.files, data.labels.cpu(), data.info.image_size, plan, device, workers)


def build_method(config: RunConfig, info: DataInfo) -> Method:
    m = config.model
    backbone = build_backbone(m.backbone, m.cifar_stem, m.width, m.stem_padding)
    return METHODS[config.method.name](config.method, backbone, info)


def knn_eval(method: Method, data: RunData, config: RunConfig, autocast: bool) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 of the method's backbone: train bank, test queries."""
    net = method.eval_backbone
    bank = extract_features(net, data.bank.images, method.eval_recipe, config.eval.batch_size, autocast)
    queries = extract_features(net, data.test.images, method.eval_recipe, config.eval.batch_size, autocast)
    acc = knn_accuracy(bank, data.bank.labels, queries, data.test.labels, config.eval.knn_k, config.eval.knn_temperature)
    return {"top1": acc[1], "top5": acc[5]}


def pixel_knn(method: Method, data: RunData, config: RunConfig) -> float:
    bank = pixel_features(data.bank.images, method.eval_recipe)
    queries = pixel_features(data.test.images, method.eval_recipe)
    return knn_accuracy(bank, data.bank.labels, queries, data.test.labels, config.eval.knn_k, config.eval.knn_temperature)[1]


@dataclass
class Trainer:
    config: RunConfig
    out_dir: Path
    resume: bool = False
    log: Any = print
    summary: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        tune_cpu_allocator()
        self.device = resolve_device(self.config.train.device)
        init_distributed(self.device)
        self.is_main = rank() == 0
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.autocast = use_bf16(self.config.train.precision, self.device)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.ckpt_path = self.out_dir / "last.pt"

    # -- bookkeeping -------------------------------------------------------------------------
    def write_metrics(self, record: dict) -> None:
        if self.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def metrics_lines(self) -> int:
        return len(self.metrics_path.read_text().splitlines()) if self.metrics_path.exists() else 0

    def save(self, method: Method, optimizer: torch.optim.Optimizer, pos: Position) -> None:
        if not self.is_main:
            return
        state = {
            "config": to_dict(self.config),
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "position": [pos.epoch, pos.step_in_epoch, pos.global_step],
            "metrics_lines": self.metrics_lines(),
            "torch_rng": torch.get_rng_state(),
            "world_size": world_size(),
            "data_info": dataclasses.asdict(method.data_info),
        }
        checkpoint.save_atomic(state, self.ckpt_path)

    def restore(self, method: Method, optimizer: torch.optim.Optimizer) -> Position:
        state = checkpoint.load(self.ckpt_path, self.device)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.is_main and self.metrics_path.exists():  # drop lines written after the checkpoint
            lines = self.metrics_path.read_text().splitlines()[: state["metrics_lines"]]
            self.metrics_path.write_text("".join(line + "\n" for line in lines))
            for line in lines:  # baselines and k-NN figures logged before the checkpoint
                record = json.loads(line)
                self.summary.update({k: v for k, v in record.items() if k.startswith("knn_")})
        return Position(*state["position"])

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        config, device = self.config, self.device
        torch.manual_seed(config.train.seed + rank())
        start_time = time.time()
        data = load_run_data(config, device, self.out_dir)
        method = build_method(config, data.info).to(device)
        if config.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if is_distributed() and device.type == "cuda" and config.train.sync_bn:
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        model: nn.Module = method
        if is_distributed():
            model = nn.parallel.DistributedDataParallel(method, **no_buffer_sync())
        step_fn = torch.compile(model) if config.train.compile else model
        optimizer = build_optimizer(method, config.optim, config.train.batch_size)
        plan = BatchPlan(data.info.size, config.train.batch_size, config.train.seed, rank(), world_size())
        loader = make_loader(data, plan, device, config.data.workers)
        total_steps = config.train.epochs * plan.steps_per_epoch
        warmup_steps = round(config.optim.warmup_epochs * plan.steps_per_epoch)
        base_lr = config.optim.lr * config.train.batch_size / config.optim.lr_batch

        if self.resume:
            if not self.ckpt_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
            pos = self.restore(method, optimizer)
            self.log(f"resumed from {self.ckpt_path} at epoch {pos.epoch}, step {pos.global_step}")
        else:
            pos = Position()
            if self.is_main:
                self.metrics_path.unlink(missing_ok=True)
                save_config(config, self.out_dir / "config.yaml")
                if config.eval.baselines:
                    self.baselines(method, data)

        generator = torch.Generator(device=device)
        stopped_early = False
        while pos.epoch < config.train.epochs and not stopped_early:
            method.on_epoch_start(pos.epoch)
            bar = tqdm(
                total=plan.steps_per_epoch, initial=pos.step_in_epoch, desc=f"epoch {pos.epoch + 1}/{config.train.epochs}",
                disable=not (self.is_main and config.train.progress), leave=False, dynamic_ncols=True,
            )
            loss_sum, loss_count, tick = torch.zeros((), device=device), 0, time.time()
            for batch in loader.epoch(pos.epoch, pos.step_in_epoch):
                lr = learning_rate(pos.global_step, total_steps, warmup_steps, base_lr, config.optim.final_lr_ratio)
                set_learning_rate(optimizer, lr)
                generator.manual_seed((config.train.seed * 7919 + rank()) * 1_000_003 + pos.global_step)
                info = StepInfo(pos.epoch, pos.global_step, total_steps, generator, config.train.seed * 1_000_003 + pos.global_step,
                                plan.steps_per_epoch)
                loss, logs = self.train_step(method, step_fn, optimizer, batch, info)
                method.after_step(info)
                pos.global_step += 1
                pos.step_in_epoch += 1
                loss_sum += loss.detach().float()
                loss_count += 1
                bar.update(1)
                if pos.step_in_epoch % config.train.log_every == 0 or pos.step_in_epoch == plan.steps_per_epoch:
                    mean_loss = (loss_sum / loss_count).item()
                    self.check_finite(mean_loss, pos)
                    elapsed = time.time() - tick
                    record = {"epoch": pos.epoch + 1, "step": pos.global_step, "loss": mean_loss, "lr": lr,
                              "img_per_s": loss_count * config.train.batch_size / max(elapsed, 1e-9)}
                    record.update({k: float(v) for k, v in logs.items()})
                    self.write_metrics(record)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    loss_sum.zero_()
                    loss_count, tick = 0, time.time()
                if config.train.time_limit_min > 0 and time.time() - start_time > 60 * config.train.time_limit_min:
                    stopped_early = True
                    break
            bar.close()
            if not stopped_early:
                method.on_epoch_end(pos.epoch)
                pos.epoch += 1
                pos.step_in_epoch = 0
                stopped_early = pos.epoch == config.train.stop_after_epochs < config.train.epochs
            last = pos.epoch == config.train.epochs or stopped_early
            if last or pos.epoch % max(1, config.eval.knn_every) == 0:
                self.monitor(method, data, pos)
            if last or pos.epoch % max(1, config.train.checkpoint_every) == 0:
                self.save(method, optimizer, pos)
            if is_distributed():
                dist.barrier()

        self.summary.update(minutes=(time.time() - start_time) / 60, epochs_done=pos.epoch, stopped_early=stopped_early)
        if self.is_main:
            self.write_metrics({"summary": self.summary})
        return self.summary

    def train_step(self, method: Method, step_fn: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, info: StepInfo):
        views = method.views(batch, info)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, logs = step_fn(views, batch, info)
        if self.device.type == "cpu":  # free to check every step on CPU (no device sync)
            self.check_finite(loss.item(), Position(info.epoch, -1, info.step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logs

    def check_finite(self, loss: float, pos: Position) -> None:
        if not math.isfinite(loss):
            kept = f"the last good checkpoint {self.ckpt_path} is kept" if self.ckpt_path.exists() else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"loss is {loss} at step {pos.global_step} (epoch {pos.epoch + 1}); training stopped, {kept}. "
                "Lower optim.lr, add warm-up (optim.warmup_epochs) or use train.precision: fp32."
            )

    def baselines(self, method: Method, data: RunData) -> None:
        """k-NN on raw pixels and on the network at random init, on the same split and settings."""
        pixel = pixel_knn(method, data, self.config)
        random_init = knn_eval(method, data, self.config, self.autocast)["top1"]
        self.summary.update(knn_pixel_top1=pixel, knn_random_init_top1=random_init)
        self.write_metrics({"epoch": 0, "knn_pixel_top1": pixel, "knn_random_init_top1": random_init})
        self.log(f"baselines: k-NN top-1 on raw pixels {pixel:.2f}%, on the random-init network {random_init:.2f}%")

    def monitor(self, method: Method, data: RunData, pos: Position) -> None:
        if not self.is_main:
            return
        acc = knn_eval(method, data, self.config, self.autocast)
        self.summary.update(knn_top1=acc["top1"], knn_top5=acc["top5"])
        self.write_metrics({"epoch": pos.epoch, "knn_top1": acc["top1"], "knn_top5": acc["top5"]})
        self.log(f"epoch {pos.epoch}: k-NN top-1 {acc['top1']:.2f}% top-5 {acc['top5']:.2f}%")
