"""SwAV and MIRA: swapped prediction, schedules, teacher, prototype freezing, queue, batch norm per view."""

import math

import torch
import torch.nn.functional as F

from kinship.assembly import build_config
from kinship.data import Batch
from kinship.losses import swapped_prediction_loss
from kinship.methods import StepInfo
from kinship.methods.mira import MIRA
from kinship.methods.swav import SwAV
from kinship.models.backbones import ConvNet

from helpers import data_handle

B = 8


def test_swapped_prediction_by_hand_for_two_crops_and_three_prototypes():
    q1 = torch.tensor([[0.7, 0.2, 0.1]])
    q2 = torch.tensor([[0.1, 0.1, 0.8]])
    s1 = torch.tensor([[0.5, -0.2, 0.1]])
    s2 = torch.tensor([[0.0, 0.3, -0.4]])
    t = 0.1

    def ce(q, s):
        p = [math.exp(v / t) for v in s[0].tolist()]
        return -sum(qk * math.log(pk / sum(p)) for qk, pk in zip(q[0].tolist(), p))

    expected = 0.5 * (ce(q1, s2) + ce(q2, s1))
    assert abs(swapped_prediction_loss([q1, q2], [s1, s2], t).item() - expected) < 1e-5


def test_with_six_local_crops_each_target_is_predicted_by_the_seven_other_crops():
    g = torch.Generator().manual_seed(0)
    targets = [torch.softmax(torch.randn(4, 5, generator=g), 1) for _ in range(2)]
    logits = [torch.randn(4, 5, generator=g) for _ in range(8)]
    ce = lambda q, s: -(q * F.log_softmax(s / 0.1, 1)).sum(1).mean()  # noqa: E731
    expected = 0.5 * sum(sum(ce(targets[g], logits[v]) for v in range(8) if v != g) / 7 for g in range(2))
    assert torch.allclose(swapped_prediction_loss(targets, logits, 0.1), expected, atol=1e-6)


def make(name, **extra):
    torch.manual_seed(0)
    values = {"name": name, "prototypes": 12, "dim": 8, "hidden": 16, **extra}
    return {"mira": MIRA, "swav": SwAV}[name](build_config({"method": values}).method, ConvNet(8), data_handle(64, 4, 16))


def views(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 16, 16, generator=g) for _ in range(n)]


def run(method, crops, batch, info):
    """A step's forward as the trainer makes it: the method's host-side decisions first."""
    method.begin_step(info)
    return method(crops, batch, info)


def batch():
    return Batch(torch.arange(B), torch.empty(0), torch.zeros(B, dtype=torch.long))


def test_mira_schedules_teacher_and_head():
    method = make("mira")
    betas = [method.begin_step(StepInfo(0, k, 100, None, 0, 10))["beta"] for k in range(0, 101, 10)]
    assert abs(betas[0] - 0.7) < 1e-12 and abs(betas[-1] - 2 / 3) < 1e-12
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    info = StepInfo(1, 5, 100, None, 0, 10)
    loss, logs = run(method, views(), batch(), info)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())  # no gradient reaches the teacher
    optimizer.step()
    method.after_step(info)
    m = 1 - (1 - 0.99) * (math.cos(math.pi * 6 / 100) + 1) / 2  # step 5's update: the momentum of step 6, as the official code
    student = list(torch.nn.Sequential(method.backbone, method.projector).parameters())
    for before, after, s in zip(teacher_before, method.teacher.parameters(), student):
        assert torch.allclose(after, m * before + (1 - m) * s, atol=1e-7)
    assert method.eval_backbone is method.teacher[0]
    assert 0 < logs["target_entropy"] <= math.log(12) + 1e-6


def test_prototypes_are_frozen_in_the_first_epoch_only():
    for name in ("mira", "swav"):
        method = make(name)
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=1e-4)
        before = method.head.weight.detach().clone()
        for epoch in (0, 1):
            optimizer.zero_grad()
            loss, _ = run(method, views(seed=epoch), batch(), StepInfo(epoch, epoch, 10, None, 0, 1))
            loss.backward()
            optimizer.step()
            if epoch == 0:
                assert torch.equal(method.head.weight, before), name
        assert not torch.equal(method.head.weight, before), name


def test_swav_queue_fills_then_joins_the_assignment():
    method = make("swav", queue_size=16, queue_start_epoch=1)
    run(method, views(), batch(), StepInfo(0, 0, 10, None, 0, 4))
    assert method.queues[0].filled.item() == 0  # before the start epoch: not filled
    for s in range(2):
        run(method, views(seed=s), batch(), StepInfo(1, s, 10, None, 0, 4))
    assert method.queues[0].filled.item() == 16 and method.queues[0].ptr.item() == 0  # B rows per step
    loss, _ = run(method, views(seed=5), batch(), StepInfo(1, 3, 10, None, 0, 4))  # now prepended to the scores
    assert torch.isfinite(loss)


def test_multi_crop_views_and_cluster_head():
    method = make("mira", local_crops=2)
    images = Batch(torch.arange(B), torch.zeros(B, 3, 32, 32, dtype=torch.uint8), torch.zeros(B))
    sizes = [v.shape[-1] for v in method.views(images, StepInfo(0, 0, 1, torch.Generator().manual_seed(0), 0, 1))]
    assert sizes == [32, 32, 16, 16]
    loss, _ = run(method, views(2) + [torch.randn(B, 3, 8, 8) for _ in range(2)], batch(), StepInfo(1, 0, 1, None, 0, 1))
    assert torch.isfinite(loss)
    assert method.cluster_scores(torch.randn(5, method.backbone.feature_dim)).shape == (5, 12)


def test_bench_reports_the_solver_share():
    from kinship.bench import bench

    result = bench(
        "swav",
        "cpu",
        "convnet",
        batch=32,
        steps=1,
        compute_only=True,
        warmup=1,
        width=8,
        overrides=["method.prototypes=30", "method.hidden=32", "method.dim=16"],
    )
    assert 0 < result["solver_frac"] < 1
    assert "solver_frac" not in bench("byol", "cpu", "convnet", batch=32, steps=1, compute_only=True, warmup=1, width=8)


def batch_norm_batches(method, *args) -> list[int]:
    """The batch sizes that the backbones' first BN layer saw (student and teacher) in one forward."""
    seen = []
    for module in method.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
    method(*args)
    return seen


def test_mira_and_byol_forward_each_view_in_its_own_batch_norm_pass_by_default():
    from kinship.methods.byol import BYOL

    def byol(**extra):
        torch.manual_seed(0)
        config = build_config(
            {"method": {"name": "byol", "projector_hidden": 16, "projector_dim": 8, "predictor_hidden": 16, **extra}}
        )
        return BYOL(config.method, ConvNet(8), data_handle(64, 4, 16))

    info = StepInfo(1, 0, 10, None, 0, 1)
    for method, shared in [(make("mira"), make("mira", per_view_bn=False)), (byol(), byol(per_view_bn=False))]:
        assert set(batch_norm_batches(method, views(), batch(), info)) == {B}
        assert set(batch_norm_batches(shared, views(), batch(), info)) == {2 * B}


def test_swav_prototypes_stay_on_the_unit_sphere_under_weight_decay():
    method = make("swav")
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, weight_decay=0.1)
    for s in range(3):
        optimizer.zero_grad()
        info = StepInfo(1, s, 10, None, 0, 1)
        run(method, views(seed=s), batch(), info)[0].backward()
        optimizer.step()
        assert not torch.allclose(method.head.weight.norm(dim=1), torch.ones(12), atol=1e-4)  # decayed by the step
        method.after_step(info)
        assert torch.allclose(method.head.weight.norm(dim=1), torch.ones(12), atol=1e-6)
