"""The method contract: the labeled stream, refreshes, scan epochs, per-epoch metrics and the data
handle, each exact across a resume and across processes."""

import json

import pytest
import torch
from torch import nn

from kinship import checkpoint
from kinship.assembly import build_config, build_method
from kinship.data import DataInfo, LabeledPlan, TrainData
from kinship.methods import Refresh
from kinship.train.trainer import Trainer

import probe
from helpers import spawn_two, tiny_run_config

pytestmark = pytest.mark.usefixtures("probe_method")  # the "probe" method of probe.py


def records(run, key):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def losses(run):
    return [(r["step"], r["loss"]) for r in records(run, "loss")]


def test_labeled_stream_wraps_around_40_labels_and_splits_across_processes():
    labeled = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:40].sort().values
    single = LabeledPlan(labeled, 64, seed=3)
    ranks = [LabeledPlan(labeled, 64, seed=3, rank=r, world=2) for r in range(2)]
    steps = [single.indices(s) for s in range(5)]  # 320 draws = 8 passes over the 40 labels
    for s, expected in enumerate(steps):
        assert torch.equal(torch.cat([p.indices(s) for p in ranks]), expected)
    drawn = torch.cat(steps)
    assert set(drawn.tolist()) == set(labeled.tolist())
    assert torch.bincount(drawn, minlength=500)[labeled].tolist() == [8] * 40  # each pass is a permutation
    for p in range(8):
        assert sorted(drawn[40 * p : 40 * (p + 1)].tolist()) == labeled.tolist()
    assert torch.equal(LabeledPlan(labeled, 64, seed=3).indices(4), steps[4])  # a function of (seed, step)
    assert not torch.equal(LabeledPlan(labeled, 64, seed=4).indices(0), steps[0])


def probe_config(**overrides):
    """The probe on 256 synthetic images: 8 steps of 32 per epoch, 40 labels, a labeled batch of 64."""
    return tiny_run_config(
        **{
            "method": {"name": "probe", "refresh_every": 2},
            "train.epochs": 5,
            "train.batch_size": 32,
            "train.labeled_batch_size": 64,
            "data.labeled_per_class": 10,
            "eval.knn_every": 100,
            "eval.baselines": False,
            **overrides,
        }
    )


def fit(values, out, resume=False):
    return Trainer(build_config(values), out, resume=resume, log=lambda *_: None).fit()


def assert_same_run(a, b):
    ca, cb = checkpoint.load(a / "last.pt"), checkpoint.load(b / "last.pt")
    assert ca["position"] == cb["position"] and ca["refreshes"] == cb["refreshes"]
    for key, value in ca["method"].items():
        assert torch.equal(value, cb["method"][key]), key
    assert losses(a) == losses(b)
    return ca


def test_refresh_and_labeled_stream_resumed_mid_epoch_between_refreshes(tmp_path):
    values = probe_config()  # 8 steps per epoch; refreshes before epochs 1, 3 and 5
    fit(values, tmp_path / "straight")
    values["train"]["stop_after_steps"] = 8 * 3 + 3  # in epoch 4: after the 2nd refresh, before the 3rd
    fit(values, tmp_path / "resumed")
    stopped = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert stopped["position"] == [3, 3, 27] and stopped["refreshes"] == {"table": {"count": 2, "step": 16}}
    values["train"]["stop_after_steps"] = 0
    fit(values, tmp_path / "resumed", resume=True)
    state = assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert state["refreshes"] == {"table": {"count": 3, "step": 32}} and int(state["method"]["refresh_count"]) == 3
    assert [r["step"] for r in records(tmp_path / "resumed", "refresh")] == [0, 16, 32]
    # 40 labels, labeled batch 64, 40 steps: 2,560 draws, 64 per label
    assert state["method"]["labeled_seen"].sum() == 2560 and set(state["method"]["labeled_seen"].unique().tolist()) == {0, 64}
    epochs = records(tmp_path / "resumed", "labeled_seen")  # on_epoch_end metrics, one line per epoch
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5] and epochs[-1]["labeled_seen"] == 2560


def test_scan_epoch_changes_no_weight_and_the_schedule_starts_after_it(tmp_path):
    values = probe_config(**{"method.scan": 1, "train.epochs": 2, "train.stop_after_epochs": 1})
    fit(values, tmp_path)
    torch.manual_seed(build_config(values).train.seed)
    initial = build_method(build_config(values), TrainData.describe(DataInfo(256, 4, 16)))
    state = checkpoint.load(tmp_path / "last.pt")
    for key, value in initial.named_parameters():  # BN running statistics do move: the forward runs in train mode
        assert torch.equal(value, state["method"][key]), key
    assert state["optimizer"]["state"] == {}  # no optimizer step, no momentum buffers
    assert state["method"]["scanned"].tolist() == [1] * 256  # every image went through the scan
    values["train"]["stop_after_epochs"] = 0
    fit(values, tmp_path, resume=True)
    lines = records(tmp_path, "loss")
    assert all(r.get("scan") and r["lr"] == 0 for r in lines[:8]) and not any(r.get("scan") for r in lines[8:])
    assert lines[8]["lr"] == pytest.approx(0.05 * 32 / 256)  # the first training step: the base lr, no decay yet
    assert lines[-1]["lr"] < lines[8]["lr"]
    assert records(tmp_path, "summary")[-1]["summary"]["epochs_done"] == 3


def test_refresh_positions():
    every_two = Refresh("t", 2)
    assert [e for e in range(6) if every_two.due(e, 0, 0)] == [0, 2, 4]
    assert not every_two.due(2, 1, 0)  # epoch refreshes run at the epoch's first step only
    assert [s for s in range(10) if Refresh("s", 3, unit="step", start=1).due(0, s, s)] == [1, 4, 7]
    with pytest.raises(ValueError):
        Refresh("x", 0)


def test_embed_all_gives_rows_in_index_order_in_eval_mode_without_grad():
    images = (torch.rand(10, 3, 8, 8) * 255).to(torch.uint8)
    handle = TrainData(DataInfo(10, 2, 8), torch.zeros(10, dtype=torch.long), images=images)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            assert not self.training and not torch.is_grad_enabled()
            x = self.bn(x).flatten(1)
            return x[:, :4], x.sum(1, keepdim=True)

    net = TwoHeads().train()
    index = torch.tensor([7, 2, 2, 9])
    features, sums = handle.embed_all(net, lambda u8: u8.float(), index=index, batch_size=3)
    assert net.training  # mode restored
    expected = images[index].float().flatten(1) / (1 + 1e-5) ** 0.5  # BN with its initial running statistics
    assert torch.allclose(features, expected[:, :4]) and torch.allclose(sums[:, 0], expected.sum(1))


def test_resume_on_another_number_of_processes_is_a_clear_error(tmp_path):
    from kinship.errors import CheckpointError

    values = probe_config(**{"train.epochs": 2, "train.stop_after_epochs": 1})
    fit(values, tmp_path)
    state = checkpoint.load(tmp_path / "last.pt")
    state["world_size"] = 2
    checkpoint.save_atomic(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and this run has 1.*nproc_per_node=2"):
        fit(values, tmp_path, resume=True)
    values["train"]["allow_resharding"] = True
    assert fit(values, tmp_path, resume=True)["epochs_done"] == 2


def _trainer_worker(rank, port, out, values, folder):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    probe.register()  # a spawned process: no fixture ran here
    Trainer(build_config(values), folder, log=lambda *_: None).fit()
    from kinship.runtime import rank as current_rank

    out[current_rank()] = True


@pytest.mark.slow
def test_trainer_on_two_processes_equals_one_with_scan_refreshes_and_labeled_stream(tmp_path):
    """2 gloo processes through the trainer (a scan epoch, refreshes with embed_all, the labeled
    stream, the all-gathered counters) against one process on the same global batches, BN-free."""
    values = probe_config(**{"model.norm": "none", "train.epochs": 3, "method.scan": 1})
    fit(values, tmp_path / "one")
    done = spawn_two(_trainer_worker, values, tmp_path / "two")
    assert done == {0: True, 1: True}
    one, two = checkpoint.load(tmp_path / "one" / "last.pt"), checkpoint.load(tmp_path / "two" / "last.pt")
    assert one["refreshes"] == two["refreshes"] == {"table": {"count": 2, "step": 16}} and two["world_size"] == 2
    assert two["method"]["scanned"].tolist() == [1] * 256
    for key, value in one["method"].items():  # fp32: the gradient is the mean of two half-batch means
        assert torch.allclose(value.float(), two["method"][key].float(), rtol=1e-5, atol=1e-6), key
    for (step_a, loss_a), (step_b, loss_b) in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5)
