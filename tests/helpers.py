"""Helpers shared by the test modules: small run configs, the method variants every
multi-process and resume test walks through, spawning two gloo processes, the resume check, the
small bench. Fixtures live in ``conftest.py``; test modules import these by name."""

from __future__ import annotations

import json
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.bench import bench
from kinship.data import DataInfo, TrainData
from kinship.train.trainer import Trainer


def tiny_run_config(**overrides) -> dict:
    """A run on synthetic 16 px data with a width-8 CNN: seconds on CPU."""
    values = {
        "method": {"name": "mocov2", "queue_size": 128, "augment": {"crop_size": 16}},
        "data": {"name": "synthetic", "image_size": 16, "train_limit": 256, "test_limit": 128},
        "model": {"backbone": "convnet", "width": 8},
        "optim": {"lr": 0.05},
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "log_every": 1},
        "eval": {"knn_k": 20, "knn_every": 1},
    }
    for key, value in overrides.items():
        node = values
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return values


def fails(capsys, argv: list[str], *fragments: str) -> str:
    """``kinship argv`` exits 2 with one line `kinship: error: ...` holding every fragment, no traceback."""
    from kinship.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kinship: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def data_handle(size: int, num_classes: int, image_size: int) -> TrainData:
    """The data handle of a method built without data (its state shapes follow ``size`` and ``num_classes``)."""
    return TrainData.describe(DataInfo(size, num_classes, image_size))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args) -> dict:
    """Run ``worker(rank, port, out, *args)`` on 2 gloo processes; returns what each put in ``out``."""
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(worker, args=(free_port(), out, *args), nprocs=2, join=True)
    return dict(out)


TINY = {"hidden": 32, "dim": 16}


AUG16 = {"crop_size": 16}


VARIANTS = {  # name -> method section (and data section overrides)
    "byol": {"name": "byol", "projector_hidden": 32, "predictor_hidden": 32, "projector_dim": 16, "view1": AUG16, "view2": AUG16},
    "mocov2": {"name": "mocov2", "queue_size": 128, "augment": AUG16},
    "mocov2-symmetric": {"name": "mocov2", "queue_size": 128, "symmetric": True, "augment": AUG16},
    "msf": {"name": "msf", "bank_size": 128, **TINY, "weak": AUG16, "strong": AUG16},
    "cmsf-self": {"name": "cmsf", "constraint": "self", "bank_size": 128, **TINY, "weak": AUG16, "strong": AUG16},
    "cmsf-self-third_aug": {
        "name": "cmsf",
        "constraint": "self",
        "constraint_view": "third_aug",
        "bank_size": 128,
        **TINY,
        "weak": AUG16,
        "strong": AUG16,
    },
    "cmsf-supervised": {"name": "cmsf", "constraint": "supervised", "bank_size": 128, **TINY, "weak": AUG16, "strong": AUG16},
    "cmsf-semi": {"name": "cmsf", "constraint": "semi", "bank_size": 128, **TINY, "weak": AUG16, "strong": AUG16},
    "swav": {"name": "swav", "prototypes": 16, **TINY, "queue_size": 64, "queue_start_epoch": 1, "augment": AUG16},
    "mira": {"name": "mira", "prototypes": 16, **TINY, "view1": AUG16, "view2": AUG16},
    "coke": {
        "name": "coke",
        "clusters": [4, 6],
        "eta": 0.5,
        **TINY,
        "local_crops": 2,
        "view1": AUG16,
        "view2": AUG16,
        "local": {"crop_size": 8},
    },
    "clim": {
        "name": "clim",
        "queue_size": 128,
        "augment": AUG16,
        "resolutions": [16, 12],
        "clusters": 8,
        "neighbours": 6,
        "positives": 3,
        "refresh_start": 1,
        "refresh_every": 1,
    },
    "clim-mixup-cluster-kin-only": {
        "name": "clim",
        "queue_size": 128,
        "augment": AUG16,
        "mixing": "mixup",
        "selection": "cluster",
        "plain_weight": 0.0,
        "clusters": 8,
        "neighbours": 6,
        "positives": 3,
        "refresh_start": 1,
    },
    "sscl": {
        "name": "sscl",
        "queue_size": 128,
        **TINY,
        "refresh_every": 1,
        "weak": AUG16,
        "strong": {"crop_size": 16, "randaugment": 2, "cutout": 0.5},
    },
    "sscl-calibrated-assign-labeled-prototypes": {
        "name": "sscl",
        "queue_size": 128,
        **TINY,
        "refresh_every": 1,
        "assign": "calibrated",
        "alpha_prototype": "assigned",
        "prototype_mixture": False,
        "calibration": "literal",
        "weak": AUG16,
        "strong": AUG16,
    },
    "fixmatch": {"name": "fixmatch", "weak": AUG16, "strong": {"crop_size": 16}},
    "supervised": {"name": "supervised", "augment": AUG16},
    "coke-one-view-moving-average": {
        "name": "coke",
        "clusters": [5],
        "views": 1,
        "moving_average_after": 1,
        "label_slots": 3,
        "temperature": 0.1,
        "pred_weight": 1.0,
        **TINY,
        "view1": AUG16,
    },
}


# data settings of a variant: CMSF-semi's labels; CoKe's 251 images leave a tail that the scan epoch must label
SEMI = {"labeled_per_class": 16}


DATA = {
    "cmsf-semi": SEMI,
    "coke": {"train_limit": 251},
    "sscl": SEMI,
    "sscl-calibrated-assign-labeled-prototypes": SEMI,
    "fixmatch": SEMI,
}


# train settings of a variant: the labeled stream of the semi-supervised methods; SsCL's epochs of a
# fixed 5 steps, which run on across passes over the data (4 or 8 batches a pass)
TRAIN = {
    "sscl": {"labeled_batch_size": 16, "steps_per_epoch": 5},
    "sscl-calibrated-assign-labeled-prototypes": {"labeled_batch_size": 16},
    "fixmatch": {"labeled_batch_size": 16},
}


def losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def resume_values(name: str) -> dict:
    values = tiny_run_config(**{"method": VARIANTS[name]})
    values["data"].update(DATA.get(name, {}))
    values["train"].update(TRAIN.get(name, {}))
    return values


def assert_resumed_exactly(tmp_path, values, first_stop: dict) -> None:
    """A straight run and one stopped by ``first_stop`` then resumed end in the same state and losses."""
    straight = Trainer(build_config(values), tmp_path / "a", log=lambda *_: None).fit()
    stopped = {**values, "train": {**values["train"], **first_stop}}
    Trainer(build_config(stopped), tmp_path / "b", log=lambda *_: None).fit()
    resumed = Trainer(build_config(values), tmp_path / "b", resume=True, log=lambda *_: None).fit()
    a = checkpoint.load(tmp_path / "a" / "last.pt")
    b = checkpoint.load(tmp_path / "b" / "last.pt")
    assert a["position"] == b["position"]
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert losses(tmp_path / "a" / "metrics.jsonl") == losses(tmp_path / "b" / "metrics.jsonl")
    if "online_probe" in a:  # the online linear probe continues exactly too
        for key, value in a["online_probe"]["module"].items():
            assert torch.equal(value, b["online_probe"]["module"][key]), key
    assert straight["knn_top1"] == resumed["knn_top1"]
    assert resumed["knn_pixel_top1"] == straight["knn_pixel_top1"]


# the bench's semi-supervised runs: a labeled batch beside each unlabeled one, 25 labels per class
BENCH_SEMI = ["train.labeled_batch_size=32", "data.labeled_per_class=25"]
# small state where the defaults are sized for 50,000 images (the bench makes 512)
SMALL = {
    "mocov2": ["method.queue_size=128"],
    "msf": ["method.bank_size=256", "method.topk=5"],
    "cmsf": ["method.bank_size=256", "method.topk=5"],
    "mira": ["method.prototypes=300", "method.hidden=256"],
    "supervised": BENCH_SEMI,
    "sscl": BENCH_SEMI,
    "fixmatch": BENCH_SEMI,
}
SMALL["cmsf-semi"] = SMALL["cmsf"] + ["method.constraint=semi"]
SMALL["swav-queue"] = ["method.queue_size=64", "method.queue_start_epoch=0"]  # full from the third step
SMALL["clim"] = [
    "method.queue_size=128",
    "method.clusters=20",
    "method.neighbours=10",
    "method.positives=4",
    "method.kmeans_iters=2",
    "method.refresh_start=0",
]  # with its positives: the bench refreshes first


def small_bench(name: str, extra: list[str] = (), **kwargs) -> dict:
    """Five steps of the bench for ``name`` (a method, or a variant of :data:`SMALL`) on 512 images, batch 32."""
    return bench(
        name.split("-")[0],
        "cpu",
        "convnet",
        batch=32,
        steps=1,
        compute_only=False,
        warmup=2,
        width=8,
        overrides=SMALL.get(name, []) + list(extra),
        tune_allocator=False,
        images=512,
        **kwargs,
    )


def semi_values(**method) -> dict:
    return tiny_run_config(
        **{
            "method": {
                "name": "sscl",
                **({} if method.get("name") == "fixmatch" else {"queue_size": 128, "hidden": 32, "dim": 16, "refresh_every": 1}),
                "weak": {"crop_size": 16},
                "strong": {"crop_size": 16},
                **method,
            },
            "data.labeled_per_class": 8,
            "train.labeled_batch_size": 16,
        }
    )


def skewed_logits(b=256, k=20, seed=0, dtype=torch.float64, noise=0.35):
    """Cosine logits of unit features around k prototypes, 20% of the clusters 10x more likely."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(k, 16, generator=g, dtype=dtype), dim=1)
    weights = torch.ones(k, dtype=dtype)
    weights[: max(1, k // 5)] = 10.0
    labels = torch.multinomial(weights, b, replacement=True, generator=g)
    x = F.normalize(protos[labels] + noise * torch.randn(b, 16, generator=g, dtype=dtype), dim=1)
    return x @ protos.T
