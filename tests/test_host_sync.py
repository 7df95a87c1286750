"""A training step asks nothing of the device that makes the host wait (a value read back, a
data-dependent shape, Python data copied over), so that on a GPU the host can queue the next step
while the device runs this one; checked on the CPU by recording the dispatched ops."""

import pytest
import torch

from kinship.blocks.assignment import mira_targets, sinkhorn
from kinship.dispatch import OpLog

from helpers import small_bench


def test_op_log_flags_what_makes_the_host_wait():
    x = torch.rand(16)
    with OpLog() as log:
        y = (x * 2 + 1).clamp(0, 1)
        y[torch.arange(4)] = x[torch.tensor([1, 2, 3, 4])]  # a Python list copied over: flagged
        torch.where(x > 0.5, x, y).sum()
    assert dict(log.syncs) == {"aten.lift_fresh": 1} and log.total >= 8
    with OpLog() as log:
        x.nonzero()
        x[x > 0.5]
        x.max().item()
    assert dict(log.syncs) == {"aten.nonzero": 1, "aten.index": 1, "aten._local_scalar_dense": 1}


@pytest.mark.parametrize(
    "name",
    [
        "byol",
        "mocov2",
        "msf",
        "cmsf",
        "cmsf-semi",
        "swav",
        "swav-queue",
        "mira",
        "coke",
        "clim",
        "supervised",
        "sscl",
        "fixmatch",
    ],
)
@pytest.mark.slow
def test_a_step_has_no_host_synchronisation(name):
    """begin_step and views, forward + backward + optimizer step, after_step: the bench's counted
    step (after four others, which may copy constants to the device once) records no syncing op;
    but RandAugment (SsCL's and FixMatch's strong view) on a CPU, which picks each operation's images
    by index there, where it costs nothing (on a GPU it masks: tests/test_randaugment.py)."""
    result = small_bench(name)
    if name in ("sscl", "fixmatch"):
        assert set(result["host_syncs"]) == {"views"} and set(result["host_syncs"]["views"]) == {"aten.nonzero"}
    else:
        assert result["host_syncs"] == {}
    assert result["ops"]["views"] > 0 and result["ops"]["step"] > 0


def test_solvers_dispatch_few_ops_and_no_sync_and_solve_both_crops_at_once():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 256, 300, generator=g)
    counts = {}
    for iterations in (29, 30):
        with OpLog() as log:
            both = mira_targets(logits, 0.225, 2 / 3, iterations)
        assert not log.syncs
        counts[iterations] = log.total
    assert counts[30] - counts[29] == 5 and counts[30] <= 170  # five ops per fixed-point iteration
    beta = torch.tensor(2 / 3)  # as MIRA's schedule gives it under compile: three ops more in all, no sync
    with OpLog() as log:
        from_tensor = mira_targets(logits, 0.225, beta, 30)
    assert not log.syncs and log.total <= counts[30] + 3 and torch.allclose(from_tensor, both, atol=1e-6)
    for crop in range(2):
        assert torch.allclose(both[crop], mira_targets(logits[crop], 0.225, 2 / 3, 30), atol=1e-6)
    with OpLog() as log:
        codes = sinkhorn(logits, 0.05, 3)
    assert not log.syncs
    for crop in range(2):
        assert torch.allclose(codes[crop], sinkhorn(logits[crop], 0.05, 3), atol=1e-6)
