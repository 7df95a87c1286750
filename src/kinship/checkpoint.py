"""Checkpoints: written atomically (a temporary file in the same folder, then renamed into place) and
read back with ``weights_only=True``, every failure a :class:`CheckpointError` that names the file."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from kinship.errors import CheckpointError


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """A crash or kill mid-write leaves the previous file intact: rename is atomic within one
    filesystem, and the previous file is never the one being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda f: torch.save(obj, f))


def write_bytes_atomic(data: bytes, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(data))


def write_text_atomic(text: str, path: Path) -> None:
    write_bytes_atomic(text.encode(), path)


def load_compile_cache(path: Path) -> bool:
    """Hot-load the compiled artifacts (inductor's kernels, autotuning results) that
    :func:`save_compile_cache` wrote at ``path``: the same graphs then compile from them instead of
    generating code, on a fresh machine too. False where there is no such file."""
    path = Path(path)
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True


def save_compile_cache(path: Path) -> bool:
    """Write every artifact this process's compilations made so far to ``path``, atomically; False
    where there is nothing to write (nothing compiled, or a backend without artifacts)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None or not artifacts[0]:
        return False
    write_bytes_atomic(artifacts[0], path)
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left behind; returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load(path: Path, device: torch.device | str = "cpu") -> Any:
    """The object saved at ``path`` (tensors only, no code), or a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint (truncated or not a checkpoint): {str(exc).splitlines()[0]}"
        ) from exc


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A kinship pre-training checkpoint's dict, or a CheckpointError that says what the file is instead."""
    state = load(path, device)
    if not isinstance(state, dict) or "config" not in state or "method" not in state:
        raise CheckpointError(
            f"{path} is not a kinship pre-training checkpoint (it has no 'config' and 'method' entries); "
            "it must be the last.pt of a `kinship pretrain` run folder"
        )
    return state
