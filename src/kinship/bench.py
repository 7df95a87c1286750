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

from kinship.assembly import build_config, build_method
from kinship.augment.views import compiled_views
from kinship.config import apply_overrides
from kinship.data import BatchPlan, ImageSet, LabeledPlan, TensorLoader, TrainData, labeled_subset
from kinship.dispatch import OpLog
from kinship.methods import StepInfo
from kinship.methods.base import run_step
from kinship.optim import build_optimizer
from kinship.runtime import (
    compiled,
    deterministic,
    environment,
    resolve_device,
    timed_sections,
    tune_cpu_allocator,
    tune_cuda,
    use_bf16,
)


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
    values = {
        "method": {"name": method},
        "model": {"backbone": backbone, "width": width},
        "train": {"batch_size": batch, "compile": compile},
    }
    config = build_config(apply_overrides(values, list(overrides)))
    g = torch.Generator().manual_seed(0)
    n = max(batch * 4, images)  # by default more images than a memory bank holds
    data = ImageSet(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        [str(i) for i in range(10)],
    ).to(dev)
    handle, labeled_plan = TrainData.of(data), None
    if config.train.labeled_batch_size:  # semi-supervised: 25 labels per class, a labeled batch beside each unlabeled one
        handle = TrainData.of(data, labeled_subset(data.labels, per_class=25))
        labeled_plan = LabeledPlan(handle.labeled, config.train.labeled_batch_size, seed=0)
    model = build_method(config, handle).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optim, batch)
    step_fn = compiled(model, compile, config.train.compile_backend, config.train.compile_mode)
    autocast = use_bf16(precision, dev)
    loader = TensorLoader(data, BatchPlan(n, batch, seed=0), handle.labels, labeled_plan)
    generator = torch.Generator(device=dev).manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    total_steps = warmup + 2 * steps + 1  # warm-up, the run, the steps synchronised one by one, the counted one
    batches = iter(())
    fixed: tuple | None = None
    refresh_s = {}
    for refresh in model.refreshes():  # once up front, so the timed steps are those after a refresh
        start = time.perf_counter()
        model.refresh(refresh.name, StepInfo(0, 0, total_steps, generator, 0, n // batch))
        sync()
        refresh_s[refresh.name] = round(time.perf_counter() - start, 2)

    compiled_graphs: list[int] = []  # the graphs dynamo made in each step (train.compile)

    def one_step(i: int, logs: dict[str, OpLog] | None = None) -> None:
        nonlocal batches, fixed
        graphs = counters["stats"]["unique_graphs"]
        phase = (lambda name: logs[name]) if logs else (lambda name: contextlib.nullcontext())
        info = StepInfo(0, i, total_steps, generator, i, n // batch)
        if compute_only and fixed is not None:
            b, views = fixed
        else:
            b, views = next(batches, None), None
            if b is None:
                batches = loader.epoch(i)
                b = next(batches)
        _, _, views = run_step(model, step_fn, optimizer, b, info, dev.type if autocast else None, views, phase)
        if compute_only:
            fixed = (b, views)
        compiled_graphs.append(counters["stats"]["unique_graphs"] - graphs)

    with (
        compiled_views(compile, config.train.compile_backend, config.train.compile_mode),
        deterministic(config.train.deterministic),
    ):
        start = time.perf_counter()
        one_step(0)
        sync()
        first_step_seconds = time.perf_counter() - start  # with compile: the compilation
        for i in range(1, warmup):
            one_step(i)
        sync()
        # A run of steps between two synchronisations: the host queues work while the device runs, as in training.
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            one_step(i)
        sync()
        run_seconds = time.perf_counter() - start
        # Then each step between two synchronisations, the solver timed within (synchronised, so kept out
        # of the run above): the median is robust to the transient slowdowns of a shared machine.
        times = []
        with timed_sections() as sections:
            for i in range(warmup + steps, warmup + 2 * steps):
                start = time.perf_counter()
                one_step(i)
                sync()
                times.append(time.perf_counter() - start)
        logs = {name: OpLog() for name in ("views", "step", "after_step")}
        with torch.compiler.set_stance("force_eager"):  # the ops the code asks for (compiled frames skip a dispatch mode)
            one_step(warmup + 2 * steps, logs)
        median = statistics.median(times)
        return {
            "method": method,
            "overrides": list(overrides),
            "backbone": backbone,
            "device": dev.type,
            "batch": batch,
            "mode": "compute_only" if compute_only else "pipeline",
            "img_per_s": round(batch / median, 1),
            "img_per_s_mean": round(batch * steps / sum(times), 1),
            "img_per_s_run": round(batch * steps / run_seconds, 1),
            "steps": steps,
            "compile": compile,
            "first_step_s": round(first_step_seconds, 2),
            **({"compiled_graphs": compiled_graphs} if compile else {}),
            "channels_last": channels_last,
            "deterministic": config.train.deterministic,
            "autocast_bf16": autocast,
            "env": environment(),
            "ops": {name: log.total for name, log in logs.items()},
            "host_syncs": {name: dict(log.syncs) for name, log in logs.items() if log.syncs},
            **({"solver_frac": round(sections["solver"] / sum(times), 4)} if "solver" in sections else {}),
            **({"refresh_s": refresh_s, "images": n} if refresh_s else {}),
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
