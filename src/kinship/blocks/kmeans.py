"""k-means on feature tensors, chunked so that memory stays (chunk, K), on CPU and GPU alike.

Used by the clustering evaluation and by the methods that cluster features (CLIM's centres).
``spherical=True`` clusters l2-normalised features by cosine similarity with unit centroids (the
usual choice for contrastive features); otherwise squared Euclidean distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kinship.blocks import faiss_search


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, d)
    assignments: torch.Tensor  # int64 (N,)
    inertia: float  # sum of squared distances to the assigned centroid (spherical: 2 - 2 cos)


@torch.no_grad()
def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x`` (N, d): indices (N,) and squared distances (N,)."""
    if faiss_search.available(x):
        distance, index = faiss_search.search(x, centroids, 1)
        return index[:, 0], distance[:, 0].clamp_min(0).to(x.dtype)
    c_sq = (centroids * centroids).sum(1)
    idx, dist = [], []
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        d = (xb * xb).sum(1, keepdim=True) - 2 * xb @ centroids.T + c_sq
        best = d.min(dim=1)
        idx.append(best.indices)
        dist.append(best.values.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability ~ D^2."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids = [x[first]]
    dist = assign(x, centroids[0])[1]
    for _ in range(1, k):
        total = dist.sum()
        probs = dist / total if total > 0 else torch.full_like(dist, 1.0 / n)
        pick = torch.multinomial(probs, 1, generator=generator)
        centroids.append(x[pick])
        dist = torch.minimum(dist, assign(x, x[pick])[1])
    return torch.cat(centroids)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int, spherical: bool, tol: float, chunk: int) -> KMeansResult:
    k = centroids.shape[0]
    for _ in range(iters):
        labels, dist = assign(x, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        new = sums / counts.clamp_min(1).unsqueeze(1)
        if empty.any():  # re-seed empty clusters at the points farthest from their centroid
            far = dist.topk(int(empty.sum())).indices
            new[empty] = x[far]
        if spherical:
            new = F.normalize(new, dim=1)
        shift = (new - centroids).pow(2).sum(1).max().item()
        centroids = new
        if shift <= tol:
            break
    labels, dist = assign(x, centroids, chunk)
    return KMeansResult(centroids, labels, dist.sum().item())


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 100,
    restarts: int = 1,
    seed: int = 0,
    spherical: bool = False,
    init: str = "kmeans++",
    tol: float = 1e-8,
    chunk: int = 8192,
) -> KMeansResult:
    """Lloyd's k-means from ``restarts`` seeded initialisations; the run of lowest inertia wins.

    ``init`` is ``kmeans++`` or ``random`` (k distinct rows; the choice for very large K).
    """
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k} for N={x.shape[0]}")
    x = x.float()
    if spherical:
        x = F.normalize(x, dim=1)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(restarts):
        if init == "kmeans++":
            start = _kmeans_pp(x, k, generator)
        elif init == "random":
            start = x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:k]].clone()
        else:
            raise ValueError(f"unknown k-means init '{init}' (kmeans++ or random)")
        result = _lloyd(x, start, iters, spherical, tol, chunk)
        if best is None or result.inertia < best.inertia:
            best = result
    return best
