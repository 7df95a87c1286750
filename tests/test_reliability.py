"""What kinship promises a careful user: no code run from a run folder or a config value, no NaN over a
good checkpoint, a resume that continues the saved run or says why not, and every bad input a
one-line error with exit status 2."""

import os
import pickle
import stat
import time

import pytest
import torch
import yaml

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.cli import main
from kinship.errors import NonFiniteLossError, WriteError
from kinship.train.trainer import Trainer

from helpers import fails, tiny_run_config


def quiet(values, out, **kwargs):
    return Trainer(build_config(values), out, log=lambda *_: None, **kwargs)


class Marker:
    """Unpickling it creates a file: a stand-in for the code a compile-cache file can carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_a_compile_cache_in_a_run_folder_or_a_config_is_never_loaded(tmp_path, monkeypatch, capsys):
    """torch unpickles what a compile cache holds; here the loader is a plain pickle.loads, and a
    malicious file sits in the run folder (where earlier releases read it) and is named by the old
    config key: a resumed compiled run creates no marker; only --compile-cache FILE, an explicit
    trust, loads it."""
    marker = tmp_path / "marker"
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: pickle.loads(data))
    values = tiny_run_config(
        **{"train.epochs": 2, "train.stop_after_epochs": 1, "train.compile": True, "train.compile_backend": "eager"}
    )
    out = tmp_path / "run"
    quiet(values, out).fit()
    evil = pickle.dumps(Marker(marker))
    (out / "compile_cache.bin").write_bytes(evil)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["train"]["compile_cache"] = str(out / "compile_cache.bin")
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    fails(
        capsys,
        ["pretrain", "--out", str(out), "--resume"],
        "train.compile_cache is no longer read from a config",
        "--compile-cache FILE",
    )
    saved["train"].pop("compile_cache")
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    assert not marker.exists()
    trusted = tmp_path / "trusted.bin"
    trusted.write_bytes(evil)
    values["train"].pop("stop_after_epochs")
    quiet(values, tmp_path / "other", compile_cache=trusted).fit()
    assert marker.exists()  # the same file, named on the command line, is loaded: the test would see a load


def test_a_nan_between_log_lines_leaves_the_last_checkpoint_byte_for_byte(tmp_path):
    """Losses are read back at log lines and before each save only: a loss that becomes NaN between
    two log lines stops the run at the next save, which writes nothing."""
    values = tiny_run_config(**{"train.epochs": 3, "train.stop_after_epochs": 1, "train.log_every": 100})
    quiet(values, tmp_path).fit()
    before = (tmp_path / "last.pt").read_bytes()
    values["optim"]["lr"] = 1e30  # the first update blows the weights up: the next loss is not finite
    values["train"]["checkpoint_every_steps"] = 2
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ \(epoch 2\), the mean of steps .*the last good checkpoint"):
        quiet(values, tmp_path, resume=True, allow_changes=True).fit()
    assert (tmp_path / "last.pt").read_bytes() == before


def test_a_resume_with_another_batch_size_exits_2_at_once(tmp_path, capsys):
    values = tiny_run_config(**{"train.epochs": 2, "train.stop_after_steps": 3})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out)]) == 0
    start = time.time()
    fails(
        capsys,
        ["pretrain", "--config", str(config), "--set", "train.batch_size=128", "--out", str(out), "--resume"],
        "was written with other settings: train.batch_size 64 -> 128",
        "--allow-changes",
    )
    assert time.time() - start < 10
    # accepted, the saved position (step 3 of 4) no longer fits 2 steps per epoch: an error, never a loop
    fails(
        capsys,
        ["pretrain", "--config", str(config), "--set", "train.batch_size=128", "--out", str(out), "--resume", "--allow-changes"],
        "outside this run's plan of 2 epochs of 2 steps",
    )
    # when to stop, save and log may change freely
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(config),
                "--set",
                "train.stop_after_steps=0",
                "--set",
                "train.log_every=2",
                "--out",
                str(out),
                "--resume",
            ]
        )
        == 0
    )
    assert checkpoint.load(out / "last.pt")["position"] == [2, 0, 8]


def test_a_checkpoint_without_a_position_is_a_clear_error(tmp_path, capsys):
    values = tiny_run_config(**{"train.epochs": 1})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out)]) == 0
    state = checkpoint.load(out / "last.pt")
    del state["position"]
    torch.save(state, out / "last.pt")
    fails(capsys, ["pretrain", "--config", str(config), "--out", str(out), "--resume"], "lacks position")


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    values = tiny_run_config(**{"train.epochs": 2, "train.stop_after_epochs": 1})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out)]) == 0
    before = (out / "last.pt").read_bytes()

    def full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    fails(
        capsys,
        ["pretrain", "--config", str(config), "--out", str(out), "--resume"],
        f"cannot write {out / 'last.pt'}",
        "No space left on device",
        "the previous last.pt, if any, is kept",
    )
    assert (out / "last.pt").read_bytes() == before and not list(out.glob(".*.tmp"))
    with pytest.raises(WriteError):
        checkpoint.save_atomic({"a": 1}, out / "y.pt")


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        checkpoint.save_atomic({"a": 1}, tmp_path / "x.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.pt").stat().st_mode) == 0o640


def test_unlabeled_images_never_enter_the_knn_bank(tmp_path, monkeypatch):
    """STL-10's train+unlabeled split marks its 100,000 unlabeled images with -1: the k-NN bank holds
    the labeled images only, and the monitor and the baselines run."""
    from kinship import assembly
    from kinship.data.store import ImageSet, load_split

    def stl_like(config, split):
        data = load_split(config, split)
        if split == "train":  # two images in three unlabeled
            data = ImageSet(data.images, torch.where(torch.arange(len(data)) % 3 > 0, -1, data.labels), data.classes)
        return data

    monkeypatch.setattr(assembly, "load_split", stl_like)
    values = tiny_run_config(**{"train.epochs": 1})
    data = assembly.load_run_data(build_config(values), torch.device("cpu"), None)
    assert len(data.bank) == 86 and (data.bank.labels >= 0).all()
    summary = quiet(values, tmp_path).fit()
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["knn_pixel_top1"] <= 100


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--set", "model.backbone=vit_small"], ["unknown model.backbone 'vit_small'", "resnet50"]),
        (["--set", "method.name=simclr"], ["unknown method 'simclr'", "the methods:", "byol", "mocov2"]),
        (["train.epochs=3"], ["unrecognized arguments: train.epochs=3", "--set train.epochs=3"]),
    ],
)
def test_bad_inputs_are_one_line_errors_before_any_data(tmp_path, capsys, argv, fragments):
    config = tmp_path / "c.yaml"
    values = tiny_run_config()
    values["data"] = {"name": "cifar10-npz", "path": str(tmp_path / "absent.npz")}  # never read: the config fails first
    config.write_text(yaml.safe_dump(values))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "kinship: error: " in err and "absent.npz" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_bad_data_and_files_are_one_line_errors(tmp_path, capsys):
    import numpy as np

    empty = tmp_path / "empty.npz"
    np.savez(
        empty,
        classes=np.array(["a"]),
        train_jpeg=np.zeros(0, np.uint8),
        train_offsets=np.zeros(1, np.int64),
        train_labels=np.zeros(0, np.int64),
        test_jpeg=np.zeros(0, np.uint8),
        test_offsets=np.zeros(1, np.int64),
        test_labels=np.zeros(0, np.int64),
    )
    config = tmp_path / "c.yaml"
    values = tiny_run_config()
    values["data"] = {"name": "cifar10-npz", "path": str(empty)}
    config.write_text(yaml.safe_dump(values))
    fails(
        capsys,
        ["pretrain", "--config", str(config), "--out", str(tmp_path / "run")],
        f"the train split of {empty} holds no images",
    )
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, foreign)  # a pickled module: not tensors alone
    err = fails(capsys, ["export", "--checkpoint", str(foreign), "--out", str(tmp_path / "b.pt")], "never unpickles")
    assert "weights_only=False" not in err


def test_labels_beyond_the_named_classes_are_an_error(tmp_path, monkeypatch):
    from kinship import assembly
    from kinship.data.store import ImageSet, load_split
    from kinship.errors import DataError

    def wide(config, split):
        data = load_split(config, split)
        return ImageSet(
            data.images, data.labels.clamp(max=2) + (torch.arange(len(data)) == 5) * 7, data.classes[:3]
        )  # image 5: label 1 + 7

    monkeypatch.setattr(assembly, "load_split", wide)
    with pytest.raises(DataError, match=r"label 8, but its data names 3 classes \(class0, class1, class2\)"):
        assembly.load_run_data(build_config(tiny_run_config()), torch.device("cpu"), None)


def test_a_deterministic_run_sets_torchs_switches_for_its_duration_and_repeats(tmp_path):
    seen = []

    def log(line):
        seen.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark,
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            )
        )

    values = tiny_run_config(**{"train.epochs": 1, "train.deterministic": True})
    Trainer(build_config(values), tmp_path / "a", log=log).fit()
    assert seen and all(s == (True, True, False, ":4096:8") for s in seen), seen
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    quiet(values, tmp_path / "b").fit()
    one, two = (checkpoint.load(tmp_path / run / "last.pt")["method"] for run in ("a", "b"))
    assert all(torch.equal(value, two[key]) for key, value in one.items())
