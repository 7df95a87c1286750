"""Checkpoints: written atomically (a temporary file in the same folder, then renamed into place) and
read back with ``weights_only=True``, every failure a :class:`CheckpointError` that names the file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from kinship.errors import CheckpointError, WriteError


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """A crash or kill mid-write leaves the previous file intact: rename is atomic within one
    filesystem, and the previous file is never the one being written. The file gets the mode an
    ordinary ``open`` gives (the user's umask), and the folder is synced after the rename, so the
    new name survives a power cut. A write that fails (a full disk) is a :class:`WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {exc}; the previous {path.name}, if any, is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it: put it straight back
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda f: torch.save(obj, f))


def write_bytes_atomic(data: bytes, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(data))


def write_text_atomic(text: str, path: Path) -> None:
    write_bytes_atomic(text.encode(), path)


def compile_cache_path(config: dict, device: torch.device) -> Path:
    """This user's file of compiled artifacts for a run config on a device: under ``$KINSHIP_CACHE``
    (default ``~/.cache/kinship``), keyed by torch version, device and config. Torch unpickles and runs
    what such a file holds, so kinship reads it only from here, where only this user's runs write, or
    from a file named on the command line (``--compile-cache``); never from a run folder or a config
    value, which a downloaded run would control."""
    root = Path(os.environ.get("KINSHIP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kinship")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    key = hashlib.sha256(json.dumps([torch.__version__, where, config], sort_keys=True, default=str).encode()).hexdigest()
    return root / "compile" / f"{key[:20]}.bin"


def load_compile_cache(path: Path) -> bool:
    """Hot-load the compiled artifacts (inductor's kernels, autotuning results) that
    :func:`save_compile_cache` wrote at ``path``: the same graphs then compile from them instead of
    generating code, on a fresh machine too. False where there is no such file. The file is
    unpickled and its code run: pass only a file of :func:`compile_cache_path` or one you trust."""
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
    except pickle.UnpicklingError:  # torch's own message would suggest weights_only=False: never for a file of unknown origin
        raise CheckpointError(
            f"cannot read {path} as a kinship checkpoint: it is truncated, not a checkpoint, or holds "
            "objects other than tensors and plain values, which kinship never unpickles (they could run code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
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
