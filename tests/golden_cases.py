"""The fixed inputs of the golden-value tests, and the numbers kinship's step produces on them.

Each case builds a kinship method in float64 on a tiny ConvNet (16-d features, 16 px crops), fills
its cross-sample state (bank, queue, cache, centres, duals, labels) with seeded values, and makes
the crops and the batch of one training step. ``kinship_step`` runs that step as the trainer does
(``begin_step``, ``forward``, backward; for an EMA method an SGD step of 0.1 and ``after_step``) and
returns the recorded quantities. ``benchmarks/golden_official.py`` copies the same weights and
state into each method's official code, runs its step once and writes what it produces to
``tests/golden/official_steps.json``, which ``tests/test_golden.py`` compares with this module's
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from kinship.assembly import build_config
from kinship.data import Batch, DataInfo, TrainData
from kinship.methods import METHODS, Method, StepInfo
from kinship.models.backbones import ConvNet

SIZE, CLASSES, B, CROP, LOCAL = 24, 5, 8, 16, 8  # images, classes (CMSF-semi's code takes a top-5), batch, crop sizes
# the step a case runs: the second of epoch 1 (CoKe's first training epoch after its scan, the first
# with SwAV's and MIRA's prototypes free), 5 steps per epoch, 10 in all (MIRA's schedules read them)
EPOCH, STEPS_PER_EPOCH, TOTAL_STEPS = 1, 5, 10
STEP = EPOCH * STEPS_PER_EPOCH + 1


@dataclass
class Case:
    method: Method
    views: list[torch.Tensor]
    batch: Batch
    info: StepInfo
    grads: dict[str, str]  # label -> kinship parameter name whose gradient norm is recorded
    record: Callable[[Method], dict] = lambda method: {}  # the updated state, after forward
    target: str | None = None  # the EMA module (attribute) whose update is recorded
    warmup: list[tuple[list[torch.Tensor], Batch]] = field(default_factory=list)  # steps run before, without gradient


def checksum(t: torch.Tensor) -> float:
    """An order-sensitive summary of a tensor: sum of its entries weighted 1..2 in flat order."""
    flat = t.detach().double().flatten()
    return float((flat * torch.linspace(1, 2, len(flat), dtype=torch.float64)).sum())


def set_checksum(rows: torch.Tensor) -> float:
    """A summary of a set of rows whatever their order (SwAV's queue shifts, kinship's rotates)."""
    return checksum(rows.detach().double().flatten().sort().values)


def unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def build(
    seed: int, method: dict, labels: torch.Tensor | None = None, local_crops: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Method, list[torch.Tensor], Batch, StepInfo, torch.Generator]:
    torch.manual_seed(seed)
    config = build_config({"method": method})
    info = DataInfo(SIZE, CLASSES, CROP)
    data = TrainData(info, labels, labels) if labels is not None else TrainData.describe(info)
    model = METHODS[method["name"]](config.method, ConvNet(4), data).to(dtype).train()
    g = torch.Generator().manual_seed(seed + 1)
    views = [torch.randn(B, 3, CROP, CROP, generator=g, dtype=dtype) for _ in range(2)]
    views += [torch.randn(B, 3, LOCAL, LOCAL, generator=g, dtype=dtype) for _ in range(local_crops)]
    index = torch.randperm(SIZE, generator=g)[:B]
    batch = Batch(index, None, labels[index] if labels is not None else torch.full((B,), -1))
    step = StepInfo(EPOCH, STEP, TOTAL_STEPS, torch.Generator().manual_seed(seed + 2), seed, STEPS_PER_EPOCH)
    return model, views, batch, step, g


BACKBONE = {"conv1": "backbone.features.0.0.weight", "conv_last": "backbone.features.7.0.weight"}


def moco() -> Case:
    m, views, batch, info, g = build(10, {"name": "mocov2", "queue_size": 32, "dim": 8, "temperature": 0.2})
    m.queue.rows.copy_(unit(32, 8, g=g))
    m.queue.ptr.fill_(8)
    return Case(
        m,
        views,
        batch,
        info,
        {**BACKBONE, "head0": "head.0.weight", "head2": "head.2.weight"},
        lambda m: {"queue": checksum(m.queue.rows), "ptr": int(m.queue.ptr)},
        target="key_encoder",
    )


def byol() -> Case:
    """BYOL-asym with a constant momentum: MSF's official step with k = 1 (the MSF paper's BYOL)."""
    m, views, batch, info, _ = build(
        11,
        {
            "name": "byol",
            "projector_hidden": 32,
            "projector_dim": 4,
            "predictor_hidden": 32,
            "symmetric": False,
            "momentum_base": 0.99,
            "momentum_final": 0.99,
        },
    )
    return Case(
        m,
        views,
        batch,
        info,
        {**BACKBONE, "projector0": "projector.0.weight", "predictor3": "predictor.3.weight"},
        target="target",
    )


def fill_bank(m: Method, g: torch.Generator, labels: torch.Tensor) -> None:
    bank = m.bank
    bank.rows.copy_(unit(bank.size, bank.rows.shape[1], g=g))
    images = torch.randint(0, SIZE, (bank.size,), generator=g)  # an image may hold several slots
    bank.column("index").copy_(images)
    bank.column("label").copy_(labels[images])
    bank.filled.fill_(bank.size)
    bank.ptr.fill_(8)


MEAN_SHIFT = {
    "hidden": 32,
    "dim": 4,  # the official code's rule: 2 x and 1/4 of the 16-d features
    "bank_size": 16,
    "topk": 3,
    "momentum": 0.99,
}
MEAN_SHIFT_GRADS = {**BACKBONE, "projector0": "projector.0.weight", "predictor3": "predictor.3.weight"}


def bank_record(m: Method) -> dict:
    return {"bank": checksum(m.bank.rows), "bank_labels": m.bank.column("label").tolist()}


def mean_shift_case(seed: int, constraint: str, labels: torch.Tensor, **extra) -> Case:
    m, views, batch, info, g = build(seed, {"name": "cmsf", "constraint": constraint, **MEAN_SHIFT, **extra}, labels)
    fill_bank(m, g, labels)
    return Case(m, views, batch, info, MEAN_SHIFT_GRADS, bank_record, target="target")


def class_labels(seed: int) -> torch.Tensor:
    return torch.randint(0, CLASSES, (SIZE,), generator=torch.Generator().manual_seed(seed))


def msf() -> Case:
    return mean_shift_case(20, "none", class_labels(20))


def cmsf_self() -> Case:
    case = mean_shift_case(21, "self", class_labels(21), topk_constraint=4)
    m, g = case.method, torch.Generator().manual_seed(121)
    m.cache.rows.copy_(unit(SIZE, 4, g=g))  # every image seen twice: latest and previous visit known
    m.cache.valid.fill_(1)
    m.previous_of_image.rows.copy_(unit(SIZE, 4, g=g))
    m.previous_of_image.valid.fill_(1)
    return case


def cmsf_supervised() -> Case:
    return mean_shift_case(22, "supervised", class_labels(22))


def cmsf_supervised_short() -> Case:
    """Fewer than k slots of the query's label: the batch (all label 0) is the only label-0 content of
    the bank, the other 8 slots (label 1) hold one same row, so whichever of them fill S_i, the loss is
    the same (the official code ranks them equal)."""
    labels = torch.ones(SIZE, dtype=torch.long)
    m, views, batch, info, g = build(
        23, {"name": "cmsf", "constraint": "supervised", **MEAN_SHIFT, "topk": 11, "bank_size": 16}, labels
    )
    fill_bank(m, g, labels)
    m.bank.rows.copy_(unit(1, 4, g=g).expand(16, 4))
    batch.labels.zero_()
    return Case(m, views, batch, info, MEAN_SHIFT_GRADS, bank_record, target="target")


def cmsf_semi() -> Case:
    labels = class_labels(24)
    labels[torch.arange(SIZE) % 2 == 1] = -1  # every other image unlabeled
    case = mean_shift_case(24, "semi", labels)
    with torch.no_grad():  # a sharper classifier, so that some pseudo-labels pass tau = 0.85 and some do not
        case.method.pseudo.classifier[-1].weight.mul_(40)
    return case


COKE = {"name": "coke", "clusters": [5, 7], "dim": 8, "hidden": 16, "gamma": 0.4, "eta": 20.0}
COKE_GRADS = {
    **BACKBONE,
    "projector0": "projector.0.weight",
    "projector6": "projector.6.weight",
    "predictor3": "predictor.3.weight",
}


def coke_case(seed: int, **extra) -> Case:
    """CoKe clusters in float32 whatever the network's precision (as its official code under AMP), so
    this case runs in float32."""
    m, views, batch, info, g = build(seed, {**COKE, **extra}, dtype=torch.float32)
    for head in m.heads:
        c = head.centres
        c.previous.copy_(unit(head.k, 8, g=g))
        c.running.copy_(unit(head.k, 8, g=g))
        c.counts.copy_(torch.randint(0, 6, (head.k,), generator=g))
        c.sums.copy_(c.running * c.counts.unsqueeze(1))
        head.duals.copy_(torch.rand(head.k, generator=g))
        head.labels.copy_(torch.randint(0, head.k, (SIZE,), generator=g))

    def record(m: Method) -> dict:
        return {
            f"head{h}": {"labels": head.labels.tolist(), "duals": head.duals.tolist(), "running": checksum(head.centres.running)}
            for h, head in enumerate(m.heads)
        }

    # steps before, on other images, so that the recorded step's centres continue a running mean
    # (where Eq. 13's mean and the official per-batch renormalisation part)
    warmup = [
        (
            [torch.randn(B, 3, CROP, CROP, generator=g) for _ in range(m.config.views)],
            Batch(torch.randperm(SIZE, generator=g)[:B], None, torch.full((B,), -1)),
        )
        for _ in range(3)
    ]
    return Case(m, views[: m.config.views], batch, info, COKE_GRADS, record, warmup=warmup)


def coke_two_views() -> Case:
    return coke_case(30, temperature=0.05, alpha=0.2)


def coke_one_view() -> Case:
    return coke_case(31, views=1, temperature=0.1)


def mira() -> Case:
    m, views, batch, info, _ = build(
        40, {"name": "mira", "prototypes": 12, "dim": 8, "hidden": 32, "iterations": 30, "local_crops": 2}, local_crops=2
    )
    return Case(
        m,
        views,
        batch,
        info,
        {**BACKBONE, "projector0": "projector.0.weight", "projector6": "projector.6.weight", "prototypes": "head.weight"},
        target="teacher",
    )


def swav() -> Case:
    m, views, batch, info, g = build(
        50,
        {"name": "swav", "prototypes": 12, "dim": 8, "hidden": 32, "queue_size": 16, "queue_start_epoch": 1, "local_crops": 2},
        local_crops=2,
    )
    for queue in m.queues:
        queue.rows.copy_(unit(16, 8, g=g))
        queue.filled.fill_(16)
        queue.ptr.fill_(5)
    m.head.renormalize_()  # unit rows in float64, as after any step (they were normalised in float32)

    def record(m: Method) -> dict:
        return {f"queue{i}": set_checksum(q.rows) for i, q in enumerate(m.queues)}

    return Case(
        m,
        views,
        batch,
        info,
        {**BACKBONE, "projector0": "projector.0.weight", "projector3": "projector.3.weight", "prototypes": "head.weight"},
        record,
    )


CASES: dict[str, Callable[[], Case]] = {
    "coke_two_views": coke_two_views,
    "coke_one_view": coke_one_view,
    "msf": msf,
    "cmsf_self": cmsf_self,
    "cmsf_supervised": cmsf_supervised,
    "cmsf_supervised_short": cmsf_supervised_short,
    "cmsf_semi": cmsf_semi,
    "mira": mira,
    "swav": swav,
    "mocov2": moco,
    "byol": byol,
}


def parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def kinship_step(case: Case) -> dict:
    """Run the case's step in kinship: the loss, the recorded gradient norms and state, and for an
    EMA method the norm of the target's move after an SGD step of 0.1."""
    m = case.method
    for views, batch in case.warmup:
        with torch.no_grad():
            m.begin_step(case.info)
            m(views, batch, case.info)
    before = parameters(getattr(m, case.target)).clone() if case.target else None
    m.begin_step(case.info)
    loss, _ = m(case.views, case.batch, case.info)
    loss.backward()
    named = dict(m.named_parameters())
    out = {
        "loss": loss.item(),
        "grads": {label: named[name].grad.norm().item() for label, name in case.grads.items()},
        **case.record(m),
    }
    if case.target:
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        m.after_step(case.info)
        out["target_move"] = (parameters(getattr(m, case.target)) - before).norm().item()
    return out
