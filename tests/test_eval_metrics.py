"""Evaluation maths with known answers: clustering ACC/NMI/ARI, k-means, k-NN votes, purity, linear probe."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from kinship.blocks.kmeans import kmeans
from kinship.blocks.knn import knn_accuracy, weighted_knn_scores
from kinship.eval.linear import Standardizer, linear_probe
from kinship.eval.metrics import class_cosines, clustering_accuracy, clustering_scores, neighbour_purity


def test_permuted_perfect_clustering_scores_one():
    y = np.repeat(np.arange(5), 7)
    relabel = np.array([3, 0, 4, 1, 2])
    scores = clustering_scores(y, relabel[y])
    assert scores == pytest.approx({"acc": 100.0, "nmi": 100.0, "ari": 100.0})


@pytest.mark.parametrize(
    "y, p, acc, nmi, ari",
    [
        ([0, 0, 1, 1], [0, 0, 0, 1], 75.0, 34.37, 0.0),  # by hand
        ([0, 0, 0, 1, 1, 1, 2, 2, 2], [1, 1, 0, 2, 2, 2, 0, 0, 0], 88.89, 78.60, 64.29),
    ],
)
def test_known_clustering_values(y, p, acc, nmi, ari):
    s = clustering_scores(y, p)
    assert s["acc"] == pytest.approx(acc, abs=0.01)
    assert s["nmi"] == pytest.approx(nmi, abs=0.01)
    assert s["ari"] == pytest.approx(ari, abs=0.01)
    assert s["nmi"] == pytest.approx(100 * normalized_mutual_info_score(y, p))
    assert s["ari"] == pytest.approx(100 * adjusted_rand_score(y, p))


def test_acc_of_a_known_confusion_matrix_is_hungarian_not_greedy():
    # contingency M[cluster, class]: greedy row by row (0->0, 1->1, 2->2) gets 50 + 30 + 25 = 105;
    # the best one-to-one map is 0->1, 1->0, 2->2: 40 + 45 + 25 = 110 of 205 images
    m = np.array([[50, 40, 0], [45, 30, 5], [0, 10, 25]])
    preds, labels = [], []
    for cluster in range(3):
        for cls in range(3):
            preds += [cluster] * m[cluster, cls]
            labels += [cls] * m[cluster, cls]
    assert clustering_accuracy(labels, preds) == pytest.approx(110 / 205)


def test_acc_with_more_clusters_than_classes_matches_one_to_one():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0, 0, 1, 1, 2, 2, 2, 2]  # class 0 split in two clusters: only one of them can count
    assert clustering_accuracy(y, p) == pytest.approx(6 / 8)


def test_kmeans_recovers_separated_clusters_and_restarts_keep_the_best():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 8, generator=g) * 10
    labels = torch.arange(600) % 6
    x = centres[labels] + 0.1 * torch.randn(600, 8, generator=g)
    fit = kmeans(x, 6, restarts=3, seed=1)
    assert clustering_accuracy(labels, fit.assignments) == 1.0
    # the first restart is the single run of the same seed; the best of three is no worse
    assert fit.inertia <= kmeans(x, 6, restarts=1, seed=1).inertia + 1e-6
    # centroids are the means of their members
    for c in range(6):
        assert torch.allclose(fit.centroids[c], x[fit.assignments == c].mean(0), atol=1e-4)


def test_spherical_kmeans_has_unit_centroids():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    fit = kmeans(x, 4, spherical=True, init="random")
    assert torch.allclose(fit.centroids.norm(dim=1), torch.ones(4), atol=1e-5)


def test_majority_vote_knn():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # 1-NN: the label of the nearest item, whatever the rest
    assert knn_accuracy(bank, labels, query, torch.tensor([0]), k=1, temperature=None)[1] == 100.0
    # 5-NN majority: three votes for class 1 beat two closer votes for class 0
    scores = weighted_knn_scores(query, bank, labels, 2, k=5, temperature=None)
    assert scores.argmax().item() == 1
    assert scores[0].round().tolist() == [2.0, 3.0]
    # a 2-2 tie goes to the class with the larger summed similarity (class 0 here)
    tie = weighted_knn_scores(query, bank[:4], labels[:4], 2, k=4, temperature=None)
    assert tie.argmax().item() == 0


def test_neighbour_purity_by_hand():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.8, 0.2], [0.0, 1.0]]), dim=1)
    bank_labels = torch.tensor([0, 1, 0, 1])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # query 0 neighbours: 0 (same), 1 (other), 2 (same), 3; query 1: 3 (same), 2, 1 (same), 0
    purity = neighbour_purity(queries, torch.tensor([0, 1]), bank, bank_labels, ks=(1, 2, 3))
    assert purity[1] == pytest.approx(100.0)
    assert purity[2] == pytest.approx(50.0)  # (1/2 + 1/2) / 2
    assert purity[3] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)


def test_class_cosines_match_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    got = class_cosines(x, y)
    u = F.normalize(x.double(), dim=1)
    sims = u @ u.T
    off = ~torch.eye(30, dtype=torch.bool)
    same = (y.view(-1, 1) == y.view(1, -1)) & off
    diff = y.view(-1, 1) != y.view(1, -1)
    assert got["intra_class_cosine"] == pytest.approx(sims[same].mean().item(), abs=1e-9)
    assert got["inter_class_cosine"] == pytest.approx(sims[diff].mean().item(), abs=1e-9)


def test_linear_probe_separates_linearly_separable_data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 16, generator=g)
    x = torch.randn(6000, 16, generator=g)
    logits = x @ w.T
    top2 = logits.topk(2, dim=1).values
    x = x[top2[:, 0] - top2[:, 1] > 0.5][:3000]  # classes by a linear rule, with a margin
    y = (x @ w.T).argmax(1)
    result, head, standardize = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], 5)
    assert result["top1"] >= 99.0, result
    assert result["l2"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    assert set(result["val_top1"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01"}


def test_standardizer_uses_train_statistics_only():
    train = torch.randn(100, 4) * 3 + 1
    s = Standardizer.fit(train)
    z = s(train)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(4), atol=1e-4)
    test = torch.randn(10, 4)
    assert torch.allclose(s(test), (F.normalize(test, dim=1) - s.mean) / s.std)
    assert not math.isnan(s(test).sum().item())
