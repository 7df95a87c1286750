"""Throughput of one training step: ``pipeline`` (uint8 data on the device -> augment -> step) or
``compute_only`` (the same step on fixed, already augmented views)."""
from __future__ import annotations

import contextlib
import importlib
import statistics
import time

import torch

from kinship.config import apply_overrides, build_config
from kinship.data import BatchPlan, ImageSet, TensorLoader
from kinship.methods import DataInfo, StepInfo
from kinship.runtime import environment, resolve_device, tune_cpu_allocator, use_bf16
from kinship.train.optim import build_optimizer
from kinship.train.trainer import build_method


# The assignment solver each method calls, timed by `bench` for its share of the step (solver_frac).
SOLVERS = {"mira": ("kinship.methods.mira", "mira_targets"), "swav": ("kinship.methods.swav", "sinkhorn")}


@contextlib.contextmanager
def timed_solver(method: str, device: torch.device):
    """While active, the method's solver adds its wall time (device-synchronised) to the yielded list."""
    spent: list[float] = []
    if method not in SOLVERS:
        yield spent
        return
    module = importlib.import_module(SOLVERS[method][0])
    solver = getattr(module, SOLVERS[method][1])

    def timed(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = solver(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return out

    setattr(module, SOLVERS[method][1], timed)
    try:
        yield spent
    finally:
        setattr(module, SOLVERS[method][1], solver)


def bench(method: str, device: str, backbone: str, batch: int, steps: int, compute_only: bool,
          compile: bool = False, precision: str = "auto", warmup: int = 3, width: int = 32,
          overrides: list[str] = ()) -> dict:
    tune_cpu_allocator()
    dev = resolve_device(device)
    values = {"method": {"name": method}, "model": {"backbone": backbone, "width": width},
              "train": {"batch_size": batch, "compile": compile}}
    config = build_config(apply_overrides(values, list(overrides)))
    g = torch.Generator().manual_seed(0)
    n = max(batch * 4, 16384)  # more images than a memory bank holds
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)]).to(dev)
    model = build_method(config, DataInfo(n, 10, 32)).to(dev).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optim, batch)
    step_fn = torch.compile(model) if compile else model
    autocast = use_bf16(precision, dev)
    loader = TensorLoader(data, BatchPlan(n, batch, seed=0))
    generator = torch.Generator(device=dev).manual_seed(0)
    batches = iter(())
    fixed: tuple | None = None

    def one_step(i: int) -> None:
        nonlocal batches, fixed
        info = StepInfo(0, i, warmup + steps, generator, i, n // batch)
        if compute_only and fixed is not None:
            b, views = fixed
        else:
            b = next(batches, None)
            if b is None:
                batches = loader.epoch(i)
                b = next(batches)
            views = model.views(b, info)
            if compute_only:
                fixed = (b, views)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = step_fn(views, b, info)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step(info)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        one_step(i)
    sync()
    # Per-step times: the median is robust to the transient slowdowns of a shared machine.
    times = []
    with timed_solver(method, dev) as solver_times:
        for i in range(warmup, warmup + steps):
            start = time.perf_counter()
            one_step(i)
            sync()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"method": method, "overrides": list(overrides), "backbone": backbone, "device": dev.type, "batch": batch,
            "mode": "compute_only" if compute_only else "pipeline", "img_per_s": round(batch / median, 1),
            "img_per_s_mean": round(batch * steps / sum(times), 1), "steps": steps, "compile": compile,
            "autocast_bf16": autocast, "env": environment(),
            **({"solver_frac": round(sum(solver_times) / sum(times), 4)} if method in SOLVERS else {})}
