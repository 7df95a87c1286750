"""Losses, EMA, queue, k-NN and schedules against formulas and hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kinship.blocks.ema import EMATarget, ema_update
from kinship.blocks.knn import knn_accuracy, weighted_knn_scores
from kinship.blocks.queue import FifoQueue
from kinship.losses import byol_loss, info_nce_with_queue
from kinship.optim import LRSchedule, cosine_ramp, learning_rate


def test_byol_loss_known_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    # cosines 1, 0, -1 -> per-sample losses 0, 2, 4
    assert byol_loss(p, z).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_loss_is_squared_distance_of_unit_vectors():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    expected = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()
    assert byol_loss(p, z).item() == pytest.approx(expected.item(), abs=1e-6)
    assert 0.0 <= byol_loss(p, z).item() <= 4.0


def test_infonce_closed_form():
    K, T = 7, 0.2
    q = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), dim=1)
    k = F.normalize(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), dim=1)
    negatives = F.normalize(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), dim=1).repeat(K, 1)
    s_p, s_n = (q * k).sum().item(), 0.0
    expected = math.log(1 + K * math.exp((s_n - s_p) / T))
    assert info_nce_with_queue(q, k, negatives, T).item() == pytest.approx(expected, abs=1e-6)


def test_cosine_ramp_schedule():
    assert cosine_ramp(0, 100, 0.99) == 0.99
    assert cosine_ramp(100, 100, 0.99) == 1.0
    values = [cosine_ramp(k, 100, 0.99) for k in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_ema_update_formula_and_no_grad():
    online = nn.Linear(3, 2)
    target = EMATarget(online)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    target.update(0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-7)
    assert list(target.state_dict()) == [f"0.{k}" for k in online.state_dict()]  # the online net is not saved twice


def test_ema_target_keeps_its_own_batch_norm_statistics():
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = EMATarget(online)
    with torch.no_grad():
        online(torch.randn(16, 3) + 5.0)  # the online network sees other activations
        target(torch.randn(16, 3))
    own = target[0][1].running_mean.clone()
    ema_update(target[0], online, 0.9)
    assert torch.equal(target[0][1].running_mean, own) and not torch.equal(own, online[1].running_mean)


def test_multi_crop_forward_is_one_pass_per_resolution():
    from kinship.blocks.multicrop import forward_crops

    calls = []
    network = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    crops = [torch.randn(4, 3, s, s) for s in (8, 8, 4, 4, 4)]
    pool = lambda x: (calls.append(len(x)), network(nn.functional.adaptive_avg_pool2d(x, 2)))[1]  # noqa: E731
    outputs = forward_crops(pool, crops)
    assert calls == [8, 12]  # the two global crops together, then the three local ones
    for crop, out in zip(crops, outputs):
        assert torch.allclose(out, network(nn.functional.adaptive_avg_pool2d(crop, 2)), atol=1e-6)
    assert forward_crops(pool, []) == []
    one_by_one = [network(nn.functional.adaptive_avg_pool2d(crop, 2)) for crop in crops]
    calls.clear()
    # per crop: BN would see each view's own statistics (the same numbers as a pass per crop; a pass over
    # a batch of 8 may round differently from two of 4 in the BLAS kernel, so the batched outputs are not the reference)
    assert all(torch.equal(a, b) for a, b in zip(forward_crops(pool, crops, per_crop=True), one_by_one))
    assert calls == [4] * 5


def test_queue_fifo_wraps():
    q = FifoQueue(5, 2, init="zeros")
    q.push(torch.ones(3, 2))
    q.push(2 * torch.ones(3, 2))
    assert q.rows[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0]  # slots 3, 4, 0 took the second push
    assert q.ptr.item() == 1 and q.filled.item() == 5
    half = FifoQueue(5, 2, init="zeros")
    half.push(torch.ones(3, 2))
    assert half.filled.item() == 3 and half.valid().tolist() == [1, 1, 1, 0, 0]


def test_weighted_knn_hand_computation():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = weighted_knn_scores(query, bank, labels, num_classes=2, k=2, temperature=0.5)
    # two nearest: bank 0 (cos 1) and bank 1 (cos 0.8)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.5), rel=1e-6)
    assert scores[0, 1].item() == pytest.approx(math.exp(0.8 / 0.5), rel=1e-6)


def test_knn_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(5, 16) * 10
    labels = torch.arange(500) % 5
    feats = centers[labels] + torch.randn(500, 16, generator=g)
    acc = knn_accuracy(feats[:400], labels[:400], feats[400:], labels[400:], k=20, temperature=0.1)
    assert acc[1] == 100.0


def test_learning_rate_warmup_and_cosine():
    assert learning_rate(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert learning_rate(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert learning_rate(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert learning_rate(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    # a warm-up that starts above 0 (MIRA's ImageNet code: from 0.3, unscaled)
    assert learning_rate(0, 100, 10, 4.8, 0.0, start_lr=0.3) == pytest.approx(0.3 + 4.5 / 10)
    assert learning_rate(9, 100, 10, 4.8, 0.0, start_lr=0.3) == pytest.approx(4.8)


def test_lars_clipping_caps_each_layer_rate_at_the_global_rate():
    from kinship.optim import LARS

    def step(clip: bool, lr: float, grad_scale: float) -> float:
        w = nn.Parameter(torch.ones(4, dtype=torch.float64))
        w.grad = torch.full((4,), grad_scale, dtype=torch.float64)
        LARS([{"params": [w]}], lr=lr, momentum=0.0, eta=0.02, clip=clip).step()
        return (1 - w.detach().double()[0]).item()  # the step taken

    trust = 0.02 * 2 / (2 * 1e-3)  # eta ||w|| / ||g||: 20 for a tiny gradient
    assert step(False, 0.5, 1e-3) == pytest.approx(0.5 * trust * 1e-3)  # rate lr * trust
    assert step(True, 0.5, 1e-3) == pytest.approx(0.5 * 1e-3)  # rate min(trust, lr) = lr
    trust = 0.02 * 2 / (2 * 10.0)  # large gradient: trust 0.002
    assert step(False, 0.5, 10.0) == pytest.approx(0.5 * trust * 10.0)
    assert step(True, 0.5, 10.0) == pytest.approx(trust * 10.0)  # rate min(trust, lr) = trust


def test_lars_steps_every_layer_at_once_as_the_per_layer_rule():
    """Two groups (adapted weights, excluded biases), momentum, weight decay, two steps: equal to
    the rule written layer by layer, and the ops dispatched do not grow with the number of layers."""
    from kinship.dispatch import OpLog
    from kinship.optim import LARS

    def layers(n):
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(6, 5, dtype=torch.float64)) for _ in range(n)] + [
            nn.Parameter(torch.randn(6, dtype=torch.float64))
        ]

    def gradients(params, step):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)

    params, reference = layers(3), [p.detach().clone() for p in layers(3)]
    optimizer = LARS(
        [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "lars_exclude": True}],
        lr=0.3,
        momentum=0.9,
        weight_decay=1e-2,
        eta=0.02,
    )
    buffers = [None] * 4
    for step in range(2):
        gradients(params, step)
        optimizer.step()
        for i, w in enumerate(reference):
            g = params[i].grad.clone()
            if i < 3:
                g = g + 1e-2 * w
                g = g * 0.02 * w.norm() / g.norm()
            buffers[i] = g if buffers[i] is None else 0.9 * buffers[i] + g
            w -= 0.3 * buffers[i]
    for p, w in zip(params, reference):
        assert torch.allclose(p.detach(), w, atol=1e-12)
    counts = []
    for n in (3, 30):
        params = layers(n)
        gradients(params, 0)
        optimizer = LARS([{"params": params}], lr=0.3, weight_decay=1e-2)
        optimizer.step()
        with OpLog() as log:
            optimizer.step()
        counts.append(log.total)
    assert counts[0] == counts[1]


def test_split_batch_norm_normalises_each_split_alone():
    from kinship.models.backbones import SplitBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4) * torch.arange(1, 17).view(16, 1, 1, 1)
    bn = SplitBatchNorm2d(3, splits=4, momentum=1.0)
    out = bn(x)
    for s in range(4):
        reference = nn.BatchNorm2d(3, momentum=1.0)
        assert torch.allclose(out[s::4], reference(x[s::4]), atol=1e-5)  # samples s, s + 4, ...
    means = torch.stack([x[s::4].mean((0, 2, 3)) for s in range(4)]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)
    bn.eval()
    assert torch.allclose(
        bn(x), (x - bn.running_mean.view(1, 3, 1, 1)) / (bn.running_var.view(1, 3, 1, 1) + bn.eps).sqrt(), atol=1e-5
    )


def test_the_runs_learning_rate_schedule_starts_after_the_scan_steps():
    """LRSchedule: built once from the optim config; step s of the run is step s - scan of the schedule."""
    from kinship.config import OptimConfig

    config = OptimConfig(lr=0.4, lr_batch=256, warmup_epochs=1, warmup_start_lr=0.0, final_lr_ratio=0.0)
    lr_at = LRSchedule.of(config, global_batch=512, steps_per_epoch=10, start_step=10, total_steps=60)
    assert lr_at.base_lr == 0.8  # linear scaling: 0.4 at 256 is 0.8 at 512
    assert lr_at(10) == learning_rate(0, 50, 10, 0.8, 0.0) == 0.08  # the first training step: warm-up 1 / 10
    assert lr_at(19) == 0.8 and lr_at(60) == 0.0
    assert [lr_at(s) for s in range(10, 61)] == [learning_rate(k, 50, 10, 0.8, 0.0) for k in range(51)]
