"""CLIM: the centre-wise positives of Eq. 2, CutMix / mixup (Eq. 3), the mixed InfoNCE (Eq. 4), the
multi-resolution loss (Eq. 6) and the method around them (refresh schedule, MoCo v2 as a special case)."""

import json

import pytest
import torch
import torch.nn.functional as F

from kinship.assembly import build_config, build_method
from kinship.augment.mixing import box_masks, cutmix, cutmix_boxes, mix
from kinship.blocks.knn import nearest_neighbours
from kinship.blocks.positives import centre_wise_mask, random_candidates, same_cluster_candidates, select_positives
from kinship.data import BatchPlan, ImageSet, TensorLoader, TrainData
from kinship.errors import ConfigError
from kinship.losses import info_nce_with_queue, mixed_info_nce
from kinship.methods import StepInfo
from kinship.sampling import Shard
from kinship.train.trainer import Trainer

from helpers import tiny_run_config


def G(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- Eq. 2 ------------------------------------------------------------------------------------------
def test_centre_wise_selection_known_answer():
    """1-D features [0, 1, 2, 5, 6, 7], centroids {1, 6}, k = P = 3."""
    v = torch.tensor([[0.0], [1.0], [2.0], [5.0], [6.0], [7.0]], dtype=torch.float64)
    centroids = torch.tensor([[1.0], [6.0]], dtype=torch.float64)
    assignments = torch.tensor([0, 0, 0, 1, 1, 1])
    neighbours = nearest_neighbours(v, 3)
    assert neighbours[2].tolist() == [1, 0, 3]  # distances 1, 2, 3
    assert neighbours[4].tolist() == [3, 5, 2]  # the tie 5 / 7 goes to the lower index
    keep = centre_wise_mask(v, centroids, assignments, neighbours)

    def kept(i):
        return {int(j) for j, k in zip(neighbours[i], keep[i]) if k}

    assert kept(2) == {1, 0} and kept(3) == {4, 5} and kept(4) == set()
    table, count = select_positives("centre", v, centroids, assignments, neighbours, 3, G())
    assert count[[2, 3, 4]].tolist() == [2, 2, 0]
    assert set(table[2, :2].tolist()) == {0, 1} and table[2, 2] == 3  # padded with the nearest remaining neighbour
    assert table[4].tolist() == [3, 5, 2]  # none kept: its 3 nearest neighbours, in rank order


def brute_force_omega(v, centroids, assignments, k, i):
    distance = (v - v[i]).norm(dim=1)
    distance[i] = float("inf")
    knn = sorted(range(len(v)), key=lambda j: (distance[j].item(), j))[:k]
    c = centroids[assignments[i]]
    return {j for j in knn if assignments[j] == assignments[i] and (v[j] - c).norm() <= (v[i] - c).norm()}, knn


def test_centre_wise_selection_equals_a_brute_force_reading_of_eq2():
    v = F.normalize(torch.randn(200, 8, generator=G(1), dtype=torch.float64), dim=1)
    centroids = F.normalize(torch.randn(5, 8, generator=G(2), dtype=torch.float64), dim=1)
    assignments = (v @ centroids.T).argmax(1)
    neighbours = nearest_neighbours(v, 10, chunk=37)
    table, count = select_positives("centre", v, centroids, assignments, neighbours, 4, G(3))
    assert table.shape == (200, 4) and table.dtype == torch.long
    for i in range(200):
        omega, knn = brute_force_omega(v, centroids, assignments, 10, i)
        assert neighbours[i].tolist() == knn
        assert {
            int(j) for j, kept in zip(neighbours[i], centre_wise_mask(v, centroids, assignments, neighbours)[i]) if kept
        } == omega
        row = table[i].tolist()
        assert i not in row and len(set(row)) == 4 and count[i] == len(omega)
        if len(omega) >= 4:
            assert set(row) <= omega
        else:
            assert set(row[: len(omega)]) == omega and row[len(omega) :] == [j for j in knn if j not in omega][: 4 - len(omega)]
    # invariances of unit features: centroid scale, a common rotation
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=G(4), dtype=torch.float64))
    assert torch.equal(
        centre_wise_mask(v, centroids, assignments, neighbours), centre_wise_mask(v @ q, centroids @ q, assignments, neighbours)
    )


def test_neighbours_exclude_self_by_index_and_ignore_chunking():
    v = torch.randn(50, 4, generator=G(5))
    v[7] = v[3]  # a duplicate: each is the other's nearest neighbour, neither its own
    table = nearest_neighbours(v, 5, chunk=1024)
    assert torch.equal(table, nearest_neighbours(v, 5, chunk=3))
    assert table[3, 0] == 7 and table[7, 0] == 3
    assert not (table == torch.arange(50)[:, None]).any()


def test_cluster_and_random_selections_never_pick_the_anchor():
    assignments = torch.randint(0, 6, (300,), generator=G(6))
    assignments[0] = 6  # alone in its cluster: the fallback row
    fallback = torch.arange(300).roll(-1)[:, None].repeat(1, 4)
    table = same_cluster_candidates(assignments, 4, G(7), fallback)
    assert (assignments[table[1:]] == assignments[1:, None]).all() and not (table == torch.arange(300)[:, None]).any()
    assert table[0].tolist() == [1, 1, 1, 1]
    table = random_candidates(300, 10, G(8), "cpu")
    assert not (table == torch.arange(300)[:, None]).any() and table.min() >= 0 and table.max() < 300


# -- Eq. 3 ------------------------------------------------------------------------------------------
def test_cutmix_one_box_per_sample_pixels_exact_and_area_weight():
    anchor, positive = torch.rand(256, 3, 32, 32, generator=G(9)), torch.rand(256, 3, 32, 32, generator=G(10)) + 2
    boxes = cutmix_boxes(Shard.whole(256), 32, 32, 2.0, G(11), "cpu")
    mixed, lam = cutmix(anchor, positive, boxes)
    inside = box_masks(boxes, 32, 32).expand_as(anchor)
    assert torch.equal(mixed[inside], positive[inside]) and torch.equal(mixed[~inside], anchor[~inside])
    mask = inside[:, 0]
    assert torch.equal(lam.double(), 1 - mask.double().mean(dim=(1, 2)))
    for m in mask[:32]:  # the pasted region is one rectangle: its bounding box is full
        rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        if len(rows):
            assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all() and m.sum() == len(rows) * len(cols)
    assert len({tuple(b) for b in boxes.tolist()}) > 100  # one box per sample, not one per batch
    _, lam = cutmix(anchor[:1], positive[:1], torch.tensor([[8, 24, 8, 24]]))
    assert lam.item() == 0.75  # a 16 x 16 box on 32 x 32


def test_mixing_draws_for_the_global_batch():
    a, p = torch.rand(8, 3, 16, 16, generator=G(12)), torch.rand(8, 3, 16, 16, generator=G(13))
    for mode, alpha in (("cutmix", 2.0), ("mixup", 0.2)):
        whole, lam = mix(a, p, mode, alpha, G(14))
        part, lam_part = mix(a[4:], p[4:], mode, alpha, G(14), Shard(4, 4, 8))
        assert torch.equal(whole[4:], part) and torch.equal(lam[4:], lam_part)
    mixed, lam = mix(a, p, "mixup", 0.2, G(15))
    assert torch.allclose(mixed, lam.view(-1, 1, 1, 1) * a + (1 - lam.view(-1, 1, 1, 1)) * p)


# -- Eq. 1, 4 ---------------------------------------------------------------------------------------
def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=G(seed), dtype=torch.float64), dim=-1)


def test_mixed_infonce_is_affine_in_lambda_and_reduces_to_infonce():
    q, kx, ky, queue = unit(6, 8, seed=1), unit(6, 8, seed=2), unit(6, 8, seed=3), unit(20, 8, seed=4)
    per_sample = info_nce_with_queue(q, kx, queue, 0.2, "none")
    logits = torch.cat([(q * kx).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
    assert torch.allclose(per_sample, -F.log_softmax(logits, 1)[:, 0], atol=1e-12)

    def at(lam):
        return mixed_info_nce(q, kx, ky, queue, torch.full((6,), lam, dtype=torch.float64), 0.2)

    assert torch.allclose(at(0.3), 0.3 * at(1.0) + 0.7 * at(0.0), atol=1e-12)
    assert torch.allclose(at(1.0), per_sample, atol=1e-12)
    assert torch.allclose(mixed_info_nce(q, kx, kx, queue, torch.rand(6, dtype=torch.float64), 0.2), per_sample, atol=1e-12)


# -- the method -------------------------------------------------------------------------------------
FIXED = {"crop_size": 16, "crop_scale": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0}


def built(method: dict, n: int = 128, seed: int = 0):
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=G(20))
    data = ImageSet(images, torch.arange(n) % 4, ["a", "b", "c", "d"])
    config = build_config(tiny_run_config(**{"method": method, "model.norm": "none", "train.batch_size": 32}))
    torch.manual_seed(seed)
    return build_method(config, TrainData.of(data)), data


def step_loss(model, data):
    batch = next(TensorLoader(data, BatchPlan(len(data), 32, seed=0)).epoch(0))
    info = StepInfo(1, 4, 8, G(21), 4, 4)
    with torch.no_grad():
        views = model.views(batch, info)
        return model(views, batch, info)[0], views


def test_without_mixing_a_positive_equal_to_the_anchor_gives_moco_v2s_loss():
    """Fixed views (the whole image, no jitter): the positive's key equals the anchor's, and CLIM's
    loss (the plain and the kin term averaged) is MoCo v2's with the same weights and queue."""
    method = {
        "name": "clim",
        "queue_size": 64,
        "augment": FIXED,
        "mixing": "none",
        "clusters": 4,
        "neighbours": 4,
        "positives": 2,
        "refresh_start": 1,
    }
    moco, data = built({"name": "mocov2", "queue_size": 64, "augment": FIXED})
    expected = step_loss(moco, data)[0].item()
    clim, _ = built(method)
    clim.use_candidates(torch.arange(128)[:, None].repeat(1, 2))  # every positive is the anchor itself
    ours, views = step_loss(clim, data)
    assert len(views) == 3 and torch.equal(views[1], views[2])
    assert ours.item() == pytest.approx(expected, rel=1e-6)
    before, views = step_loss(built(method)[0], data)  # no table yet: MoCo v2's views and loss
    assert len(views) == 2 and before.item() == pytest.approx(expected, rel=1e-6)


def test_multi_resolution_views_and_loss():
    clim, data = built(
        {
            "name": "clim",
            "queue_size": 64,
            "augment": {"crop_size": 16},
            "resolutions": [16, 12],
            "clusters": 4,
            "neighbours": 4,
            "positives": 2,
            "refresh_start": 1,
        }
    )
    clim.use_candidates(torch.randint(0, 128, (128, 2), generator=G(22)))
    loss, views = step_loss(clim, data)
    assert [v.shape[-1] for v in views[:-1]] == [16, 12] * 4 and views[-1].shape == (32,)
    assert torch.allclose(views[1], F.interpolate(views[0], size=(12, 12), mode="bilinear", antialias=True, align_corners=False))
    assert torch.isfinite(loss) and 0 < views[-1].min() and views[-1].max() <= 1
    assert clim.queue.ptr == 32  # the anchor keys of one resolution enqueued


def test_plain_weight_zero_is_eq6_alone():
    clim, data = built(
        {
            "name": "clim",
            "queue_size": 64,
            "augment": {"crop_size": 16},
            "plain_weight": 0.0,
            "clusters": 4,
            "neighbours": 4,
            "positives": 2,
            "refresh_start": 1,
        }
    )
    clim.use_candidates(torch.randint(0, 128, (128, 2), generator=G(23)))
    batch = next(TensorLoader(data, BatchPlan(len(data), 32, seed=0)).epoch(0))
    info = StepInfo(1, 4, 8, G(21), 4, 4)
    with torch.no_grad():
        loss, logs = clim(clim.views(batch, info), batch, info)
    assert loss.item() == logs["loss_kin"].item()


def test_refresh_schedule_purity_metrics_and_no_extra_refresh_on_resume(tmp_path):
    values = tiny_run_config(
        **{
            "method": {
                "name": "clim",
                "queue_size": 128,
                "augment": {"crop_size": 16},
                "clusters": 8,
                "neighbours": 6,
                "positives": 3,
                "refresh_start": 1,
                "refresh_every": 2,
            },
            "train.epochs": 4,
            "eval.baselines": False,
            "eval.knn_every": 100,
        }
    )
    Trainer(build_config({**values, "train": {**values["train"], "stop_after_steps": 6}}), tmp_path, log=lambda *_: None).fit()
    Trainer(build_config(values), tmp_path, resume=True, log=lambda *_: None).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    refreshes = [r for r in rows if r.get("refresh") == "positives"]
    assert [r["step"] for r in refreshes] == [4, 12]  # epochs 1 and 3 (of 0..3), once each across the resume
    for r in refreshes:
        assert {"purity_selected", "purity_knn", "purity_random", "kept_mean", "kept_at_least_p"} <= set(r)
        assert 0 <= r["purity_random"] <= 1 and r["kept_mean"] <= 6
    assert [r["step"] for r in rows if "loss_kin" in r] and min(r["step"] for r in rows if "loss_kin" in r) > 4


@pytest.mark.parametrize(
    "bad",
    [
        {"selection": "nearest"},
        {"mixing": "cut"},
        {"resolutions": [24]},
        {"resolutions": [12]},
        {"positives": 50},
        {"refresh_start": 2},
        {"symmetric": True},
    ],
)
def test_config_errors_name_the_key(bad):
    values = tiny_run_config(method={"name": "clim", "augment": {"crop_size": 16}, **bad})
    with pytest.raises(ConfigError, match="method"):
        build_config(values)
