"""Every registered method through the real command line under `torchrun --nproc_per_node=2` (gloo,
CPU) against one process on the same global batches: the checkpoints agree entry by entry.

What makes them comparable: the batch of every step is the same global batch split in two; the
augmentation of every image is drawn for the global batch (the same numbers on any number of
processes); every cross-sample state is gathered or all-reduced; and the model is BN-free
(``model.norm: none``), since per-process batch statistics are the one thing that must differ.
What still differs is rounding: DDP averages two half-batch gradients where one process takes the
mean over the whole batch, so weights agree to float32 rounding accumulated over the steps, not
bit for bit (the tolerances below). No entry is excluded; integer entries (queue pointers, bank
indices and labels, cache flags, counts) are equal exactly.
"""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_run_config

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.methods import METHODS
from kinship.train.trainer import Trainer

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
    "swav": {"name": "swav", "prototypes": 16, **TINY, "queue_size": 64, "queue_start_epoch": 1, "global_crop": AUG16},
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
    "fixmatch": {"name": "fixmatch", "queue_size": 128, **TINY, "weak": AUG16, "strong": {"crop_size": 16}},
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
# measured on a 2-core CPU: method state at most 2.7e-7 apart (CMSF third_aug; MoCo 3e-11); the
# optimizer's momentum buffers, sums of gradients that are differences of large terms, 2.6e-5
RTOL, ATOL = 1e-5, 1e-6
MOMENTUM_ATOL = 1e-4


def run_config(name: str) -> dict:
    values = tiny_run_config(
        **{"method": VARIANTS[name], "model.norm": "none", "train.batch_size": 32, "eval.baselines": False, "eval.knn_every": 100}
    )
    values["data"].update(DATA.get(name, {}))  # CMSF-semi: the pseudo-label classifier, trained and broadcast twice an epoch
    values["train"].update(TRAIN.get(name, {}))
    return values


def test_every_registered_method_has_a_variant():
    library = set(METHODS) - {"probe"}  # "probe": the tests' own method (tests/probe.py), when imported
    assert library <= {v["name"] for v in VARIANTS.values()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_torchrun_two_processes_equal_one(tmp_path, name):
    values = run_config(name)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    Trainer(build_config(values), tmp_path / "one", log=lambda *_: None).fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "kinship.cli",
            "pretrain",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = checkpoint.load(tmp_path / "one" / "last.pt"), checkpoint.load(tmp_path / "two" / "last.pt")
    assert two["world_size"] == 2 and one["position"] == two["position"]
    far = {}
    for key, value in one["method"].items():
        other = two["method"][key]
        if value.dtype.is_floating_point:
            if not torch.allclose(value, other, rtol=RTOL, atol=ATOL):
                far[key] = (value - other).abs().max().item()
        elif not torch.equal(value, other):  # pointers, indices, labels, counts: exactly
            far[key] = "differs"
    assert not far, far
    for state_one, state_two in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values()):
        assert torch.allclose(state_one["momentum_buffer"], state_two["momentum_buffer"], rtol=0, atol=MOMENTUM_ATOL)
