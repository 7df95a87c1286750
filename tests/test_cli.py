"""The command line: every user error is `kinship: error: ...` with exit status 2, no traceback;
the resume command serves the first start too; and the views picture."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from kinship import checkpoint
from kinship.cli import main

from helpers import fails, tiny_run_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def write_config(tmp_path, values=None, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values or tiny_run_config()))
    return str(path)


def test_unknown_key_exits_2_with_message(tmp_path, capsys):
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path), "--set", "train.epoch=3", "--out", str(tmp_path / "r")],
        "unknown config key 'train.epoch' (did you mean 'epochs'?)",
    )


def test_missing_dataset_exits_2(tmp_path, capsys):
    values = tiny_run_config()
    values["data"] = {"name": "cifar10-npz", "path": str(tmp_path / "nope.npz")}
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path, values), "--out", str(tmp_path / "r")],
        f"dataset file not found: {tmp_path / 'nope.npz'}; build one with kinship pack-npz",
    )


def quickstart(tmp_path, environment: dict, *extra: str) -> subprocess.CompletedProcess:
    """The Quickstart's first command (with ``extra`` settings), in a fresh process whose home is a
    temporary folder and whose KINSHIP_DATA / KINSHIP_OFFLINE are those of ``environment``."""
    env = {k: v for k, v in os.environ.items() if k not in ("KINSHIP_DATA", "KINSHIP_OFFLINE")}
    env.update(HOME=str(tmp_path / "home"), **environment)
    command = [sys.executable, "-m", "kinship.cli", "pretrain", "--config", str(DEMO), "--out", str(tmp_path / "run"), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_quickstart_without_data_or_network_stops_at_once_naming_the_file(tmp_path):
    """No KINSHIP_DATA, no network (KINSHIP_OFFLINE stands for it): one line naming the data folder's file."""
    done = quickstart(tmp_path, {"KINSHIP_OFFLINE": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    expected = tmp_path / "home" / ".cache" / "kinship" / "cifar10-jpeg.npz"
    assert len(lines) == 1 and str(expected) in lines[0] and "put cifar10-jpeg.npz there" in lines[0], done.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_quickstart_with_kinship_data_runs(tmp_path, cifar_npz):
    settings = ["data.train_limit=1024", "data.test_limit=256", "train.stop_after_steps=2", "eval.baselines=false"]
    done = quickstart(
        tmp_path, {"KINSHIP_DATA": str(cifar_npz.parent), "KINSHIP_OFFLINE": "1"}, *(f"--set={s}" for s in settings)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "last.pt").is_file() and "k-NN top-1" in done.stdout


def test_pack_npz_from_an_image_folder_is_read_back_like_the_shared_file(tmp_path, capsys):
    from kinship.data.store import load_npz, read_image_files

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 3), ("val", 2)):
        for label in ("b_cat", "a_dog"):
            (tmp_path / "folder" / split / label).mkdir(parents=True)
            for i in range(count):
                ramp = torch.linspace(0, 1, 28).view(1, 28, 1) * torch.linspace(0, 1, 20).view(20, 1, 1)
                pixels = (255 * (0.2 + 0.6 * ramp * torch.rand(1, 1, 3, generator=g))).to(torch.uint8).numpy()  # smooth
                Image.fromarray(pixels).save(tmp_path / "folder" / split / label / f"{i}.png")
    out = tmp_path / "packed.npz"
    assert main(["pack-npz", str(tmp_path / "folder"), "--image-size", "16", "--out", str(out), "--quality", "95"]) == 0
    assert "6 train and 4 test images, 2 classes, 16 px" in capsys.readouterr().out
    train = load_npz(out, "train", 1)
    assert train.classes == ["a_dog", "b_cat"] and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    files = sorted((tmp_path / "folder" / "train").rglob("*.png"))
    original, aspect = read_image_files(files, 16, 1)
    assert train.images.shape == (6, 3, 16, 16) and torch.allclose(train.aspect, torch.full((6,), 28 / 20))
    assert torch.equal(aspect, train.aspect)
    assert (train.images.float() - original.float()).abs().mean() < 2  # JPEG at quality 95
    assert len(load_npz(out, "test", 1)) == 4


def test_method_options_are_checked_before_any_data_is_read(tmp_path, capsys):
    values = tiny_run_config(**{"method": {"name": "cmsf", "constraint": "selff"}})
    values["data"] = {"name": "cifar10-npz", "path": str(tmp_path / "nope.npz")}  # would fail if it were read
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path, values), "--out", str(tmp_path / "r")],
        "method.constraint must be one of none, self, supervised, semi, got 'selff' (did you mean 'self'?)",
    )
    fails(
        capsys,
        [
            "pretrain",
            "--config",
            write_config(tmp_path, values),
            "--out",
            str(tmp_path / "r"),
            "--set",
            "method.constraint=self",
            "--set",
            "method.target_view=both",
        ],
        "method.target_view must be one of weak, strong",
    )


def test_set_without_equals_sign(tmp_path, capsys):
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path), "--set", "train.epochs", "--out", str(tmp_path / "r")],
        "--set expects key=value, got 'train.epochs'",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, capsys):
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path), "--set", "train.device=cuda", "--out", str(tmp_path / "r")],
        "train.device is 'cuda' but no CUDA device is available",
    )


def test_batch_larger_than_the_dataset(tmp_path, capsys):
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path), "--set", "train.batch_size=512", "--out", str(tmp_path / "r")],
        "train.batch_size 512 is larger than the 256 training images",
    )


def test_supervised_constraint_with_hidden_labels(tmp_path, capsys):
    values = tiny_run_config(
        **{"method": {"name": "cmsf", "constraint": "supervised", "bank_size": 64}, "data.labeled_per_class": 8}
    )
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path, values), "--out", str(tmp_path / "r")],
        "method.constraint 'supervised' needs a label for every training image, and 224 of 256 are hidden",
        "use constraint 'semi'",
    )


def test_non_finite_loss_exits_2_naming_the_step(tmp_path, capsys):
    fails(
        capsys,
        ["pretrain", "--config", write_config(tmp_path), "--set", "optim.lr=1e30", "--out", str(tmp_path / "r")],
        "loss is",
        "at step",
        "training stopped",
    )


def test_data_folder_without_train_and_val(tmp_path, capsys):
    (tmp_path / "images" / "cats").mkdir(parents=True)
    fails(
        capsys,
        ["eval", "knn", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path / "images")],
        "needs train/ and val/ (or test/) folders",
    )


def test_resume_starts_a_run_that_has_no_checkpoint_yet(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["pretrain", "--config", write_config(tmp_path), "--set", "train.epochs=1", "--out", str(out), "--resume"]
    assert main(argv) == 0
    assert f"--resume: no checkpoint in {out} yet, starting the run" in capsys.readouterr().out
    assert main(argv) == 0  # the same command again: the run is complete, nothing more to train
    assert "resumed from" in capsys.readouterr().out
    fails(
        capsys,
        ["pretrain", "--out", str(tmp_path / "empty"), "--resume"],
        "has no config.yaml",
        "give --config for the first start",
    )


def test_truncated_or_foreign_checkpoint_on_resume(tmp_path, capsys):
    out = tmp_path / "r"
    config = write_config(tmp_path)
    assert main(["pretrain", "--config", config, "--set", "train.epochs=1", "--out", str(out)]) == 0
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    fails(capsys, ["pretrain", "--config", config, "--out", str(out), "--resume"], f"cannot read {out / 'last.pt'}", "truncated")
    checkpoint.save_atomic({"conv.weight": torch.zeros(1)}, out / "last.pt")
    fails(
        capsys,
        ["pretrain", "--config", config, "--out", str(out), "--resume"],
        f"{out / 'last.pt'} is not a kinship pre-training checkpoint",
    )


def test_diverging_fine_tune(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["pretrain", "--config", write_config(tmp_path), "--set", "train.epochs=1", "--out", str(out)]) == 0
    fails(
        capsys,
        [
            "eval",
            "finetune",
            "--checkpoint",
            str(out / "last.pt"),
            "--no-progress",
            "--set",
            "eval.finetune.lr_backbone=1e30",
            "--set",
            "eval.finetune.lr_head=1e30",
            "--set",
            "eval.finetune.epochs=2",
            "--set",
            "eval.finetune.fractions=[0.5]",
        ],
        "fine-tune 50pct: loss is",
        "lower the learning rate",
    )


def test_views_picture(tmp_path):
    out = tmp_path / "views.png"
    assert main(["views", "--config", write_config(tmp_path), "--out", str(out), "--images", "4"]) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 18 + 2, 4 * 18 + 2)  # original + 2 views, 4 rows, 16 px tiles, 2 px padding


def test_a_log_file_gets_one_line_per_epoch_and_no_progress_bar(tmp_path, capsys):
    """Output that is not a terminal (pytest captures it, as a job log would) carries no carriage
    returns from progress bars; the trainer prints a line per epoch instead."""
    values = tiny_run_config(**{"train.progress": True})
    assert main(["pretrain", "--config", write_config(tmp_path, values), "--out", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch ") and "img/s" in line] == [
        "epoch 1/2",
        "epoch 2/2",
    ]


def test_a_failed_download_is_an_error_that_says_so(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    fails(
        capsys,
        ["pack-npz", "cifar10", "--root", str(tmp_path), "--download", "--out", str(tmp_path / "c.npz")],
        f"cannot download cifar10 into {tmp_path}",
        "Name or service not known",
    )
    assert not (tmp_path / "c.npz").exists()


def test_views_picture_of_a_semi_supervised_method(tmp_path):
    """SsCL: the labeled batch's weak view, then the unlabeled batch's weak and strong views."""
    from helpers import semi_values

    out = tmp_path / "views.png"
    assert main(["views", "--config", write_config(tmp_path, semi_values()), "--out", str(out), "--images", "4"]) == 0
    with Image.open(out) as im:
        assert im.size == (4 * 18 + 2, 4 * 18 + 2)  # original + 3 views


def test_check_data_lists_every_file_that_does_not_decode(tmp_path, capsys):
    from kinship.data.store import write_image_folder

    files = write_image_folder(tmp_path, classes=2, per_class=3, width=40, height=30)
    files[1].write_bytes(files[1].read_bytes()[:200])  # truncated
    files[4].write_bytes(b"not an image")
    assert main(["check-data", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:-1]] == [str(files[1]), str(files[4])]
    assert out[-1] == "4 of 6 images in 2 classes decode; 2 do not"
    fails(capsys, ["check-data", str(tmp_path / "nowhere")], "image folder not found")


def test_bench_loader_only_prints_images_per_second_and_peak_memory(tmp_path, capsys):
    import json

    from kinship.data.store import write_image_folder

    write_image_folder(tmp_path, classes=2, per_class=8, width=60, height=40)
    assert (
        main(
            [
                "bench",
                "--loader-only",
                "--data",
                str(tmp_path),
                "--workers",
                "1",
                "--batch",
                "4",
                "--steps",
                "2",
                "--image-size",
                "32",
                "--views",
                "2",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["img_per_s"] > 0 and result["peak_rss_mb"] > 0 and result["images"] == 16
    fails(capsys, ["bench", "--loader-only"], "--data FOLDER")
    fails(capsys, ["bench"], "--method NAME")


def test_every_flag_has_help_text_every_command_takes_no_progress_and_version_prints(capsys):
    from kinship.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, (name, action.dest)
        assert any(action.dest == "no_progress" for action in command._actions), name
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("kinship ")
