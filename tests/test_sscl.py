"""SsCL, FixMatch and supervised training: the losses' known values, calibration, the running mean,
positive selection, the prototype refresh, the schedule, WRN, and the methods on data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kinship.assembly import build_config, build_method
from kinship.blocks.calibration import RunningMean, calibrate, class_prototypes, similarity_distribution
from kinship.blocks.positives import class_members, sample_members
from kinship.data import BatchPlan, ImageSet, TrainData, labeled_subset
from kinship.data.loader import Batch, LabeledPlan, TensorLoader
from kinship.errors import ConfigError
from kinship.losses import margin_contrastive_loss, pseudo_label_loss
from kinship.methods import StepInfo
from kinship.methods.sscl import KeyNetwork, nearest_of_class
from kinship.models.backbones import build_backbone
from kinship.optim import learning_rate
from kinship.sampling import Shard

from helpers import semi_values, tiny_run_config

# -- Eq. 5 --------------------------------------------------------------------------------------


def eq5(s_p, s_n, alpha=None, gamma=5.0, margin=0.0, valid=None):
    s_p, s_n = torch.as_tensor(s_p, dtype=torch.float64), torch.as_tensor(s_n, dtype=torch.float64)
    alpha = torch.ones_like(s_p) if alpha is None else torch.as_tensor(alpha, dtype=torch.float64)
    return margin_contrastive_loss(s_p, s_n, alpha, gamma, margin, valid)


def test_eq5_known_values() -> None:
    """gamma 5, s_p 0.5, s_n [0, 0], alpha 1: log(1 + 2 e^-2.5) at m = 0, log(1 + 2 e^-3.75) at m = -0.25."""
    assert eq5([[0.5]], [[0.0, 0.0]]).item() == pytest.approx(0.15201, abs=5e-6)
    assert eq5([[0.5]], [[0.0, 0.0]], margin=-0.25).item() == pytest.approx(0.04596, abs=5e-6)
    assert eq5([[0.5]], [[0.0, 0.0]]).item() == pytest.approx(math.log(1 + 2 * math.exp(-2.5)), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_eq5_with_one_positive_alpha_1_margin_0_is_info_nce(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 51, (1,), generator=g))
    gamma = float(1 + 19 * torch.rand(1, generator=g))
    s_p, s_n = (
        2 * torch.rand(3, 1, generator=g, dtype=torch.float64) - 1,
        2 * torch.rand(3, k, generator=g, dtype=torch.float64) - 1,
    )
    info_nce = -F.log_softmax(gamma * torch.cat([s_p, s_n], dim=1), dim=1)[:, 0]
    torch.testing.assert_close(eq5(s_p, s_n, gamma=gamma), info_nce, rtol=1e-10, atol=1e-10)


def test_eq5_gradient_equilibrium_and_masked_padding() -> None:
    """sum_n dL/ds_n = gamma sigmoid(A) = -sum_p dL/d(alpha_p s_p), whatever the counts; a positive
    padded with -inf changes neither the loss nor any gradient."""
    g = torch.Generator().manual_seed(0)
    s_p = (2 * torch.rand(4, 3, generator=g, dtype=torch.float64) - 1).requires_grad_()
    s_n = (2 * torch.rand(4, 7, generator=g, dtype=torch.float64) - 1).requires_grad_()
    alpha = torch.rand(4, 3, generator=g, dtype=torch.float64)
    t_p = (alpha * s_p).detach().requires_grad_()
    loss = margin_contrastive_loss(t_p, s_n, torch.ones_like(t_p), 5.0, -0.25)
    loss.sum().backward()
    inner = torch.logsumexp(5 * (s_n.detach() - 0.25), 1) + torch.logsumexp(-5 * t_p.detach(), 1)
    torch.testing.assert_close(s_n.grad.sum(1), 5 * torch.sigmoid(inner), rtol=0, atol=1e-12)
    torch.testing.assert_close(s_n.grad.sum(1), -t_p.grad.sum(1), rtol=0, atol=1e-12)

    one = s_p[:, :1].detach().clone().requires_grad_()
    padded = torch.cat([one, torch.zeros(4, 3, dtype=torch.float64)], dim=1)
    valid = torch.tensor([[True, False, False, False]]).expand(4, -1)
    negatives = s_n.detach().clone().requires_grad_()
    plain = margin_contrastive_loss(one, negatives, torch.ones_like(one), 5.0, -0.25)
    (grad_one, grad_n) = torch.autograd.grad(plain.sum(), [one, negatives])
    masked = margin_contrastive_loss(padded, negatives, torch.ones_like(padded), 5.0, -0.25, valid)
    (grad_one_masked, grad_n_masked) = torch.autograd.grad(masked.sum(), [one, negatives])
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_one_masked, grad_one, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_n_masked, grad_n, rtol=0, atol=1e-12)


def test_eq5_bounds_of_eq9_and_zero_weight() -> None:
    g = torch.Generator().manual_seed(1)
    s_p, s_n = (
        2 * torch.rand(6, 4, generator=g, dtype=torch.float64) - 1,
        2 * torch.rand(6, 9, generator=g, dtype=torch.float64) - 1,
    )
    alpha = torch.rand(6, 4, generator=g, dtype=torch.float64)
    loss = eq5(s_p, s_n, alpha, gamma=10.0, margin=-0.25)
    bound = torch.clamp(10 * (s_n.amax(1) - 0.25 - (alpha * s_p).amin(1)), min=0)
    assert (bound <= loss + 1e-12).all() and (loss <= bound + math.log(9 * 4) + math.log(2) + 1e-12).all()
    s_p.requires_grad_()
    alpha[:, 0] = 0
    eq5(s_p, s_n, alpha).sum().backward()
    assert (s_p.grad[:, 0] == 0).all() and (s_p.grad[:, 1:] <= 0).all()


# -- pseudo-labels and calibration --------------------------------------------------------------


def test_pseudo_label_threshold_is_strict_and_the_mean_is_over_all_samples() -> None:
    target = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss, mask = pseudo_label_loss(logits, target, 0.6)
    assert mask.tolist() == [0.0, 1.0]  # max p^ exactly tau is masked
    assert loss.item() == pytest.approx(F.cross_entropy(logits[1:], torch.tensor([0])).item() / 2)
    doubled, _ = pseudo_label_loss(torch.cat([logits, logits]), torch.cat([target, torch.full_like(target, 0.5)]), 0.6)
    assert doubled.item() == pytest.approx(loss.item() / 2)  # masked duplicates halve it
    assert pseudo_label_loss(logits, target, 1.0)[0].item() == 0


def test_ratio_calibration_known_value_and_none_is_p_b_itself() -> None:
    p_b, p_s = torch.tensor([[0.45, 0.40, 0.15]]), torch.tensor([[0.2, 0.6, 0.2]])
    running = torch.full((3,), 1 / 3)
    torch.testing.assert_close(calibrate(p_b, p_s, running, "ratio"), torch.tensor([[0.25, 2 / 3, 1 / 12]]))
    assert calibrate(p_b, p_s, running, "none") is p_b
    torch.testing.assert_close(calibrate(p_b, p_s, p_s[0], "ratio"), p_b)  # p_s equal to its mean: unchanged
    torch.testing.assert_close(calibrate(p_b, 3 * p_s, 5 * running, "ratio"), calibrate(p_b, p_s, running, "ratio"))
    g = torch.Generator().manual_seed(0)
    many_b, many_s = torch.softmax(torch.randn(8, 1000, generator=g), 1), torch.softmax(torch.randn(8, 1000, generator=g), 1)
    for mode in ("ratio", "literal", "product"):
        out = calibrate(many_b, many_s, many_s.mean(0), mode)
        assert (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(8), atol=1e-6)
        one_hot = torch.eye(1000)[:8]
        assert torch.equal(calibrate(one_hot, many_s, many_s.mean(0), mode).argmax(1), torch.arange(8))


def test_running_mean_over_the_last_128_batches() -> None:
    v, w = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.1, 0.3])
    running = RunningMean(128, 3)
    for _ in range(128):
        running.push(v)
    torch.testing.assert_close(running.mean(), v)
    running.push(w)
    torch.testing.assert_close(running.mean(), (127 * v + w) / 128, rtol=0, atol=1e-7)
    running.reset(w)
    torch.testing.assert_close(running.mean(), w)


def test_prototypes_unit_and_order_free() -> None:
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(30, 8, generator=g), torch.arange(30) % 3
    p = class_prototypes(features, labels, 4)
    torch.testing.assert_close(p[:3].norm(dim=1), torch.ones(3))
    assert torch.equal(p[3], torch.zeros(8))  # an empty class
    perm = torch.randperm(30, generator=g)
    torch.testing.assert_close(class_prototypes(features[perm], labels[perm], 4), p)
    unit = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    torch.testing.assert_close(class_prototypes(unit.expand(5, -1), torch.zeros(5, dtype=torch.long), 1), unit)
    s = similarity_distribution(features, p, 5.0)
    torch.testing.assert_close(s.sum(1), torch.ones(30))


# -- positives --------------------------------------------------------------------------------


def test_each_query_gets_the_configured_number_of_distinct_positives_of_its_class() -> None:
    labels = torch.arange(40) % 4  # 10 per class
    labels[labels == 3] = torch.tensor([3, 3, 0, 0, 0, 0, 0, 0, 0, 0])  # class 3 keeps 2 members
    members = class_members(labels, 5)
    classes = torch.tensor([0, 1, 2, 3, 4, -1] * 4)
    rows, valid = sample_members(members, classes, 3, torch.Generator().manual_seed(0), Shard.whole(24))
    for i, c in enumerate(classes.tolist()):
        if c in (0, 1, 2):
            assert valid[i].all() and len(set(rows[i].tolist())) == 3 and (labels[rows[i]] == c).all()
        elif c == 3:  # fewer members than positives: both, then repeats
            assert valid[i].all() and set(rows[i].tolist()) == set((labels == 3).nonzero().squeeze(1).tolist())
        else:  # a class without members, or no class
            assert not valid[i].any()
    halves = [
        sample_members(members, classes[s : s + 12], 3, torch.Generator().manual_seed(0), Shard(s, 12, 24))[0] for s in (0, 12)
    ]
    assert torch.equal(torch.cat(halves), rows)


def test_omega_keeps_the_nearest_candidates_assigned_to_each_class() -> None:
    keys = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0], [0.2, 1.0], [1.0, 0.05]]), dim=1)
    prototypes = torch.eye(2)
    assigned = torch.tensor([0, 0, 0, 1, 1, 0])
    candidates = torch.tensor([False, True, True, True, True, True])
    members = torch.tensor([[0], [-1]])  # class 0 has one labeled image, class 1 none
    table = nearest_of_class(keys, prototypes, assigned, candidates, members, minimum=2)
    assert table.tolist() == [[5, 1], [3, 4]]


# -- schedule, sampling, backbone ------------------------------------------------------------


def test_fixmatch_schedule_and_steps_per_epoch() -> None:
    assert learning_rate(0, 100, 0, 0.03, 0.0, schedule="fixmatch") == pytest.approx(0.03)
    assert learning_rate(100, 100, 0, 0.03, 0.0, schedule="fixmatch") == pytest.approx(0.03 * math.cos(7 * math.pi / 16))
    one_pass = BatchPlan(100, 16, seed=3)
    fixed = BatchPlan(100, 16, seed=3, steps_per_epoch=4)  # 6 batches a pass, 4 an epoch
    assert one_pass.steps_per_epoch == 6 and fixed.steps_per_epoch == 4
    flat = [fixed.indices(e, s) for e in range(3) for s in range(4)]
    assert torch.equal(torch.cat(flat[:6]).sort().values, one_pass.permutation(0)[:96].sort().values)
    assert all(torch.equal(flat[i], one_pass.indices(0, i)) for i in range(6))
    assert all(len(set(b.tolist())) == 16 for b in flat)


def test_wide_resnet_sizes() -> None:
    wrn = build_backbone("wrn28_2")
    assert sum(p.numel() for p in wrn.parameters()) == 1_466_128 and wrn.feature_dim == 128
    assert wrn(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert build_backbone("wrn28_8").feature_dim == 512
    with pytest.raises(ValueError, match="6 n \\+ 4"):
        build_backbone("wrn27_2")


# -- the methods ------------------------------------------------------------------------------


def semi_method(data: ImageSet, **method):
    config = build_config(semi_values(**method))
    handle = TrainData.of(data, labeled_subset(data.labels, per_class=8))
    method = build_method(config, handle)
    loader = TensorLoader(data, BatchPlan(len(data), 32, seed=0), handle.labels, LabeledPlan(handle.labeled, 16, seed=0))
    return method, next(loader.epoch(0))


def synthetic_set(n: int = 96) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 4, list("abcd"))


def step_info(step: int = 0) -> StepInfo:
    return StepInfo(0, step, 10, torch.Generator().manual_seed(step), step)


def test_total_loss_is_eq3_and_supervised_only_is_l_sup() -> None:
    data = synthetic_set()
    method, batch = semi_method(data, pseudo_label_weight=0.5, contrastive_weight=2.0, threshold=0.0)
    method.refresh("prototypes", step_info())
    loss, logs = method(method.views(batch, step_info()), batch, step_info())
    assert logs["mask_rate"] == 1.0 and logs["alpha"] > 0
    assert loss.item() == pytest.approx((logs["loss_sup"] + 0.5 * logs["loss_pl"] + 2.0 * logs["loss_ctr"]).item(), abs=1e-5)
    only, batch = semi_method(data, name="fixmatch", pseudo_label_weight=0.0)
    views = only.views(batch, step_info())
    assert len(views) == 1  # the labeled batch alone
    loss, _ = only(views, batch, step_info())
    expected = F.cross_entropy(only.classifier(only.backbone(views[0])), batch.labeled.labels)
    assert loss.item() == expected.item() and only.refreshes() == []


def test_sscl_without_its_own_terms_points_to_fixmatch() -> None:
    fixmatch, supervised_only = {"calibration": "none"}, {"pseudo_label_weight": 0.0}
    for method_values in (fixmatch, supervised_only):
        method_values["contrastive_weight"] = 0.0
        with pytest.raises(ConfigError, match="method.name fixmatch"):
            build_config(semi_values(**method_values))


def test_fixmatch_step_is_l_s_plus_weighted_l_u() -> None:
    data = synthetic_set()
    method, batch = semi_method(data, name="fixmatch", pseudo_label_weight=0.5, threshold=0.0)
    views = method.views(batch, step_info())
    loss, logs = method(views, batch, step_info())
    assert logs["mask_rate"] == 1.0 and set(method.classifiers()) == {"ema", "online"}
    assert loss.item() == pytest.approx((logs["loss_sup"] + 0.5 * logs["loss_pl"]).item(), abs=1e-6)


def test_positives_are_of_the_assigned_class_and_nothing_reaches_the_key_side() -> None:
    data = synthetic_set()
    method, batch = semi_method(data, positives=3)
    metrics = method.refresh("prototypes", step_info())
    assert {"fc_accuracy", "prototype_accuracy", "assigned_accuracy"} <= set(metrics)
    labeled = method.data.labeled
    assert torch.equal(method.assigned[labeled], data.labels[labeled])  # labeled images keep their label
    torch.testing.assert_close(method.prototypes.norm(dim=1), torch.ones(4))
    classes = method.assigned[batch.index]
    rows, valid = sample_members(method.members, classes, 3, torch.Generator().manual_seed(0), batch.shard)
    assert valid.all() and torch.equal(method.labeled_classes[rows], classes.unsqueeze(1).expand(-1, 3))
    loss, _ = method(method.views(batch, step_info()), batch, step_info())
    loss.backward()
    assert all(p.grad is None for p in method.ema.parameters())
    assert not method.bank.requires_grad and not method.prototypes.requires_grad


def test_mixed_embedding_at_lambda_1_is_the_anchor_and_mixes_pixels() -> None:
    data = synthetic_set()
    method, _ = semi_method(data)
    network, index = KeyNetwork(method.ema), torch.arange(8)
    plain, _ = method.data.embed_all(network, method.config.weak, index)
    same, _ = method.data.embed_all(network, method.config.weak, index, mix=(index + 8, torch.ones(8)))
    torch.testing.assert_close(same, plain)
    other, _ = method.data.embed_all(network, method.config.weak, index + 8)
    swapped, _ = method.data.embed_all(network, method.config.weak, index, mix=(index + 8, torch.zeros(8)))
    torch.testing.assert_close(swapped, other)


def test_sscl_needs_a_labeled_stream_and_hidden_labels() -> None:
    values = semi_values()
    values["train"]["labeled_batch_size"] = 0
    with pytest.raises(ConfigError, match="labeled_batch_size"):
        build_config(values)
    config = build_config(semi_values())
    with pytest.raises(ConfigError, match="every training label is known"):
        build_method(config, TrainData.of(synthetic_set()))


def test_supervised_method_learns_labels_it_is_given() -> None:
    data = synthetic_set(64)
    config = build_config(
        tiny_run_config(
            **{"method": {"name": "supervised", "augment": {"crop_size": 16, "crop_scale": [1.0, 1.0], "flip_p": 0.0}}}
        )
    )
    method = build_method(config, TrainData.of(data))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    batch = Batch(torch.arange(64), data.images, data.labels)
    losses = []
    for step in range(30):
        loss, _ = method(method.views(batch, step_info(step)), batch, step_info(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert set(method.classifiers()) == {"online"}


def test_training_logs_both_classifiers_and_eval_reports_their_median(tmp_path) -> None:
    from kinship.eval.suite import Evaluation
    from kinship.train.trainer import Trainer

    values = semi_values()
    values["train"].update(epochs=3, batch_size=32)
    summary = Trainer(build_config(values), tmp_path, log=lambda *_: None).fit()
    assert {"classifier_ema_top1", "classifier_online_top1"} <= set(summary)
    report = Evaluation(tmp_path / "last.pt", tmp_path / "eval", progress=False, log=lambda *_: None).run_all(
        ["classifier", "curves"]
    )
    rows = {r["classifier"]: r for r in report["protocols"]["classifier"]["rows"]}
    assert rows["ema"]["logged"] == 3 and rows["ema"]["top1"] == pytest.approx(summary["classifier_ema_top1"])
    assert report["protocols"]["curves"]["classifiers"] == ["classifier_ema_top1", "classifier_online_top1"]
    assert "median of the last 20" in (tmp_path / "eval" / "report.md").read_text()


def test_an_ema_that_never_runs_forward_takes_the_online_batch_norm_statistics() -> None:
    """FixMatch and supervised-only compute no keys: their evaluated EMA copies BN buffers (FixMatch's EMA model)."""
    data = synthetic_set()
    for method_values in ({"name": "fixmatch"}, {"name": "fixmatch", "pseudo_label_weight": 0.0}):
        method, batch = semi_method(data, **method_values)
        assert not hasattr(method, "projector") and len(method.ema) == 2
        loss, _ = method(method.views(batch, step_info()), batch, step_info())
        loss.backward()
        method.after_step(step_info())
        for ema, online in zip(method.ema[0].buffers(), method.backbone.buffers()):
            assert torch.equal(ema, online)


def test_labeled_file_of_names_or_indices(tmp_path) -> None:
    from kinship.data.subsets import read_labeled_file
    from kinship.errors import DataError

    files = [tmp_path / c / f"{c}_{i}.JPEG" for c in ("n01", "n02") for i in range(3)]
    listing = tmp_path / "split.txt"
    listing.write_text("n02_1.JPEG\n# a comment\n\nn01_0.JPEG\nn02_1.JPEG\n")
    assert read_labeled_file(listing, 6, files).tolist() == [0, 4]
    listing.write_text("n03_9.JPEG\n")
    with pytest.raises(DataError, match="not in the image folder"):
        read_labeled_file(listing, 6, files)
    listing.write_text("5\n2\n")
    assert read_labeled_file(listing, 6).tolist() == [2, 5]
    with pytest.raises(DataError, match="index 5 is outside the 5 training images"):
        read_labeled_file(listing, 5)
    values = semi_values()
    values["data"].pop("labeled_per_class")
    values["data"]["labeled_file"] = str(listing)
    from kinship.assembly import load_run_data

    data = load_run_data(build_config(values), torch.device("cpu"), None)
    assert data.handle.labeled.tolist() == [2, 5] and data.handle.info.labeled == 2
