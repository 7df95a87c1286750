"""Throughput of one training step: ``pipeline`` (uint8 data on the device -> augment -> step) or
``compute_only`` (the same step on fixed, already augmented views), over a run of steps between two
synchronisations (``img_per_s_run``: what training sees on a GPU, where the host runs ahead) and from
the median of steps synchronised one by one (``img_per_s``; the solvers' share of the time,
``solver_frac``, is measured there); and the ops one more step dispatches in each phase (views,
forward + backward + optimizer, after_step), with those that make the host wait for the device
(:mod:`kinship.dispatch`)."""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from kinship.assembly import assemble_training, build_config
from kinship.augment.views import compiled_views
from kinship.config import RunConfig, apply_overrides
from kinship.data import BatchPlan, ImageSet, LabeledPlan, TensorLoader, TrainData, labeled_subset
from kinship.dispatch import OpLog
from kinship.methods import METHODS, StepInfo
from kinship.methods.base import run_step
from kinship.runtime import (
    deterministic,
    environment,
    resolve_device,
    timed_sections,
    tune_cpu_allocator,
    tune_cuda,
    use_bf16,
)


class StepRunner:
    """Steps of one method as the trainer runs them (:func:`kinship.methods.base.run_step`), on random
    uint8 images on the device: fresh batches (``pipeline``) or one batch's views again (``compute_only``)."""

    def __init__(self, config: RunConfig, device: torch.device, images: int, compute_only: bool, autocast: bool) -> None:
        batch = config.train.batch_size
        self.n = max(batch * 4, images)  # by default more images than a memory bank holds
        g = torch.Generator().manual_seed(0)
        data = ImageSet(
            torch.randint(0, 256, (self.n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (self.n,), generator=g),
            [str(i) for i in range(10)],
        ).to(device)
        handle, labeled_plan = TrainData.of(data), None
        if config.train.labeled_batch_size:  # semi-supervised: 25 labels per class, a labeled batch beside each unlabeled one
            handle = TrainData.of(data, labeled_subset(data.labels, per_class=25))
            labeled_plan = LabeledPlan(handle.labeled, config.train.labeled_batch_size, seed=0)
        self.method, self.step_fn, self.optimizer = assemble_training(config, handle, device)
        self.loader = TensorLoader(data, BatchPlan(self.n, batch, seed=0), handle.labels, labeled_plan)
        self.device, self.compute_only, self.autocast = device, compute_only, autocast
        self.steps_per_epoch, self.generator = self.n // batch, torch.Generator(device=device).manual_seed(0)
        self.batches, self.fixed = iter(()), None
        self.compiled_graphs: list[int] = []  # the graphs dynamo made in each step (train.compile)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def refresh_all(self, total_steps: int) -> dict[str, float]:
        """Each of the method's refreshes once, timed (so the timed steps are those after a refresh)."""
        seconds = {}
        for refresh in self.method.refreshes():
            start = time.perf_counter()
            self.method.refresh(refresh.name, StepInfo(0, 0, total_steps, self.generator, 0, self.steps_per_epoch))
            self.sync()
            seconds[refresh.name] = round(time.perf_counter() - start, 2)
        return seconds

    def step(self, i: int, total_steps: int, logs: dict[str, OpLog] | None = None) -> None:
        graphs = counters["stats"]["unique_graphs"]
        phase = (lambda name: logs[name]) if logs else (lambda name: contextlib.nullcontext())
        info = StepInfo(0, i, total_steps, self.generator, i, self.steps_per_epoch)
        if self.compute_only and self.fixed is not None:
            batch, views = self.fixed
        else:
            batch, views = next(self.batches, None), None
            if batch is None:
                self.batches = self.loader.epoch(i)
                batch = next(self.batches)
        device = self.device.type if self.autocast else None
        _, _, views = run_step(self.method, self.step_fn, self.optimizer, batch, info, device, views, phase)
        if self.compute_only:
            self.fixed = (batch, views)
        self.compiled_graphs.append(counters["stats"]["unique_graphs"] - graphs)

    def time(self, warmup: int, steps: int) -> dict:
        """The first step, a run of ``steps`` between two synchronisations (the host queues work while
        the device runs, as in training), then ``steps`` synchronised one by one with the solver timed
        within (the median is robust to a shared machine's slowdowns), then one step's ops."""
        total = warmup + 2 * steps + 1
        refresh_s = self.refresh_all(total)
        start = time.perf_counter()
        self.step(0, total)
        self.sync()
        first_step_s = time.perf_counter() - start  # with compile: the compilation
        for i in range(1, warmup):
            self.step(i, total)
        self.sync()
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            self.step(i, total)
        self.sync()
        run_s, times = time.perf_counter() - start, []
        with timed_sections() as sections:
            for i in range(warmup + steps, warmup + 2 * steps):
                start = time.perf_counter()
                self.step(i, total)
                self.sync()
                times.append(time.perf_counter() - start)
        logs = {name: OpLog() for name in ("views", "step", "after_step")}
        with torch.compiler.set_stance("force_eager"):  # the ops the code asks for (compiled frames skip a dispatch mode)
            self.step(warmup + 2 * steps, total, logs)
        return {
            "first_step_s": first_step_s,
            "run_s": run_s,
            "times": times,
            "sections": dict(sections),
            "logs": logs,
            "refresh_s": refresh_s,
        }


def bench(
    method: str,
    device: str,
    backbone: str,
    batch: int,
    steps: int,
    compute_only: bool,
    compile: bool = False,
    precision: str = "auto",
    warmup: int = 3,
    width: int = 32,
    overrides: list[str] = (),
    tune_allocator: bool = True,
    channels_last: bool = True,
    images: int = 16384,
) -> dict:
    """``tune_allocator`` / ``channels_last`` False: measure what each of them is worth (the allocator
    setting is per process: a run without it needs a process of its own)."""
    if tune_allocator:
        tune_cpu_allocator()
    dev = resolve_device(device)
    tune_cuda(dev)
    train = {"batch_size": batch, "compile": compile, "channels_last": channels_last}
    if method in METHODS and METHODS[method].Config.needs_labeled_batch:  # FixMatch's mu = 4: 64 beside 256
        train["labeled_batch_size"] = max(2, batch // 4)
    values = {"method": {"name": method}, "model": {"backbone": backbone, "width": width}, "train": train}
    config = build_config(apply_overrides(values, list(overrides)))
    runner = StepRunner(config, dev, images, compute_only, use_bf16(precision, dev))
    with (
        compiled_views(compile, config.train.compile_backend, config.train.compile_mode),
        deterministic(config.train.deterministic),
    ):
        timed = runner.time(warmup, steps)
    times, logs, sections = timed["times"], timed["logs"], timed["sections"]
    return {
        "method": method,
        "overrides": list(overrides),
        "backbone": backbone,
        "device": dev.type,
        "batch": batch,
        "mode": "compute_only" if compute_only else "pipeline",
        "img_per_s": round(batch / statistics.median(times), 1),
        "img_per_s_mean": round(batch * steps / sum(times), 1),
        "img_per_s_run": round(batch * steps / timed["run_s"], 1),
        "steps": steps,
        "compile": compile,
        "first_step_s": round(timed["first_step_s"], 2),
        **({"compiled_graphs": runner.compiled_graphs} if compile else {}),
        "channels_last": channels_last,
        "deterministic": config.train.deterministic,
        "autocast_bf16": runner.autocast,
        "env": environment(),
        "ops": {name: log.total for name, log in logs.items()},
        "host_syncs": {name: dict(log.syncs) for name, log in logs.items() if log.syncs},
        **({"solver_frac": round(sections["solver"] / sum(times), 4)} if "solver" in sections else {}),
        **({"refresh_s": timed["refresh_s"], "images": runner.n} if timed["refresh_s"] else {}),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus that of each of its live child processes (the
    DataLoader workers), from /proc (Linux); this process alone elsewhere."""
    import resource

    total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != os.getpid():
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        total += next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)
    return round(total, 1)


def loader_bench(
    folder: str,
    workers: int,
    batch: int,
    steps: int,
    image_size: int = 224,
    views: int = 2,
    prefetch: int = 4,
    warmup: int = 2,
    device: str = "cpu",
    decoder: str = "pil",
) -> dict:
    """Source images per second that the streaming loader delivers from an ImageFolder (``views``
    random-resized crops RandomResizedCrop(image_size, (0.2, 1)) + flip per image, as MoCo v2's and
    CoKe's loaders, uint8 on ``device``; ``decoder`` as ``data.decoder``), after ``warmup`` batches
    (timed up to the device's last copy), and the peak memory of this process and its workers."""
    from kinship.config import AugmentConfig
    from kinship.data.store import list_image_folder
    from kinship.data.stream import StreamingLoader

    files, labels, _ = list_image_folder(Path(folder).expanduser())
    plan = BatchPlan(len(files), batch, seed=0)
    recipe = AugmentConfig(crop_size=image_size, crop_scale=(0.2, 1.0))
    dev = resolve_device(device)
    loader = StreamingLoader(
        files, torch.tensor(labels), plan, dev, [recipe] * views, workers=workers, prefetch=prefetch, decoder=decoder
    )
    batches = (b for epoch in itertools.count() for b in loader.epoch(epoch))
    for _ in range(warmup):
        next(batches)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "loader": "kinship",
        "decoder": decoder,
        "device": dev.type,
        "folder": str(folder),
        "images": len(files),
        "workers": workers,
        "batch": batch,
        "steps": steps,
        "views": views,
        "image_size": image_size,
        "img_per_s": round(batch * steps / seconds, 1),
        "peak_rss_mb": peak_rss_mb(),
        "env": environment(),
    }
    loader.close()
    return result
