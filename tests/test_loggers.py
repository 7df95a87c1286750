"""The run's records where train.loggers asks (metrics.csv, TensorBoard, W&B offline), the same on
resume as in a straight run, and the online linear probe."""

import csv
import importlib.util
import json

import pytest
import torch

from kinship.assembly import build_config
from kinship.errors import ConfigError
from kinship.train.loggers import check_loggers, scalars
from kinship.train.online_probe import OnlineProbe
from kinship.train.trainer import Trainer

from helpers import tiny_run_config


def run(out, **overrides):
    values = tiny_run_config(**{"train.epochs": 3, **overrides})
    return Trainer(build_config(values), out, log=lambda *_: None).fit()


def csv_rows(path) -> list[tuple]:
    with path.open() as f:
        return [(r["epoch"], r["step"], r["name"], float(r["value"])) for r in csv.DictReader(f)]


def test_csv_holds_every_scalar_of_metrics_jsonl_also_after_a_resume(tmp_path):
    loggers = {"train.loggers": ["jsonl", "csv"]}
    run(tmp_path / "a", **loggers)
    run(tmp_path / "b", **loggers, **{"train.stop_after_steps": 5})
    values = tiny_run_config(**{"train.epochs": 3, **loggers})
    Trainer(build_config(values), tmp_path / "b", resume=True, log=lambda *_: None).fit()
    for folder in ("a", "b"):  # b: rebuilt from the cut metrics.jsonl on resume, then continued
        records = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        rows = csv_rows(tmp_path / folder / "metrics.csv")
        assert [(n, v) for _, _, n, v in rows] == [(n, v) for r in records for n, v in scalars(r).items()]
    straight, resumed = csv_rows(tmp_path / "a" / "metrics.csv"), csv_rows(tmp_path / "b" / "metrics.csv")
    assert {"loss", "knn_top1", "online_probe_top1"} <= {name for _, _, name, _ in straight}
    assert [row for row in straight if row[2] == "loss"] == [row for row in resumed if row[2] == "loss"]


def test_online_probe_is_logged_each_epoch_and_leaves_the_run_unchanged(tmp_path):
    with_probe = run(tmp_path / "a")
    without = run(tmp_path / "b", **{"train.online_probe": False})
    assert with_probe["knn_top1"] == without["knn_top1"]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    probe = [r["online_probe_top1"] for r in records if "online_probe_top1" in r]
    assert len(probe) == 3 and all(0 <= p <= 100 for p in probe)
    assert not any("online_probe_top1" in line for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
    from kinship.eval.suite import Evaluation

    report = Evaluation(tmp_path / "a" / "last.pt", tmp_path / "eval", progress=False, log=lambda *_: None).run_all(["curves"])
    assert report["protocols"]["curves"]["online_probe_points"] == 3  # the report's curves draw it


def test_online_probe_learns_separable_features_from_zero_and_counts_before_updating():
    torch.manual_seed(0)
    backbone = torch.nn.Identity()
    backbone.feature_dim = 8
    probe = OnlineProbe(backbone, classes=4)
    centres = 3 * torch.randn(4, 8)
    for step in range(60):
        labels = torch.randint(0, 4, (32,))
        labels[:4] = -1  # unknown labels count nowhere
        probe.expect(32)
        backbone(centres[labels.clamp_min(0)] + torch.randn(32, 8))
        probe.update(labels)
        if step == 0:  # all-zero logits before the first update: every known row predicted as class 0
            assert int(probe.seen) == 28 and int(probe.correct) == int((labels == 0).sum())
    assert probe.end_epoch()["online_probe_top1"] > 90
    assert int(probe.seen) == 0


def test_tensorboard_event_file_appears_when_asked(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    run(tmp_path, **{"train.loggers": ["jsonl", "tensorboard"], "train.epochs": 1})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_wandb_offline_run_appears_when_asked(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, **{"train.loggers": ["jsonl", "wandb"], "train.epochs": 1})
    assert list((tmp_path / "wandb").glob("offline-run-*")) and (tmp_path / "wandb_id").is_file()


def test_a_logger_whose_package_is_missing_and_a_run_without_jsonl_are_config_errors(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the tensorboard package: pip install tensorboard"):
        check_loggers(["jsonl", "tensorboard"])
    with pytest.raises(ConfigError, match="train.loggers must keep jsonl"):
        build_config(tiny_run_config(**{"train.loggers": ["csv"]}))
