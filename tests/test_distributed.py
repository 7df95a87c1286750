"""Two gloo processes on CPU must reproduce one process fed the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kinship.assembly import build_config, build_method, no_buffer_sync, synchronised_batch_norm
from kinship.blocks.shuffle_bn import shuffled_forward
from kinship.data import Batch
from kinship.methods import METHODS, StepInfo
from kinship.methods.cmsf import CMSF
from kinship.methods.mocov2 import MoCoV2

from helpers import data_handle, spawn_two

pytestmark = pytest.mark.slow  # two spawned gloo processes per test

BATCH, DIM = 8, 12


class FlatLinear(nn.Module):
    """BN-free backbone: without batch statistics, per-process and global batches must agree exactly."""

    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, self.feature_dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make_moco(shuffle_bn: bool) -> MoCoV2:
    torch.manual_seed(0)
    config = build_config({"method": {"name": "mocov2", "queue_size": 32, "dim": DIM, "shuffle_bn": shuffle_bn}})
    return MoCoV2(config.method, FlatLinear(), data_handle(64, 10, 4)).double()


def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]


def run_steps(model: nn.Module, method: MoCoV2, views, steps: int = 2):
    grads = []
    for s in range(steps):
        method.zero_grad()
        batch = Batch(torch.arange(views[0].shape[0]), torch.empty(0), torch.empty(0))
        loss, _ = model([v + s for v in views], batch, StepInfo(0, s, steps, torch.Generator(), 100 + s))
        loss.backward()
        grads.append([p.grad.clone() for p in method.backbone.parameters()])
    return grads


def _worker(rank: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    method = make_moco(shuffle_bn=True)
    ddp = nn.parallel.DistributedDataParallel(method, **no_buffer_sync())
    half = BATCH // 2
    views = [v[rank * half : (rank + 1) * half] for v in inputs()]
    grads = run_steps(ddp, method, views)
    out[rank] = {"queue": method.queue.rows.clone(), "ptr": method.queue.ptr.item(), "grads": grads}
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_result():
    return spawn_two(_worker)


def test_moco_queue_equals_single_process_on_concatenated_keys(two_process_result):
    single = make_moco(shuffle_bn=False)
    run_steps(single, single, inputs())
    for rank in (0, 1):
        assert two_process_result[rank]["ptr"] == single.queue.ptr.item() == 2 * BATCH
        assert torch.allclose(two_process_result[rank]["queue"], single.queue.rows, atol=1e-12)


def test_ddp_gradients_equal_single_process(two_process_result):
    single = make_moco(shuffle_bn=False)
    expected = run_steps(single, single, inputs())
    for rank in (0, 1):
        for step_grads, step_expected in zip(two_process_result[rank]["grads"], expected):
            for g, e in zip(step_grads, step_expected):
                assert torch.allclose(g, e, atol=1e-10)


def make_cmsf(constraint: str):
    torch.manual_seed(0)
    values = {
        "name": "cmsf",
        "constraint": constraint,
        "bank_size": 32,
        "hidden": 24,
        "dim": DIM,
        "topk": 3,
        "topk_constraint": 4,
    }
    method = CMSF(build_config({"method": values}).method, FlatLinear(), data_handle(64, 10, 4)).double()
    return method.eval()  # BN on running statistics: per-sample targets independent of the batch split


def run_cmsf_steps(model: nn.Module, index: torch.Tensor, labels: torch.Tensor, views, steps: int = 3):
    losses = []
    for s in range(steps):  # the same images every step: from the second step on, the cache is read
        loss, _ = model(
            [v + 0.1 * s for v in views], Batch(index, torch.empty(0), labels), StepInfo(0, s, steps, torch.Generator(), s)
        )
        loss.backward()
        losses.append(loss.item())
    return losses


def cmsf_state(method: CMSF) -> dict:
    state = {
        "bank": method.bank.rows.clone(),
        "bank_index": method.bank.column("index").clone(),
        "bank_label": method.bank.column("label").clone(),
        "ptr": method.bank.ptr.item(),
    }
    if method.config.constraint == "self":
        state.update(
            previous=method.previous_of_image.rows.clone(),
            cache=method.cache.rows.clone(),
            cache_valid=method.cache.valid.clone(),
        )
    return state


def cmsf_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.arange(10, 10 + BATCH), torch.randint(0, 3, (BATCH,), generator=g)


def _cmsf_worker(rank: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    result = {}
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    index, labels = cmsf_inputs()
    for constraint in ("self", "supervised"):
        method = make_cmsf(constraint)
        ddp = nn.parallel.DistributedDataParallel(method, **no_buffer_sync())
        losses = run_cmsf_steps(ddp, index[half], labels[half], [v[half] for v in inputs()])
        result[constraint] = {"losses": losses, **cmsf_state(method)}
    out[rank] = result
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_cmsf():
    return spawn_two(_cmsf_worker)


@pytest.mark.parametrize("constraint", ["self", "supervised"])
def test_cmsf_bank_and_cache_equal_single_process(two_process_cmsf, constraint):
    single = make_cmsf(constraint)
    index, labels = cmsf_inputs()
    expected_losses = run_cmsf_steps(single, index, labels, inputs())
    expected = cmsf_state(single)
    for rank in (0, 1):
        got = two_process_cmsf[rank][constraint]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.allclose(got[key], value, atol=1e-12), key
            else:
                assert got[key] == value, key
    # each process's loss is its half's mean; their average is the single-process loss
    for step, loss in enumerate(expected_losses):
        mean = (two_process_cmsf[0][constraint]["losses"][step] + two_process_cmsf[1][constraint]["losses"][step]) / 2
        assert abs(mean - loss) < 1e-10


def solver_inputs():
    """Cosine logits sorted by cluster, so that the two shards hold different clusters (120 and 136 rows)."""
    from helpers import skewed_logits

    logits = skewed_logits(b=256, k=20, seed=7)
    return logits[logits.argmax(1).argsort()], 120


def _solver_worker(rank: int, port: int, out: dict):
    from kinship.blocks.assignment import mira_targets, sinkhorn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, cut = solver_inputs()
    mine = logits[:cut] if rank == 0 else logits[cut:]
    out[rank] = {"mira": mira_targets(mine, 0.225, 2 / 3), "sinkhorn": sinkhorn(mine, 0.05, 3)}
    dist.destroy_process_group()


def test_solvers_on_two_unequal_shards_equal_one_process():
    from kinship.blocks.assignment import mira_targets, sinkhorn

    got = spawn_two(_solver_worker)
    logits, cut = solver_inputs()
    for name, solve in (("mira", lambda x: mira_targets(x, 0.225, 2 / 3)), ("sinkhorn", lambda x: sinkhorn(x, 0.05, 3))):
        joined = torch.cat([got[0][name], got[1][name]])
        assert torch.allclose(joined, solve(logits), atol=1e-12), name
        per_shard = torch.cat([solve(logits[:cut]), solve(logits[cut:])])  # the wrong, per-process marginal
        assert (per_shard - solve(logits)).abs().max() > 0.1, name


def coke_steps(features: torch.Tensor, cut: slice | None = None, steps: int = 3) -> dict:
    """Three CoKe solver steps (assignment, dual step, centre update) on a stream of global batches
    of 16; with ``cut`` this process sees only those rows of each batch."""
    from kinship.blocks.assignment import OnlineCentres, constrained_assignment, dual_step

    centres = OnlineCentres(5, 6, generator=torch.Generator().manual_seed(0)).double()
    rho, labels = torch.zeros(5, dtype=torch.float64), []
    for batch in features.split(16)[:steps]:
        mine = batch if cut is None else batch[cut]
        y = constrained_assignment(mine, centres.running, rho)
        rho = dual_step(rho, y, gamma=0.6, eta=0.5)
        centres.update(mine, y)
        labels.append(y)
    return {"labels": torch.cat(labels), "rho": rho, "centres": centres.running.clone(), "counts": centres.counts.clone()}


def coke_features() -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(48, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=1
    )


def _coke_worker(rank: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out[rank] = coke_steps(coke_features(), slice(0, 7) if rank == 0 else slice(7, 16))  # unequal shards
    dist.destroy_process_group()


def test_coke_labels_duals_and_centres_on_two_processes_equal_one_process():
    got, single = spawn_two(_coke_worker), coke_steps(coke_features())
    for rank in (0, 1):
        assert torch.allclose(got[rank]["rho"], single["rho"], atol=1e-12)
        assert torch.allclose(got[rank]["centres"], single["centres"], atol=1e-12)
        assert torch.equal(got[rank]["counts"], single["counts"])
    joined = torch.cat(
        [torch.cat([got[0]["labels"][7 * s : 7 * (s + 1)], got[1]["labels"][9 * s : 9 * (s + 1)]]) for s in range(3)]
    )
    assert torch.equal(joined, single["labels"])


PROTOTYPE_METHODS = {  # tiny SwAV (queue joining in the third step) and MIRA (EMA teacher)
    "swav": {
        "name": "swav",
        "prototypes": 6,
        "dim": DIM,
        "hidden": 24,
        "queue_size": 2 * BATCH,
        "queue_start_epoch": 0,
        "freeze_prototypes_epochs": 0,
    },
    "mira": {"name": "mira", "prototypes": 6, "dim": DIM, "hidden": 24, "freeze_prototypes_epochs": 0},
}


def make_prototype_method(name: str):
    torch.manual_seed(0)
    config = build_config({"method": PROTOTYPE_METHODS[name]})
    return METHODS[name](config.method, FlatLinear(), data_handle(64, 10, 4)).double().eval()


def run_prototype_steps(model: nn.Module, method, views, steps: int = 3):
    """SGD steps, each followed by the method's after_step (MIRA's EMA). The targets' batch sums are
    global, so the losses, the DDP-averaged gradients and hence every weight, queue and teacher match
    one process fed the concatenated batch."""
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    losses = []
    for s in range(steps):
        info = StepInfo(0, s, steps, torch.Generator(), s)
        optimizer.zero_grad()
        loss, _ = model([v + 0.1 * s for v in views], Batch(torch.arange(len(views[0])), torch.empty(0), torch.empty(0)), info)
        loss.backward()
        optimizer.step()
        method.after_step(info)
        losses.append(loss.item())
    return losses


def _prototype_worker(rank: int, port: int, out: dict, name: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    method = make_prototype_method(name)
    ddp = nn.parallel.DistributedDataParallel(method, **no_buffer_sync())
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    losses = run_prototype_steps(ddp, method, [v[half] for v in inputs()])
    out[rank] = {"losses": losses, "state": {k: v.clone() for k, v in method.state_dict().items()}}
    dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(PROTOTYPE_METHODS))
def test_prototype_methods_equal_single_process(name):
    got = spawn_two(_prototype_worker, name)
    single = make_prototype_method(name)
    expected = run_prototype_steps(single, single, inputs())
    for step, loss in enumerate(expected):  # SwAV: the step with the queue in Sinkhorn included
        assert abs((got[0]["losses"][step] + got[1]["losses"][step]) / 2 - loss) < 1e-10
    for rank in (0, 1):  # every process holds the whole queue and the same teacher, as the checkpoint does
        for key, value in single.state_dict().items():
            assert torch.allclose(got[rank]["state"][key].double(), value.double(), atol=1e-10), (name, key)
    assert expected[0] != expected[-1]


def _shuffle_bn_worker(rank: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    key_encoder = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(3 * 4 * 4, momentum=1.0)).double()  # running = last batch
    half = BATCH // 2
    shuffled_forward(key_encoder, inputs()[0][rank * half : (rank + 1) * half], seed=7)
    out[rank] = key_encoder[1].running_mean.clone()
    dist.destroy_process_group()


def test_moco_key_encoder_batch_norm_sees_only_its_own_shuffled_shard():
    """Under DDP, MoCo keeps per-process BN (no SyncBN): each process normalises the keys of its
    share of the shuffled global batch with that share's statistics alone."""
    running_means = spawn_two(_shuffle_bn_worker)
    everything = inputs()[0].flatten(1)
    perm = torch.randperm(BATCH, generator=torch.Generator().manual_seed(7))
    for rank in (0, 1):
        own = everything[perm[rank * BATCH // 2 : (rank + 1) * BATCH // 2]].mean(0)
        assert torch.allclose(running_means[rank], own, atol=1e-12)
        assert not torch.allclose(running_means[rank], everything.mean(0), atol=1e-3)


def test_sync_bn_applies_to_every_method_but_moco_with_shuffle_bn():
    def batch_norms(name: str, **method) -> set[type]:
        config = build_config({"method": {"name": name, **method}, "model": {"backbone": "convnet", "width": 8}})
        converted = synchronised_batch_norm(build_method(config, data_handle(64, 10, 16)), sync_bn=True)
        return {type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    assert batch_norms("mocov2") == {nn.BatchNorm2d}  # backbone and key encoder: per process
    assert batch_norms("mocov2", shuffle_bn=False) == {nn.SyncBatchNorm}
    assert batch_norms("byol") == {nn.SyncBatchNorm}
