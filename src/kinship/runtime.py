"""Process-level setup: device choice, CPU allocator tuning, distributed helpers, timed sections,
environment record."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kinship.errors import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Stop glibc from returning large activation buffers to the OS after every step.

    With its defaults, glibc serves each large tensor by a fresh mmap and unmaps it on free, so
    every training step page-faults its activations back in; what that costs depends on the
    machine (``kinship bench ... --no-tune-allocator`` measures it; figures in docs/benchmarks.md,
    1.1x to 2.8x for the small CNN on 2 cores). Raising both thresholds (same effect as the
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables) keeps freed memory for reuse.
    Returns whether the call took effect (False off glibc).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok


def use_bf16(precision: str, device: torch.device) -> bool:
    """``train.precision``: bf16 autocast when asked, or by default (``auto``) on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def tune_cuda(device: torch.device) -> None:
    """On a GPU, let cuDNN time its convolution algorithms once per input shape and keep the fastest
    (a training run's shapes repeat at every step)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """While active and ``enabled`` (``train.deterministic``): cuDNN's deterministic kernels without
    autotuning, torch's deterministic algorithms (the deterministic ``index_add_`` / ``scatter_add_``
    / ``index_put_`` of CUDA among them; an op that has none warns), and cuBLAS's deterministic
    workspace; the previous settings come back afterwards."""
    if not enabled:
        yield
        return
    previous = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = previous[4] or ":4096:8"  # read by cuBLAS when its handle is made
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[:2]
        torch.use_deterministic_algorithms(previous[2], warn_only=previous[3])
        if previous[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def compiled(fn: Callable, enabled: bool, backend: str = "inductor", mode: str = "default", fullgraph: bool = False) -> Callable:
    """``fn`` (a module or a function) under ``torch.compile`` when ``enabled`` (``train.compile``,
    ``compile_backend``, ``compile_mode``; ``mode`` applies to the inductor backend only), else ``fn``."""
    if not enabled:
        return fn
    return torch.compile(
        fn, fullgraph=fullgraph, backend=backend, mode=None if mode == "default" or backend != "inductor" else mode
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available here (set train.device: cpu or auto)")
    return torch.device(name)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def init_distributed(device: torch.device, timeout_min: float = 30.0) -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it), on
    one node or several; a collective that waits over ``timeout_min`` minutes raises instead of hanging."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))


def leave_distributed() -> None:
    """Leave the process group before the process ends (no-op without one): left to interpreter
    shutdown, the group's threads can abort the process ("terminate called without an active
    exception") after its work is done."""
    if is_distributed():
        dist.destroy_process_group()


@torch.no_grad()
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over every process (``sum`` or ``max``), in place; the identity on one process."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every process in rank order (no gradient). ``sizes``: the number of
    rows each process holds, when they differ (every process must know all of them)."""
    if not is_distributed():
        return x
    if sizes is None:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    longest = max(sizes)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


@torch.no_grad()
def broadcast(*tensors: torch.Tensor, src: int = 0) -> None:
    """Each tensor set, in place, to process ``src``'s values: state computed on every process from
    the same inputs stays identical even where kernels are not deterministic."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to process ``src``'s values (:func:`broadcast`)."""
    broadcast(*module.parameters(), *module.buffers(), src=src)


@torch.no_grad()
def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every process if it is true on any (decisions from local clocks must be shared)."""
    if not is_distributed():
        return flags
    values = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


_SECTION_SECONDS: dict[str, float] | None = None


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """A named part of a step (``solver``: an assignment solver), visible in ``torch.profiler``
    traces as ``kinship.<name>``; while :func:`timed_sections` is active its wall time (device
    synchronised) is added up. Inside a compiled region it marks nothing (graphs have no host clock)."""
    if torch.compiler.is_compiling():
        yield
        return
    with torch.profiler.record_function(f"kinship.{name}"):
        if _SECTION_SECONDS is None:
            yield
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            _SECTION_SECONDS[name] += time.perf_counter() - start


@contextlib.contextmanager
def timed_sections() -> Iterator[dict[str, float]]:
    """Seconds spent in each :func:`section`, by name, while active (for benchmarks)."""
    global _SECTION_SECONDS
    previous, _SECTION_SECONDS = _SECTION_SECONDS, defaultdict(float)
    try:
        yield _SECTION_SECONDS
    finally:
        _SECTION_SECONDS = previous


def environment() -> dict[str, Any]:
    """What a benchmark figure depends on besides the code."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "allocator_tuned": _ALLOCATOR_TUNED,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def interactive() -> bool:
    """Whether progress bars go to a terminal (not a job log or a ``> file`` redirect)."""
    return sys.stderr.isatty()


def progress_bar(iterable: Any = None, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, shown only when ``enabled`` and stderr is a terminal: in a file, its carriage-return
    updates would pile up as one line of thousands; long jobs print a line per epoch there instead."""
    return tqdm(iterable, disable=not (enabled and interactive()), leave=False, dynamic_ncols=True, **kwargs)
