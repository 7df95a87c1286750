"""faiss, where installed, gives the searches the exact torch code gives: the same neighbour tables,
top-k and k-means up to float rounding (neighbours whose distances tie within 1e-5 may swap)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kinship.blocks import faiss_search
from kinship.blocks.kmeans import kmeans
from kinship.blocks.knn import nearest_neighbours, topk_neighbors

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss is not installed (pip install faiss-cpu)"
)


def both(monkeypatch, function, *args, **kwargs):
    """``function`` with faiss, then with the torch search."""
    with_faiss = function(*args, **kwargs)
    monkeypatch.setenv("KINSHIP_FAISS", "0")
    exact = function(*args, **kwargs)
    monkeypatch.delenv("KINSHIP_FAISS")
    return with_faiss, exact


def test_faiss_serves_cpu_tensors_unless_switched_off(monkeypatch):
    assert faiss_search.available(torch.zeros(2, 2))
    monkeypatch.setenv("KINSHIP_FAISS", "0")
    assert not faiss_search.available(torch.zeros(2, 2))


def test_neighbour_tables_agree_up_to_ties_and_exclude_each_row_by_index(monkeypatch):
    x = F.normalize(torch.randn(3000, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    x[1] = x[0]  # a duplicate: each is the other's nearest, neither its own
    fast, exact = both(monkeypatch, nearest_neighbours, x, 20)
    assert fast[0, 0] == 1 and fast[1, 0] == 0 and not (fast == torch.arange(3000).unsqueeze(1)).any()
    distance = lambda table: ((x.unsqueeze(1) - x[table]) ** 2).sum(-1)  # noqa: E731
    torch.testing.assert_close(distance(fast), distance(exact), atol=1e-5, rtol=0)
    differ = (fast != exact).any(1)
    assert differ.float().mean() < 0.01  # only where two distances tie within float rounding


def test_top_k_and_k_means_agree(monkeypatch):
    g = torch.Generator().manual_seed(1)
    bank, queries = F.normalize(torch.randn(5000, 32, generator=g), dim=1), F.normalize(torch.randn(300, 32, generator=g), dim=1)
    (sims_fast, idx_fast), (sims_exact, idx_exact) = both(monkeypatch, topk_neighbors, queries, bank, 10)
    torch.testing.assert_close(sims_fast, sims_exact, atol=1e-5, rtol=0)
    assert (idx_fast == idx_exact).float().mean() > 0.99
    fast, exact = both(monkeypatch, kmeans, bank, 50, iters=10, spherical=True, seed=0)
    assert (fast.assignments == exact.assignments).float().mean() > 0.999
    assert fast.inertia == pytest.approx(exact.inertia, rel=1e-5)
