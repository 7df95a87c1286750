"""MSF and CMSF: the loss, the three constraints, the caches, the pseudo-labels and the purity metric."""

import pytest
import torch
import torch.nn.functional as F

from kinship.assembly import build_config
from kinship.blocks.cache import SampleCache
from kinship.blocks.knn import masked_topk
from kinship.blocks.queue import FifoQueue
from kinship.data import Batch
from kinship.data.subsets import corrupt_labels
from kinship.errors import ConfigError
from kinship.losses import byol_loss, mean_shift_loss
from kinship.methods import StepInfo
from kinship.methods import cmsf as cmsf_module
from kinship.methods.cmsf import CMSF
from kinship.models.backbones import ConvNet

from helpers import data_handle

B, D, BANK = 6, 16, 40


def unit(*shape, seed=0, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def test_mean_shift_identity_and_byol_case():
    v, z = unit(B, D, seed=1), unit(B, 5, D, seed=2)
    per_sample = mean_shift_loss(v, z.mean(1))
    brute = ((v.unsqueeze(1) - z) ** 2).sum(-1).mean(1)  # Eq. (1): mean squared distance to S_i
    assert torch.allclose(per_sample, brute, atol=1e-12)
    assert ((per_sample >= 0) & (per_sample <= 4)).all()
    u = unit(B, D, seed=3)
    assert torch.allclose(mean_shift_loss(v, u).mean(), byol_loss(v, u), atol=1e-12)  # k = 1 is BYOL


def test_masked_topk_selects_only_allowed_and_fewer_when_short():
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    allowed = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    index, selected = masked_topk(sims, allowed, 3)
    assert index[0, :2].tolist() == [1, 3] and selected[0].tolist() == [1, 1, 0]
    assert index[1, 0].item() == 2 and selected[1].tolist() == [1, 0, 0]
    filled, selected = masked_topk(sims, allowed, 3, fill=torch.tensor([[1.0, 1, 1, 1]]))  # the official code's fill
    assert filled[0, :2].tolist() == [1, 3] and filled[1, 0].item() == 2 and (selected == 1).all()
    assert not set(filled[1, 1:].tolist()) & {2}  # the rest from the other columns, once each


def test_queue_side_columns_and_sample_cache():
    q = FifoQueue(5, 2, init="zeros", columns=("label",))
    q.push_gathered(torch.ones(3, 2), label=torch.tensor([7, 8, 9]))
    assert q.valid().tolist() == [1, 1, 1, 0, 0] and q.column("label").tolist() == [7, 8, 9, -1, -1]
    q.push_gathered(2 * torch.ones(3, 2), label=torch.tensor([1, 2, 3]))  # wraps: the oldest slot goes first
    assert q.column("label").tolist() == [3, 8, 9, 1, 2] and q.valid().sum() == 5
    cache = SampleCache(10, 2)
    old, valid = cache.exchange(torch.tensor([4, 2]), torch.tensor([[1.0, 0], [0, 1.0]]))
    assert valid.tolist() == [0, 0]
    old, valid = cache.exchange(torch.tensor([2]), torch.tensor([[5.0, 5.0]]))
    assert valid.tolist() == [1] and old.tolist() == [[0, 1.0]]  # visit 2 reads visit 1


def make(constraint, **extra):
    torch.manual_seed(0)
    values = {"name": "cmsf", "constraint": constraint, "bank_size": BANK, "hidden": 32, "dim": D, **extra}
    config = build_config({"method": values})
    return CMSF(config.method, ConvNet(8), data_handle(200, 3, 16)).double()


def step(method, index, labels, s=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(len(index), 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    return method(views, Batch(index, torch.empty(0), labels), StepInfo(0, s, 100, g, s, 10))


def fill(method, steps=6, seed=0):
    """A few steps over random images with labels in {0, 1, 2} to fill the bank."""
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        index = torch.randperm(200, generator=g)[:B]
        step(method, index, index % 3, s, seed + s)


def spy_topk(monkeypatch):
    calls = []

    def spy(similarity, allowed, k, **fill):
        index, selected = masked_topk(similarity, allowed, k, **fill)
        calls.append((similarity, allowed, index, selected))
        return index, selected

    monkeypatch.setattr(cmsf_module, "masked_topk", spy)
    return calls


@pytest.mark.parametrize("fill_short", [True, False])
def test_supervised_constraint_takes_its_label_first_and_fills_only_when_short(monkeypatch, fill_short):
    method = make("supervised", topk=16, fill_short=fill_short)
    fill(method)  # 36 of 40 slots, labels 0, 1, 2
    calls = spy_topk(monkeypatch)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    step(method, torch.arange(100, 106), labels, 7, 99)
    ((_, _, index, selected),) = calls
    bank_labels = method.bank.column("label")[method.bank.valid() > 0]
    available = (bank_labels.unsqueeze(0) == labels.unsqueeze(1)).sum(1).clamp(max=16)
    assert available.min() < 16  # short rows exist
    same = method.bank.column("label")[index] == labels.unsqueeze(1)
    assert torch.equal(same.sum(1), available)  # every slot of the query's label is in S_i
    if fill_short:  # the official code: S_i completed to k with filled slots of other labels
        assert (selected == 1).all() and (method.bank.valid()[index] > 0).all()
    else:  # S_i within C_i
        assert ((same & (selected == 1)) | (selected == 0)).all() and torch.equal(selected.sum(1).long(), available)


def test_own_target_is_the_first_neighbour(monkeypatch):
    method = make("none")
    fill(method)
    calls = spy_topk(monkeypatch)
    index = torch.arange(150, 150 + B)
    step(method, index, index % 3, 7, 77)  # views unlike those of fill()
    similarity, _, top, _ = calls[0]
    own_slots = method.bank.column("index")[top[:, 0]]
    assert torch.equal(own_slots, index)
    assert torch.allclose(similarity.gather(1, top[:, :1]), torch.ones(B, 1, dtype=torch.float64), atol=1e-6)


def previous_embeddings(method, by_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """M' by brute force: per slot, the w (the previous visit's u) written with that slot, or, by
    image, with the latest slot of the same image (the official code's pool lookup)."""
    rows = torch.zeros_like(method.bank.rows)
    known = torch.zeros(BANK, dtype=torch.bool)
    history = method.history  # (image, w, w known) per enqueued slot, oldest first
    slot_of = [None] * BANK
    for n, entry in enumerate(history):
        slot_of[n % BANK] = n
    for slot, n in enumerate(slot_of):
        if n is None:
            continue
        image = history[n][0]
        latest = max(m for m, e in enumerate(history) if e[0] == image) if by_image else n
        rows[slot], known[slot] = history[latest][1], history[latest][2]
    return rows, known


def record_history(method, monkeypatch):
    method.history = []
    exchange = SampleCache.exchange

    def spy(cache, index, rows, *args, **kwargs):
        previous, valid = exchange(cache, index, rows, *args, **kwargs)
        if cache is method.cache:
            method.history += [(i.item(), p, v.item() > 0) for i, p, v in zip(index, previous, valid)]
        return previous, valid

    monkeypatch.setattr(SampleCache, "exchange", spy)


@pytest.mark.parametrize("lookup", ["image", "slot"])
def test_self_constraint_equals_brute_force(monkeypatch, lookup):
    method = make("self", topk_constraint=4, previous_lookup=lookup)
    record_history(method, monkeypatch)
    g = torch.Generator().manual_seed(5)
    for s in range(10):  # 60 slots through a bank of 40, from 20 images: most images hold several slots
        index = torch.randperm(20, generator=g)[:B]
        step(method, index, index % 3, s, s)
    rows, known = previous_embeddings(method, by_image=lookup == "image")
    assert not torch.equal(rows, previous_embeddings(method, by_image=lookup != "image")[0])  # the two readings differ here
    w = unit(B, D, seed=9)
    valid = method.bank.valid().unsqueeze(0)
    candidates, eligible = method.self_constraint(w, valid)
    usable = (valid[0] > 0) & known
    assert usable.sum() >= 4  # enough slots with a previous visit that +inf slots are not needed
    for i in range(B):
        dist = ((w[i] - rows) ** 2).sum(1)
        dist[~usable] = float("inf")
        assert set(candidates[i][eligible[i] > 0].tolist()) == set(dist.topk(4, largest=False).indices.tolist())


def test_self_selection_is_topk_within_the_constraint_and_msf_without_a_previous_visit():
    method = make("self", topk=2, topk_constraint=4)
    fill(method, steps=8)
    w, u = unit(B, D, seed=9), unit(B, D, seed=10)
    w_valid = torch.tensor([1.0, 1, 1, 1, 1, 0], dtype=torch.float64)
    valid = method.bank.valid().unsqueeze(0)
    similarity = u @ method.bank.rows.T
    msf = masked_topk(similarity, valid, 2)
    index, selected = method.self_selection(similarity, w, w_valid, valid, msf)
    candidates, _ = method.self_constraint(w, valid)
    for i in range(B - 1):
        expected = candidates[i][similarity[i, candidates[i]].topk(2).indices]
        assert set(index[i].tolist()) == set(expected.tolist()) and selected[i].tolist() == [1, 1]
    assert torch.equal(index[B - 1], msf[0][B - 1])


def test_self_constraint_with_large_k_prime_is_msf():
    relaxed = make("self", topk_constraint=BANK)
    plain = make("none")
    for method in (relaxed, plain):
        fill(method, steps=8)
    index = torch.arange(0, B)
    loss_relaxed, _ = step(relaxed, index, index % 3, 9, 33)
    loss_plain, _ = step(plain, index, index % 3, 9, 33)
    assert torch.allclose(loss_relaxed, loss_plain, atol=1e-10)


def test_cmsf_with_k1_is_byol_asym():
    method = make("supervised", topk=1)
    fill(method)
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    loss, _ = method(views, Batch(torch.arange(B), torch.empty(0), torch.zeros(B, dtype=torch.long)), StepInfo(0, 0, 1, g, 0, 1))
    v = F.normalize(method.predictor(method.projector(method.backbone(views[1]))), dim=1)
    u = F.normalize(method.target(views[0]), dim=1)
    assert torch.allclose(loss, byol_loss(v, u), atol=1e-10)


def test_pseudo_labels_below_threshold_are_not_used():
    method = make("semi", confidence=0.85)
    with torch.no_grad():  # a classifier whose output is its last bias, whatever u
        method.pseudo.classifier[-1].weight.zero_()
        method.pseudo.classifier[-1].bias.zero_()
    u = unit(4, D, seed=1)
    labels = torch.tensor([2, -1, -1, -1])
    chosen, confident = method.pseudo.label(u, labels)
    # uniform probabilities 1/3 < 0.85: only the labeled query is confident and keeps its label
    assert chosen.tolist() == [2, -1, -1, -1] and confident.tolist() == [1, 0, 0, 0]
    with torch.no_grad():
        method.pseudo.classifier[-1].bias.copy_(torch.tensor([2.5, 0.0, 0.0], dtype=torch.float64))
    p = torch.tensor([2.5, 0.0, 0.0], dtype=torch.float64).softmax(0)[0].item()  # about 0.86
    method.pseudo.confidence = p  # exactly at the threshold counts as confident (boundary included)
    chosen, confident = method.pseudo.label(u, labels)
    assert chosen.tolist() == [2, 0, 0, 0] and confident.tolist() == [1, 1, 1, 1]
    method.pseudo.confidence = p + 1e-9
    assert method.pseudo.label(u, labels)[0].tolist() == [2, -1, -1, -1]


def test_semi_classifier_learns_the_labeled_cache():
    method = make("semi")
    centres = unit(3, D, seed=5)
    labels = torch.arange(120) % 3
    rows = F.normalize(centres[labels] + 0.05 * unit(120, D, seed=6), dim=1)
    method.pseudo.cache.exchange(torch.arange(120), rows, labels)
    method.pseudo.fit(seed=0)
    accuracy = (method.pseudo.classifier(rows).argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.95
    assert not any(p.requires_grad for p in method.pseudo.classifier.parameters())


def test_semi_non_confident_queries_fall_back_to_msf(monkeypatch):
    method = make("semi", confidence=1.01)  # tau > 1: CMSF_semi-basic, unlabeled queries are plain MSF
    fill(method)
    calls = spy_topk(monkeypatch)
    labels = torch.tensor([1, -1, -1, -1, -1, -1])
    step(method, torch.arange(100, 106), labels, 7, 33)
    _, allowed, _, _ = calls[0]
    valid = method.bank.valid()
    assert all(torch.equal(allowed[i], valid) for i in range(1, B))
    assert torch.equal(allowed[0], (method.bank.column("label") == 1).double() * valid)


def test_bank_must_be_smaller_than_the_dataset():
    config = build_config({"method": {"name": "msf", "bank_size": 500}})
    with pytest.raises(ConfigError, match="bank_size 500 must be smaller than the 200"):
        CMSF(config.method, ConvNet(8), data_handle(200, 3, 16))


def test_label_noise_changes_exactly_the_rate_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy = corrupt_labels(labels, 0.25, 10, seed=0)
    changed = noisy != labels
    assert changed.sum().item() == 250
    assert ((noisy >= 0) & (noisy < 10)).all()
    assert torch.equal(corrupt_labels(labels, 0.25, 10, seed=0), noisy)


def test_small_crops_equal_to_the_large_crop_leave_the_loss_unchanged():
    plain = make("self").eval()
    crops = make("self", local_crops=2, local={"crop_size": 16}).eval()
    g = torch.Generator().manual_seed(4)
    target, online = [torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    batch = Batch(torch.arange(B), torch.empty(0), torch.zeros(B, dtype=torch.long))
    info = StepInfo(0, 0, 1, g, 0, 1)
    loss_plain, _ = plain([target, online], batch, info)
    loss_crops, _ = crops([target, online, online.clone(), online.clone()], batch, info)
    assert torch.allclose(loss_plain, loss_crops, atol=1e-10)
    views = crops.views(
        Batch(torch.arange(B), torch.zeros(B, 3, 32, 32, dtype=torch.uint8), torch.zeros(B)), StepInfo(0, 0, 1, g, 0, 1)
    )
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]


def test_third_augmentation_constraint_fills_the_previous_bank():
    method = make("self", constraint_view="third_aug")
    assert not hasattr(method, "cache")
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    loss, _ = method(views, Batch(torch.arange(B), torch.empty(0), torch.zeros(B, dtype=torch.long)), StepInfo(0, 0, 1, g, 0, 1))
    assert torch.isfinite(loss)
    assert method.previous_bank.column("valid")[:B].tolist() == [1] * B


def test_rank_of_the_farthest_constrained_neighbour_by_hand():
    from kinship.blocks.knn import rank_of_last

    # one query, bank similarities in order of slots; the constraint picked slots 0 and 3
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    index, selected = torch.tensor([[0, 3, 1]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert rank_of_last(similarity, index, selected, torch.ones(1, 5)).tolist() == [4.0]  # slot 3 is 4th nearest
    # an invalid slot does not count toward the rank
    assert rank_of_last(similarity, index, selected, torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])).tolist() == [3.0]


def test_coarse_labels_from_a_label_map(tmp_path):
    from kinship.assembly import load_run_data
    from kinship.data import DataError

    from helpers import tiny_run_config

    mapping = tmp_path / "coarse.json"
    mapping.write_text("[0, 0, 1, 1]")  # synthetic data has 4 classes
    config = build_config(tiny_run_config(**{"data.label_map": str(mapping)}))
    data = load_run_data(config, torch.device("cpu"), None)
    assert torch.equal(data.handle.labels, data.bank.labels // 2)  # training labels coarse, bank keeps the fine ones
    assert data.handle.num_classes == 2
    mapping.write_text("[0, 1]")
    with pytest.raises(DataError, match="expected a list of 4"):
        load_run_data(config, torch.device("cpu"), None)


def test_purity_is_measured_with_the_ground_truth_not_the_constraint_labels(monkeypatch):
    from kinship.data import DataInfo, TrainData

    truth = torch.arange(200) % 3
    noisy = corrupt_labels(truth, 0.5, 3, seed=0)
    torch.manual_seed(0)
    config = build_config(
        {
            "method": {
                "name": "cmsf",
                "constraint": "supervised",
                "topk": 10,
                "bank_size": BANK,
                "hidden": 32,
                "dim": D,
                "fill_short": False,
            }
        }
    )
    method = CMSF(config.method, ConvNet(8), TrainData(DataInfo(200, 3, 16), noisy, truth)).double()
    g = torch.Generator().manual_seed(0)
    for s in range(6):
        index = torch.randperm(200, generator=g)[:B]
        step(method, index, noisy[index], s, s)
    calls = spy_topk(monkeypatch)
    index = torch.arange(150, 150 + B)
    _, logs = step(method, index, noisy[index], 7, 7)
    ((_, _, slots, selected),) = calls
    neighbours = method.bank.column("index")[slots]
    assert (
        (method.bank.column("label")[slots] == noisy[index].unsqueeze(1)) | (selected == 0)
    ).all()  # 100% by the stored labels
    expected = ((truth[neighbours] == truth[index].unsqueeze(1)).double() * selected).sum() / selected.sum()
    assert logs["purity"].item() == pytest.approx(expected.item())
    assert expected < 0.9
