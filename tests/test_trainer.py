"""Trainer: exact resume, NaN handling, atomic checkpoints, outputs of a run."""

import json

import pytest
import torch

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.errors import NonFiniteLossError
from kinship.train.trainer import Trainer

from helpers import VARIANTS, assert_resumed_exactly, resume_values, tiny_run_config


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_stopped_mid_epoch_and_resumed_continues_exactly(tmp_path, name):
    """Every registered method (and its variants): 4 steps per epoch, stopped after step 6 (epoch 2,
    after CMSF-semi's first classifier round of that epoch, SwAV's queue in use), then resumed."""
    assert_resumed_exactly(tmp_path, resume_values(name), {"stop_after_steps": 6})


def test_stopped_at_an_epoch_boundary_and_resumed_continues_exactly(tmp_path):
    assert_resumed_exactly(tmp_path, resume_values("mocov2"), {"stop_after_epochs": 1})


def test_time_limit_stops_mid_epoch_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """train.time_limit_min: checked after every step, so a limit already passed stops after the first."""
    assert_resumed_exactly(tmp_path, resume_values("cmsf-self"), {"time_limit_min": 1e-9})
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[1])["step"] == 1


def test_run_folder_contents(tmp_path):
    Trainer(build_config(tiny_run_config(**{"train.epochs": 1})), tmp_path, log=lambda *_: None).fit()
    assert {"config.yaml", "metrics.jsonl", "last.pt"} <= {p.name for p in tmp_path.iterdir()}
    keys = set().union(*(json.loads(line).keys() for line in (tmp_path / "metrics.jsonl").read_text().splitlines()))
    assert {"knn_top1", "knn_pixel_top1", "knn_random_init_top1", "loss"} <= keys
    assert not list(tmp_path.glob(".*tmp"))


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    values = tiny_run_config(**{"train.epochs": 3, "train.stop_after_epochs": 1})
    Trainer(build_config(values), tmp_path, log=lambda *_: None).fit()
    good = checkpoint.load(tmp_path / "last.pt")
    values["optim"]["lr"] = 1e30  # diverges within the next epoch
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+ \(epoch 2\).*last good checkpoint"):
        Trainer(build_config(values), tmp_path, resume=True, allow_changes=True, log=lambda *_: None).fit()
    after = checkpoint.load(tmp_path / "last.pt")
    assert after["position"] == good["position"]
    assert all(torch.equal(v, after["method"][k]) for k, v in good["method"].items())


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    checkpoint.save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


@pytest.mark.parametrize("streaming", [False, True])
def test_image_folder_in_memory_and_streaming(tmp_path, streaming):
    from PIL import Image

    from kinship.data.store import synthetic

    data = synthetic(96, classes=2, size=20)
    for split, rows in (("train", range(0, 64)), ("test", range(64, 96))):
        for i in rows:
            folder = tmp_path / split / data.classes[int(data.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    values = tiny_run_config(**{"train.epochs": 1, "train.batch_size": 32})
    values["data"] = {
        "name": "imagefolder",
        "path": str(tmp_path / "train"),
        "test_path": str(tmp_path / "test"),
        "image_size": 16,
        "streaming": streaming,
        "workers": 0,
    }
    summary = Trainer(build_config(values), tmp_path / "run", log=lambda *_: None).fit()
    assert summary["epochs_done"] == 1 and 0 <= summary["knn_top1"] <= 100
