"""CoKe (Qian et al. 2022): moving-average labels, the scan epoch, decoupled labels and centres, the
two-view target, per-epoch metrics, the evaluated head and CIFAR-100-20's labels."""

import json

import pytest
import torch
import torch.nn.functional as F

from kinship import checkpoint
from kinship.assembly import build_config, build_method, load_run_data
from kinship.blocks.assignment import OnlineCentres, slot_targets, update_label_slots
from kinship.data import Batch, DataInfo, ImageSet, TrainData
from kinship.data.store import synthetic
from kinship.data.subsets import CIFAR100_SUPERCLASS
from kinship.errors import ConfigError
from kinship.losses import soft_cross_entropy
from kinship.methods import StepInfo
from kinship.train.trainer import Trainer

from helpers import tiny_run_config

COKE = {
    "name": "coke",
    "clusters": [4, 6],
    "gamma": 0.9,
    "eta": 0.5,
    "hidden": 32,
    "dim": 16,
    "view1": {"crop_size": 16},
    "view2": {"crop_size": 16},
}


def coke_values(**overrides):
    """CoKe on 251 synthetic images, batch 48: 5 steps per epoch and a tail of 11 images the batches leave out."""
    return tiny_run_config(
        **{
            "method": dict(COKE),
            "data.train_limit": 251,
            "train.batch_size": 48,
            "eval.baselines": False,
            "eval.knn_every": 100,
            **overrides,
        }
    )


def averaged(labels, slots=5):
    s, w = torch.full((1, slots), -1), torch.zeros(1, slots)
    for e, y in enumerate(labels):
        update_label_slots(s, w, torch.tensor([y]), 1.0 / (e + 1))
    return s, w


def test_moving_average_labels_known_weights_and_smoothing():
    s, w = averaged([3, 3, 5, 3])
    weights = {int(c): float(v) for c, v in zip(s[0], w[0]) if v > 0}
    assert weights == pytest.approx({3: 0.75, 5: 0.25}, abs=1e-6)
    target = slot_targets(s, w, 8, temperature=0.5)[0]
    assert target[3].item() == pytest.approx(0.7311, abs=1e-4) and target[5].item() == pytest.approx(0.2689, abs=1e-4)
    assert target.sum().item() == pytest.approx(1.0) and (target[[0, 1, 2, 4, 6, 7]] == 0).all()
    s, w = averaged([0, 1, 2, 3, 4, 5, 6, 0], slots=3)  # more distinct labels than slots: only L stay
    assert (w > 0).sum() == 3 and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    s, w = averaged([2, 7], slots=1)  # one slot: the latest hard label
    assert s.tolist() == [[7]] and slot_targets(s, w, 8, 0.5)[0, 7] == 1


def test_centres_moving_average_at_the_epoch_end():
    centres = OnlineCentres(3, 4, generator=torch.Generator().manual_seed(0))
    before = centres.previous.clone()
    x = F.normalize(torch.randn(30, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    centres.update(x, torch.arange(30) % 3)
    running = centres.running.clone()
    centres.end_epoch(0.25)
    assert torch.allclose(centres.previous, F.normalize(0.75 * before + 0.25 * running, dim=1), atol=1e-6)
    assert torch.equal(centres.running, centres.previous)


def test_scan_epoch_labels_every_image_changes_no_parameter_and_reports_cluster_sizes(tmp_path):
    values = coke_values(**{"train.stop_after_epochs": 1})
    Trainer(build_config(values), tmp_path, log=lambda *_: None).fit()
    torch.manual_seed(build_config(values).train.seed)
    initial = build_method(build_config(values), TrainData.describe(DataInfo(251, 4, 16)))
    state = checkpoint.load(tmp_path / "last.pt")
    for key, value in initial.named_parameters():
        assert torch.equal(value, state["method"][key]), key
    assert state["optimizer"]["state"] == {}
    for j, k in enumerate([4, 6]):
        labels = state["method"][f"heads.{j}.labels"]
        assert (labels >= 0).all() and (labels < k).all()  # the 11 tail images too
        assert torch.equal(state["method"][f"heads.{j}.centres.previous"], state["method"][f"heads.{j}.centres.running"])
        assert not torch.equal(state["method"][f"heads.{j}.centres.previous"], initial.heads[j].centres.previous)
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "clusters" in line][0]
    assert [c["k"] for c in record["clusters"]] == [4, 6]
    assert all(c["bound"] == pytest.approx(0.9 * 251 / c["k"]) and c["min"] <= c["max"] for c in record["clusters"])


def test_loss_uses_the_labels_of_the_previous_epoch_and_frozen_centres(monkeypatch):
    """Over a training epoch: the loss reads each image's label stored in the epoch before (bitwise),
    C_prev does not move until the epoch ends, and neither centres nor duals get a gradient."""
    config = build_config(coke_values(**{"data.train_limit": 96, "train.batch_size": 32}))
    data = synthetic(96)
    method = build_method(config, TrainData.of(data))
    used = []
    loss_of = method.head_loss
    monkeypatch.setattr(
        method,
        "head_loss",
        lambda head, centres, labels, index, *a: (
            used.append((head.k, labels.clone(), index.clone(), centres.clone())) or loss_of(head, centres, labels, index, *a)
        ),
    )
    generator = torch.Generator()

    def epoch(e: int, update: bool) -> None:
        for s in range(3):
            index = torch.arange(32 * s, 32 * (s + 1)).flip(0)
            info = StepInfo(e, 3 * e + s, 6, generator.manual_seed(s), 0, 3, update=update)
            batch = Batch(index, data.images[index], data.labels[index])
            with torch.set_grad_enabled(update):
                method.begin_step(info)
                loss, _ = method(method.views(batch, info), batch, info)
            if update:
                loss.backward()
        method.on_epoch_end(e)

    assert not any(b.requires_grad for b in method.buffers())  # centres and duals: buffers, never trained
    epoch(0, update=False)
    stored = {h.k: h.labels.clone() for h in method.heads}
    frozen = {h.k: h.centres.previous.clone() for h in method.heads}
    epoch(1, update=True)
    assert len(used) == 6
    for k, labels, index, centres in used:
        assert torch.equal(labels, stored[k][index]) and torch.equal(centres, frozen[k])
    assert any(not torch.equal(stored[h.k], h.labels) for h in method.heads)  # the epoch wrote new labels
    assert all(not torch.equal(frozen[h.k], h.centres.previous) for h in method.heads)  # C_prev moved at the epoch end


def test_two_view_target_is_a_mixture_and_its_loss_splits():
    config = build_config(coke_values(**{"method.pred_weight": 0.0}))
    method = build_method(config, TrainData.describe(DataInfo(64, 4, 16)))
    head = method.heads[0]
    g = torch.Generator().manual_seed(0)
    x = [F.normalize(torch.randn(8, 16, generator=g), dim=1).requires_grad_(True) for _ in range(2)]
    labels, index = torch.randint(4, (8,), generator=g), torch.arange(8)
    centres = head.centres.previous
    loss = method.head_loss(head, centres, labels, index, x, [])
    lam, alpha = config.method.temperature, config.method.alpha
    expected = []
    for v in range(2):
        reference = torch.softmax(x[1 - v] @ centres.T / lam, dim=1)
        target = alpha * F.one_hot(labels, 4) + (1 - alpha) * reference
        assert torch.allclose(target.sum(1), torch.ones(8), atol=1e-6)
        expected.append(
            alpha * F.cross_entropy(x[v] @ centres.T / lam, labels)
            + (1 - alpha) * soft_cross_entropy(x[v] @ centres.T, reference, lam)
        )
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-6)
    loss.backward()  # no gradient through the reference: view 1's gradient comes from its own logits only
    own = torch.autograd.grad(
        soft_cross_entropy(
            x[0] @ centres.T,
            alpha * F.one_hot(labels, 4) + (1 - alpha) * torch.softmax(x[1] @ centres.T / lam, dim=1).detach(),
            lam,
        )
        / 2,
        x[0],
    )[0]
    assert torch.allclose(x[0].grad, own, atol=1e-6)


def test_the_evaluated_head_has_as_many_clusters_as_classes():
    config = build_config(coke_values(**{"method.clusters": [6, 4, 8]}))
    method = build_method(config, TrainData.describe(DataInfo(64, 4, 16))).eval()
    assert method.evaluated_head.k == 4
    assert method.cluster_scores(torch.randn(5, method.backbone.feature_dim)).shape == (5, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method.views": 1, "method.local_crops": 2}, "local_crops"),
        ({"method.moving_average_after": 1}, "views: 1"),
        ({"method.gamma": 1.5}, "gamma"),
        ({"method.loss_labels": "next"}, "loss_labels"),
        ({"method.clusters": []}, "clusters"),
    ],
)
def test_bad_coke_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        build_config(coke_values(**change))


def test_cifar100_superclasses_for_train_and_test(monkeypatch):
    assert sorted(torch.bincount(torch.tensor(CIFAR100_SUPERCLASS)).tolist()) == [5] * 20  # 5 classes each
    fine = torch.arange(200) % 100
    monkeypatch.setattr(
        "kinship.data.store.load_torchvision",
        lambda *a: ImageSet(torch.zeros(200, 3, 8, 8, dtype=torch.uint8), fine, [f"c{i}" for i in range(100)]),
    )
    config = build_config(tiny_run_config(**{"data": {"name": "cifar100", "superclasses": True}}))
    data = load_run_data(config, torch.device("cpu"), None)
    coarse = torch.tensor(CIFAR100_SUPERCLASS)[fine]
    assert torch.equal(data.handle.labels, coarse) and torch.equal(data.test.labels, coarse)
    assert data.handle.num_classes == 20 and data.test.classes[0] == "aquatic_mammals"
    with pytest.raises(ConfigError, match="superclasses"):
        build_config(tiny_run_config(**{"data.superclasses": True}))


def test_one_view_stage_two_averages_each_images_labels_over_the_epochs(tmp_path):
    """One view, stage 2 from the second training epoch: after two stage-2 epochs every image's label
    slots hold the average of its two labels (the moving-average labels of Sec. 3.4)."""
    values = coke_values(
        **{
            "method.views": 1,
            "method.moving_average_after": 1,
            "method.temperature": 0.1,
            "data.train_limit": 256,
            "train.batch_size": 64,
            "train.epochs": 3,
            "train.stop_after_epochs": 3,
        }
    )

    def fit(resume):
        return Trainer(build_config(values), tmp_path, resume=resume, log=lambda *_: None).fit()

    fit(False)
    first = checkpoint.load(tmp_path / "last.pt")["method"]["heads.0.labels"]  # after the first stage-2 epoch
    values["train"]["stop_after_epochs"] = 0
    fit(True)
    state = checkpoint.load(tmp_path / "last.pt")["method"]
    second, slots, weights = state["heads.0.labels"], state["heads.0.slots"], state["heads.0.slot_weights"]
    for i in range(256):
        held = {int(c): round(float(w), 6) for c, w in zip(slots[i], weights[i]) if w > 0}
        expected = {int(first[i]): 1.0} if first[i] == second[i] else {int(first[i]): 0.5, int(second[i]): 0.5}
        assert held == expected, i
