"""Chunked nearest-neighbour search and the weighted k-NN classifier (Wu et al. 2018, MoCo CIFAR demo).

Features are compared by cosine similarity. Queries go through in chunks so that the (chunk, N)
similarity matrix, not (Q, N), bounds memory on CPU and GPU alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinship.blocks import faiss_search


@torch.no_grad()
def topk_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k: (Q, d) queries and (N, d) bank, both l2-normalised -> similarities and indices (Q, k)."""
    k = min(k, bank.shape[0])
    if faiss_search.available(bank):
        return faiss_search.search(queries, bank, k, metric="ip")
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        s = queries[start : start + chunk].float() @ bank.float().T
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def masked_topk(
    similarities: torch.Tensor, allowed: torch.Tensor, k: int, fill: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k most similar columns among the allowed ones, per row.

    similarities (B, M) cosine values in [-1, 1]; allowed (B, M) float 1/0 -> indices (B, k') and a
    float 1/0 ``selected`` (B, k'), k' = min(k, M): rows with fewer than k allowed columns select
    only those. ``fill`` (a 1/0 mask broadcastable to (B, M), a superset of ``allowed``): such rows
    complete their k with columns of ``fill``, all ranked equal below every allowed one (CMSF's
    official code sets their distance to 5.0, i.e. a cosine of -1.5). A float mask, not
    ``masked_fill``: boolean indexing is slow on CPU builds.
    """
    dtype = torch.promote_types(similarities.dtype, torch.float32)
    allowed = allowed.to(dtype)
    if fill is None:
        scores = similarities.to(dtype) - (1.0 - allowed) * 1e4
    else:
        fill = fill.to(dtype)
        scores = similarities.to(dtype) * allowed - 1.5 * (fill - allowed) - 1e4 * (1.0 - fill)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.indices, (top.values > -1e3).float()


@torch.no_grad()
def weighted_knn_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float | None = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, C): sum over the k nearest bank items of exp(sim / T), per class.

    ``temperature=None`` is the plain majority vote of CMSF/MSF ("NN", "20-NN"); ties between
    classes go to the larger summed similarity (a deterministic tie-break where a random one would do).
    """
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    sims, idx = topk_neighbors(queries, bank, k, chunk)
    # sims lie in [-1, 1] and k <= a few hundred, so 1e-6 * sims never outweighs one vote
    weights = 1.0 + 1e-6 * sims if temperature is None else (sims / temperature).exp()
    scores = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    scores.scatter_add_(1, bank_labels[idx], weights)
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the ``k`` highest scores, for each k."""
    order = scores.argsort(dim=1, descending=True)
    hits = order == labels.view(-1, 1)
    return {k: 100.0 * hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float | None = 0.1,
) -> dict[int, float]:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = weighted_knn_scores(test_feats, train_feats, train_labels, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)


@torch.no_grad()
def nearest_neighbours(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """(N, k) int64: each row's k nearest other rows of ``features`` (N, d) by L2 distance, nearest
    first; the row itself is excluded by index (not by distance: a data set can hold duplicates).
    Equal distances are ordered by index, so the table does not depend on the chunking. For unit
    rows the order is that of cosine similarity."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"nearest_neighbours needs 1 <= k < N, got k={k} for N={n}")
    if faiss_search.available(features):
        return _faiss_neighbours(features, k)
    x = features.float()
    squared = (x * x).sum(1)
    tables = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=x.device)
        distance = squared[rows, None] - 2 * x[rows] @ x.T + squared[None, :]
        distance[torch.arange(len(rows), device=x.device), rows] = float("inf")
        top = distance.topk(k, dim=1, largest=False)
        tables.append(_by_distance_then_index(top.values, top.indices))
    return torch.cat(tables)


def _by_distance_then_index(distance: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of ``index`` (n, k) ordered by (distance, index): sorted by index, then stably by
    distance, so that equal distances do not depend on how the search was cut."""
    by_index = index.sort(dim=1)
    return by_index.values.gather(1, distance.gather(1, by_index.indices).sort(dim=1, stable=True).indices)


def _faiss_neighbours(features: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`nearest_neighbours` by faiss: k + 1 found, the row itself dropped by index (else the
    farthest), in the torch search's order."""
    distance, index = faiss_search.search(features, features, k + 1)
    own = index == torch.arange(len(index)).unsqueeze(1)
    own[:, -1] |= ~own.any(1)  # a row whose duplicates crowd it out: drop the farthest instead
    return _by_distance_then_index(distance[~own].view(-1, k), index[~own].view(-1, k))


@torch.no_grad()
def selection_purity(
    slot_images: torch.Tensor, slots: torch.Tensor, selected: torch.Tensor, truth: torch.Tensor, query_index: torch.Tensor
) -> torch.Tensor:
    """The share of selected neighbours whose true class is their query's (CMSF Fig. 4's purity):
    ``slot_images`` (M,) the dataset index in each bank slot (-1: empty), ``slots`` (B, k) and
    ``selected`` (B, k, 1/0) a selection, ``truth`` (N,) the true labels (-1: unknown), ``query_index``
    (B,) the queries' dataset indices. Pairs with an unknown label do not count."""
    bank_index = slot_images[slots]
    neighbour_truth = torch.where(bank_index >= 0, truth[bank_index.clamp_min(0)], -1)
    query_truth = truth[query_index].unsqueeze(1)
    known = selected * ((neighbour_truth >= 0) & (query_truth >= 0)).to(selected.dtype)
    same = (neighbour_truth == query_truth).to(selected.dtype) * known
    return same.sum() / known.sum().clamp_min(1)


@torch.no_grad()
def rank_of_last(similarity: torch.Tensor, index: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) rank in the whole bank, by similarity to u_i (1 = nearest), of the farthest selected
    neighbour: how far the constraint reaches past plain top-k (CMSF Fig. 5, "m" is its median)."""
    last = (selected.sum(1, keepdim=True) - 1).clamp_min(0).long()
    threshold = similarity.gather(1, index.gather(1, last))  # (B, 1)
    return 1 + ((similarity > threshold).to(valid.dtype) * valid).sum(1)
