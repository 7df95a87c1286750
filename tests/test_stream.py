"""Streamed image folders: crops cut from the original files with RandomResizedCrop's geometry, exact
resume, a corrupt file mid-run, no host wait in the loader, memory that does not grow with the folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.config import AugmentConfig
from kinship.data.loader import BatchPlan
from kinship.data.store import write_image_folder
from kinship.data.stream import FileCrops, StreamingLoader, check_files, crop_views, open_image
from kinship.dispatch import OpLog
from kinship.train.trainer import Trainer

from helpers import tiny_run_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ (2 classes x 40 JPEGs of about 80 x 60 px) and test/ (2 x 8)."""
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root / "train", classes=2, per_class=40, width=80, height=60, seed=0)
    write_image_folder(root / "test", classes=2, per_class=8, width=80, height=60, seed=1)
    return root


def test_crop_boxes_follow_torchvision_random_resized_crop_on_the_original_geometry():
    """The boxes of 4,000 draws on images of four shapes (one tall, one wide beyond the ratio range):
    width, height, left and top match torchvision's RandomResizedCrop.get_params on the same shapes
    in mean and in quartiles, within sampling noise."""
    sizes = [(500, 375), (375, 500), (1024, 768), (900, 200)]
    recipe = AugmentConfig(crop_size=224, crop_scale=(0.08, 1.0))
    n = 4000
    plan = BatchPlan(n, n, seed=0)
    from kinship.augment.views import draw_geometry

    draws = [draw_geometry(recipe, plan.shard, torch.Generator().manual_seed(s), "cpu") for s in range(len(sizes))]
    torch.manual_seed(0)
    for (width, height), draw in zip(sizes, draws):
        ours = torch.tensor(FileCrops.boxes([draw], [recipe], [(width, height)] * n, slice(None))[0]).squeeze(1)
        image = Image.new("RGB", (width, height))
        theirs = torch.tensor(
            [RandomResizedCrop.get_params(image, recipe.crop_scale, recipe.crop_ratio) for _ in range(n)], dtype=torch.float32
        )[:, [1, 0, 3, 2]]  # (top, left, h, w) -> (x0, y0, w, h)
        for column in range(4):
            a, b = ours[:, column], theirs[:, column]
            scale = max(width, height)
            assert abs(a.mean() - b.mean()) < 0.03 * scale, (width, height, column, a.mean(), b.mean())
            for q in (0.25, 0.5, 0.75):
                assert abs(a.quantile(q) - b.quantile(q)) < 0.04 * scale, (width, height, column, q)
        assert (ours[:, 0] + ours[:, 2] <= width).all() and (ours[:, 1] + ours[:, 3] <= height).all()


def test_a_crop_is_torchvisions_resized_crop_of_the_file(tmp_path):
    """Without DCT reduction the crop is torchvision's resized_crop of the decoded file (PIL,
    bilinear) up to rounding (no pixel more than one level away); decoded at 1/4 (a small output
    from a large box), it stays within a few levels of it on average."""
    write_image_folder(tmp_path, classes=1, per_class=1, width=1024, height=768, seed=3)
    path = next(tmp_path.rglob("*.jpg"))
    full = Image.open(path).convert("RGB")
    for box, size, flip, tolerance in (
        ((100.0, 50.0, 300.0, 200.0), 224, False, 0.05),
        ((0.0, 0.0, 800.0, 700.0), 96, True, 3.0),
    ):
        (ours,) = crop_views(open_image(path), [box], [size], [flip])
        x0, y0, w, h = (int(v) for v in box)
        theirs = TF.resized_crop(full, y0, x0, h, w, [size, size], InterpolationMode.BILINEAR)
        if flip:
            theirs = TF.hflip(theirs)
        difference = np.abs(ours.astype(np.float64) - np.asarray(theirs, dtype=np.float64))
        assert difference.mean() <= tolerance and (tolerance > 1 or difference.max() <= 1), (
            box,
            difference.mean(),
            difference.max(),
        )


def streaming_run(folder: Path, **overrides) -> dict:
    values = tiny_run_config(
        **{
            "train.epochs": 2,
            "train.batch_size": 16,
            "eval.knn_every": 1,
            "train.log_every": 2,
            "model.norm": "none",
            **overrides,
        }
    )
    values["data"] = {
        "name": "imagefolder",
        "path": str(folder / "train"),
        "test_path": str(folder / "test"),
        "image_size": 24,
        "workers": 2,
    }
    return values


def logged_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_a_streamed_run_resumes_exactly_past_a_corrupt_file(folder, tmp_path):
    """One file of the folder is truncated: the run finishes, names the file in its log and
    metrics, and a run stopped mid-epoch and resumed ends with the straight run's weights and losses."""
    root = shutil.copytree(folder, tmp_path / "data")
    corrupt = sorted((root / "train").rglob("*.jpg"))[7]
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    logs: list[str] = []
    values = streaming_run(root)
    values["data"]["max_bad_files"] = 0.05  # 1 of 80 is tolerated
    straight = Trainer(build_config(values), tmp_path / "straight", log=logs.append).fit()
    assert straight["epochs_done"] == 2
    assert any(str(corrupt) in line for line in logs), logs
    assert str(corrupt) in (tmp_path / "straight" / "metrics.jsonl").read_text()
    stopped = streaming_run(root, **{"train.stop_after_steps": 3})
    stopped["data"]["max_bad_files"] = 0.05
    Trainer(build_config(stopped), tmp_path / "resumed", log=lambda *_: None).fit()
    Trainer(build_config(values), tmp_path / "resumed", resume=True, log=lambda *_: None).fit()
    one, two = (checkpoint.load(tmp_path / run / "last.pt") for run in ("straight", "resumed"))
    assert one["position"] == two["position"] and one["bad_files"] == two["bad_files"] and str(corrupt) in one["bad_files"]
    for key, value in one["method"].items():
        assert torch.equal(value, two["method"][key]), key
    assert logged_losses(tmp_path / "straight") == logged_losses(tmp_path / "resumed")


def test_too_many_bad_files_stop_the_run_with_their_names(folder, tmp_path):
    root = shutil.copytree(folder, tmp_path / "data")
    bad = sorted((root / "train").rglob("*.jpg"))[:3]
    for path in bad:
        path.write_bytes(b"not an image")
    from kinship.errors import DataError

    with pytest.raises(DataError, match="data.max_bad_files") as error:
        Trainer(build_config(streaming_run(root, **{"train.log_every": 1})), tmp_path / "run", log=lambda *_: None).fit()
    assert str(bad[0]) in str(error.value) or str(bad[1]) in str(error.value) or str(bad[2]) in str(error.value)
    assert [p for p, _ in check_files(sorted((root / "train").rglob("*.jpg")), progress=False)] == bad


def test_the_streaming_loader_makes_the_host_wait_for_nothing(folder):
    """Batches copied to a device (``meta`` stands in for a GPU on a CPU machine) with non_blocking
    copies from the workers' tensors: no op of the training process's side of the loader makes the
    host wait (no Python list copied over, no value read back)."""
    files = sorted((folder / "train").rglob("*.jpg"))
    labels = torch.arange(len(files)) % 2
    plan = BatchPlan(len(files), 16, seed=0)
    loader = StreamingLoader(files, labels, plan, torch.device("meta"), [AugmentConfig(crop_size=16)] * 2, workers=1, prefetch=2)
    batches = loader.epoch(0)
    next(batches)  # the workers start; the labels were copied to the device once
    with OpLog() as log:
        batch = next(batches)
        next(batches)
    assert batch.images is None and batch.crops[0][1].device.type == "meta" and batch.labels.device.type == "meta"
    assert not log.syncs, dict(log.syncs)
    loader.close()


MEMORY_RUN = """
import json, resource, sys
from kinship.assembly import build_config
from kinship.train.trainer import Trainer
Trainer(build_config(json.loads(sys.argv[1])), sys.argv[2], log=lambda *_: None).fit()
print(json.dumps({"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_streamed_run_does_not_grow_with_the_folder(tmp_path):
    """Peak RSS of the training process and of its largest worker, on folders of 160 and 640
    images (96 px stored), a few steps and a k-NN evaluation over the whole bank (in chunks of 64):
    under 15 % more on the folder 4x larger."""
    peaks = []
    for per_class in (40, 160):
        root = tmp_path / str(per_class)
        write_image_folder(root / "train", classes=4, per_class=per_class, width=160, height=120, seed=0, quality=75)
        write_image_folder(root / "test", classes=4, per_class=10, width=160, height=120, seed=1, quality=75)
        values = streaming_run(root, **{"train.stop_after_steps": 4, "train.batch_size": 32, "eval.batch_size": 64})
        values["data"]["image_size"] = 96
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_RUN, json.dumps(values), str(root / "run")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = peaks
    assert large["self_mb"] < 1.15 * small["self_mb"], peaks
    assert large["workers_mb"] < 1.15 * small["workers_mb"], peaks


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_process_streamed(folder, tmp_path):
    """``torchrun --nnodes 2 --node-rank R`` (one process per node, gloo, a shared --out) on the
    streamed folder computes what one process computes on the same global batches: every process
    decodes its own rows, the crops are drawn for the global batch."""
    import socket

    import yaml

    values = streaming_run(folder, **{"train.epochs": 1, "eval.baselines": False})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    Trainer(build_config(values), tmp_path / "one", log=lambda *_: None).fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "kinship.cli",
                "pretrain",
                "--config",
                str(config),
                "--out",
                str(tmp_path / "two"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    one, two = (checkpoint.load(tmp_path / run / "last.pt") for run in ("one", "two"))
    assert two["world_size"] == 2 and one["position"] == two["position"]
    for key, value in one["method"].items():
        assert (
            torch.allclose(value, two["method"][key], rtol=1e-5, atol=1e-6)
            if value.dtype.is_floating_point
            else torch.equal(value, two["method"][key])
        ), key


def test_the_device_decoder_cuts_the_same_crops(folder, tmp_path):
    """``data.decoder: nvjpeg`` (here torchvision's decode_jpeg on the CPU, the same call that runs
    nvJPEG on a GPU): the workers send bytes and boxes, the crops come out within a few levels of the
    PIL path's (same draws, same boxes: only the resampling differs), and a run trains on them."""
    files = sorted((folder / "train").rglob("*.jpg"))
    plan = BatchPlan(len(files), 16, seed=0)
    recipes = [
        AugmentConfig(crop_size=32),
        AugmentConfig(crop_size=16, crop_scale=(0.05, 0.3)),
        AugmentConfig(crop_size=24, crop_mode="pad"),
    ]
    made = {}
    for decoder in ("pil", "nvjpeg"):
        loader = StreamingLoader(
            files, torch.arange(len(files)) % 2, plan, torch.device("cpu"), recipes, workers=0, decoder=decoder
        )
        made[decoder] = next(loader.epoch(0))
    for (recipe, ours), (_, theirs) in zip(made["pil"].crops, made["nvjpeg"].crops):
        assert ours.shape == theirs.shape == (16, 3, recipe.crop_size, recipe.crop_size)
        assert (ours.float() - theirs.float()).abs().mean() < 4, recipe
    values = streaming_run(folder, **{"train.epochs": 1})
    values["data"]["decoder"] = "nvjpeg"
    assert Trainer(build_config(values), tmp_path / "run", log=lambda *_: None).fit()["epochs_done"] == 1


def test_the_evaluation_suite_reads_a_streamed_folder(folder, tmp_path):
    """``kinship eval`` on a streamed run: the SGD linear probe and the fine-tuning read the train
    split's files a batch at a time."""
    from kinship.eval.suite import Evaluation

    values = streaming_run(
        folder,
        **{
            "train.epochs": 1,
            "eval.linear.mode": "sgd",
            "eval.linear.epochs": 1,
            "eval.finetune.epochs": 1,
            "eval.finetune.fractions": [0.25],
        },
    )
    Trainer(build_config(values), tmp_path / "run", log=lambda *_: None).fit()
    evaluation = Evaluation(tmp_path / "run" / "last.pt", tmp_path / "eval", [], progress=False, log=lambda *_: None)
    assert evaluation.data.streamed
    linear, finetune = evaluation.run("linear"), evaluation.run("finetune")
    assert linear["mode"] == "sgd" and 0 <= linear["top1"] <= 100
    assert [row["images"] for row in finetune["settings"]] == [20] and 0 <= finetune["settings"][0]["top1"] <= 100


def test_an_image_folder_over_the_memory_budget_is_refused_before_decoding(folder, tmp_path):
    from kinship.errors import ConfigError, DataError

    values = streaming_run(folder)
    values["data"].update(streaming=False, image_size=256, memory_budget_gb=0.01)  # 80 x 192 KiB = 15 MiB
    with pytest.raises(DataError, match="over data.memory_budget_gb 0.01: stream them"):
        Trainer(build_config(values), tmp_path / "run", log=lambda *_: None).fit()
    values["data"].update(name="synthetic", streaming=True)
    with pytest.raises(ConfigError, match="data.streaming is for data.name: imagefolder"):
        build_config(values)


def test_the_evaluation_view_of_a_streamed_file_is_torchvisions_resize_and_center_crop(tmp_path):
    """A streamed bank or test image under an ``eval_resize`` view is decoded as torchvision's
    Resize(256) + CenterCrop(224) of the file (within rounding), not cut from the image squeezed into
    a 256 px square, which loses the resolution of the longer side (stripes across it, here)."""
    from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

    from kinship.augment.views import center_view
    from kinship.data.stream import FileImages

    x = np.arange(500)[None, :, None]
    files = [tmp_path / "wide.png", tmp_path / "tall.png"]  # stripes of a 7 px period across the longer side
    Image.fromarray(np.broadcast_to(127.5 + 100 * np.sin(2 * np.pi * x / 7), (375, 500, 3)).astype(np.uint8)).save(files[0])
    Image.fromarray(np.ascontiguousarray(np.asarray(Image.open(files[0])).transpose(1, 0, 2))).save(files[1])
    recipe = AugmentConfig(crop_size=224, eval_resize=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    source, rest = FileImages(files, torch.zeros(2, dtype=torch.int64), ["a"], 256, torch.device("cpu")).for_view(recipe)
    batch = source[0:2]
    ours = center_view(batch.images, rest, batch.aspect) * 255
    reference = Compose([Resize(256), CenterCrop(224), PILToTensor()])
    theirs = torch.stack([reference(Image.open(path).convert("RGB")).float() for path in files])
    squeezed = FileImages(files, torch.zeros(2, dtype=torch.int64), ["a"], 256, torch.device("cpu"))[0:2]
    before = center_view(squeezed.images, recipe, squeezed.aspect) * 255
    error, error_before = (ours - theirs).abs().mean(), (before - theirs).abs().mean()
    assert error < 2 and error_before > 10 * error, (error, error_before)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "coke", "clusters": [4], "hidden": 32, "dim": 16, "view1": {"crop_size": 16}, "view2": {"crop_size": 16}},
        {
            "name": "clim",
            "queue_size": 64,
            "augment": {"crop_size": 16},
            "resolutions": [16, 12],
            "clusters": 4,
            "neighbours": 4,
            "positives": 2,
            "refresh_start": 1,
            "refresh_every": 1,
        },
        {
            "name": "sscl",
            "queue_size": 64,
            "hidden": 32,
            "dim": 16,
            "refresh_every": 1,
            "weak": {"crop_size": 16},
            "strong": {"crop_size": 16, "randaugment": 2},
        },
    ],
    ids=lambda m: m["name"],
)
def test_methods_that_read_beyond_their_batch_train_on_a_streamed_folder(folder, tmp_path, method):
    """CoKe's scan epoch labels the tail the batches leave out (80 images, batch 24), CLIM fetches each
    anchor's positives after its refresh, SsCL reads its labeled stream and refreshes its prototypes:
    images read by index from the files beside the streamed crops, each for two epochs."""
    values = streaming_run(folder, **{"method": method, "train.batch_size": 24, "train.epochs": 2})
    if method["name"] == "sscl":
        values["data"]["labeled_per_class"] = 6
        values["train"]["labeled_batch_size"] = 8
    summary = Trainer(build_config(values), tmp_path / "run", log=lambda *_: None).fit()
    assert summary["epochs_done"] == 2 + (method["name"] == "coke") and 0 <= summary["knn_top1"] <= 100
