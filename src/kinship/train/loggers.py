"""A run's records, written where ``train.loggers`` asks: ``metrics.jsonl`` (always: resume and
``kinship eval`` read it), ``metrics.csv`` (one row per scalar: epoch, step, name, value), TensorBoard
event files (``tensorboard/``) and a Weights & Biases run (``wandb/``, offline unless ``WANDB_MODE``
says otherwise). Every logger gets the same records; only the main process writes.

On resume the records after the checkpoint are dropped: ``metrics.jsonl`` is cut to the checkpoint's
line count and ``metrics.csv`` rebuilt from it, TensorBoard purges the events past the resumed step,
and the W&B run (its id kept in the run folder) resumes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from kinship.checkpoint import write_text_atomic
from kinship.errors import ConfigError

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package it needs


def plain(value: Any) -> Any:
    """Metrics as JSON values: tensors become numbers or lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_loggers(names: list[str]) -> None:
    """A ConfigError, before any data is read, for a logger whose package is not installed."""
    import importlib.util

    for name in names:
        package = EXTRAS.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.loggers {name} needs the {package} package: pip install {package} (kinship[{name}])")


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers by name (nested dicts as ``outer/inner``; a refresh's under its name)."""
    prefix = f"refresh_{record['refresh']}/" if "refresh" in record else ""
    out: dict[str, float] = {}

    def walk(values: dict, path: str) -> None:
        for key, value in values.items():
            if key in ("epoch", "step") and not path:
                continue
            if isinstance(value, dict):
                walk(value, f"{path}{key}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{path}{key}"] = float(value)

    walk(record, prefix)
    return out


class RunLog:
    def __init__(self, out_dir: Path, names: list[str], config: dict, is_main: bool) -> None:
        self.out_dir, self.names, self.config, self.is_main = Path(out_dir), list(names), config, is_main
        self.jsonl, self.csv = self.out_dir / "metrics.jsonl", self.out_dir / "metrics.csv"
        self.tensorboard = self.wandb = None
        self.last_step = 0

    def start(self, fresh: bool, lines: int | None, step: int) -> None:
        """A fresh run's empty record, or a resumed one's cut at the checkpoint (``lines`` of jsonl,
        global ``step``); then the loggers open."""
        if not self.is_main:
            return
        if fresh:  # a new run in an old folder: the old run's records go
            self.jsonl.unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
        elif self.jsonl.exists() and lines is not None:
            kept = self.jsonl.read_text().splitlines()[:lines]
            write_text_atomic("".join(line + "\n" for line in kept), self.jsonl)
        self.last_step = step
        if "csv" in self.names:
            self.rebuild_csv()
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=None if fresh else step)
        if "wandb" in self.names:
            self.wandb = self.start_wandb(fresh)

    def start_wandb(self, fresh: bool) -> Any:
        import wandb

        id_file = self.out_dir / "wandb_id"
        if fresh or not id_file.exists():
            write_text_atomic(uuid.uuid4().hex[:12] + "\n", id_file)
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "kinship"),
            dir=str(self.out_dir),
            id=id_file.read_text().strip(),
            resume="allow",
            config=self.config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def rebuild_csv(self) -> None:
        records = [json.loads(line) for line in self.jsonl.read_text().splitlines()] if self.jsonl.exists() else []
        with self.csv.open("w", newline="") as f:
            csv.writer(f).writerow(["epoch", "step", "name", "value"])
        resumed, self.last_step = self.last_step, 0
        for record in records:
            self.append_csv(record)
            self.last_step = record.get("step", self.last_step)
        self.last_step = resumed

    def append_csv(self, record: dict) -> None:
        step = record.get("step", self.last_step)
        with self.csv.open("a", newline="") as f:
            writer = csv.writer(f)
            for name, value in scalars(record).items():
                writer.writerow([record.get("epoch", ""), step, name, value])

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        record = plain(record)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.last_step = record.get("step", self.last_step)
        if "csv" in self.names:
            self.append_csv(record)
        values = scalars(record)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, self.last_step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=self.last_step)

    def lines(self) -> int:
        return len(self.jsonl.read_text().splitlines()) if self.jsonl.exists() else 0

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None
