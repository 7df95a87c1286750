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

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.methods import METHODS
from kinship.train.trainer import Trainer

from helpers import DATA, TRAIN, VARIANTS, tiny_run_config

pytestmark = pytest.mark.slow  # torchrun, two processes per method

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
