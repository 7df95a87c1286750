"""Positives of an anchor among its kin, from a clustering and a neighbour table of the whole
training set (CLIM's centre-wise selection, Eq. 2, and the selections its Table 6 compares).

    Omega_1 = the anchor's cluster, Omega_2 = its k nearest neighbours (self excluded)
    Omega_p = {x in Omega_1 & Omega_2 : d(f(x), c) <= d(f(x_i), c)},  c = the anchor's centroid   (Eq. 2)

The table keeps P candidates per anchor: a random P of Omega_p when it has at least P, else all of
Omega_p followed by the nearest remaining neighbours in rank order (Sec. 3.2.1: "no more than 10
remain"), whatever their cluster. A training step then draws one candidate per anchor.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from kinship.sampling import Shard

Selection = Literal["centre", "knn_cluster", "knn", "cluster", "random"]  # CLIM Eq. 2, Table 6


@torch.no_grad()
def centre_wise_mask(
    features: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor, neighbours: torch.Tensor
) -> torch.Tensor:
    """(N, k) bool: neighbour j of anchor i is in Omega_p (Eq. 2): same cluster, and no farther from
    the anchor's centroid than the anchor (<=, L2). features (N, d), centroids (m, d), assignments
    (N,), neighbours (N, k) indices, nearest first."""
    centre = centroids[assignments]  # (N, d): each anchor's own centroid
    anchor_distance = (features - centre).norm(dim=1)
    neighbour_distance = (features[neighbours] - centre[:, None]).norm(dim=2)
    return (assignments[neighbours] == assignments[:, None]) & (neighbour_distance <= anchor_distance[:, None])


@torch.no_grad()
def candidates_from_neighbours(
    neighbours: torch.Tensor, keep: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """(N, count) int64: a random ``count`` of each row's kept neighbours, or all of them followed by
    the nearest neighbours not kept, in rank order. neighbours (N, k), keep (N, k) bool, k >= count."""
    n, k = neighbours.shape
    if count > k:
        raise ValueError(f"{count} candidates need at least as many neighbours, got k={k}")
    rank = torch.arange(k, device=neighbours.device, dtype=torch.float32) / k  # in [0, 1): nearest first
    draw = torch.rand(n, k, generator=generator, device=neighbours.device)
    priority = torch.where(keep, 2.0 + draw, 1.0 - rank)  # kept (random order) above the rest (by rank)
    return neighbours.gather(1, priority.topk(count, dim=1).indices)


@torch.no_grad()
def same_cluster_candidates(
    assignments: torch.Tensor, count: int, generator: torch.Generator, fallback: torch.Tensor
) -> torch.Tensor:
    """(N, count): uniform draws (with replacement) from each anchor's cluster, itself excluded; an
    anchor alone in its cluster takes the first ``count`` columns of ``fallback`` (N, >= count)."""
    n = assignments.shape[0]
    order = torch.sort(assignments, stable=True).indices  # the members of each cluster, contiguous
    sizes = torch.bincount(assignments)
    starts = sizes.cumsum(0) - sizes
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=order.device)
    own = position - starts[assignments]  # the anchor's place within its cluster
    others = (sizes[assignments] - 1).clamp_min(1)
    draw = torch.floor(torch.rand(n, count, generator=generator, device=assignments.device) * others[:, None]).long()
    draw = draw + (draw >= own[:, None]).long()  # skip the anchor itself
    picked = order[(starts[assignments][:, None] + draw).clamp_max(n - 1)]
    return torch.where((sizes[assignments] > 1)[:, None], picked, fallback[:, :count])


@torch.no_grad()
def random_candidates(n: int, count: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """(n, count): uniform draws from the other n - 1 images."""
    draw = torch.floor(torch.rand(n, count, generator=generator, device=device) * (n - 1)).long()
    return draw + (draw >= torch.arange(n, device=device)[:, None]).long()


@torch.no_grad()
def select_positives(
    selection: str,
    features: torch.Tensor,
    centroids: torch.Tensor,
    assignments: torch.Tensor,
    neighbours: torch.Tensor,
    count: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate table (N, count) int64 of ``selection`` and the number of neighbours each anchor
    kept (N,) (the size of Omega_p for ``centre``; k for ``knn``; 0 for the draws without neighbours).

    - centre: Eq. 2;  knn_cluster: the neighbours in the anchor's cluster (Eq. 2 without the centre
      condition);  knn: any of the k nearest;  cluster: any member of the anchor's cluster;
      random: any other image."""
    if selection in ("centre", "knn_cluster", "knn"):
        if selection == "centre":
            keep = centre_wise_mask(features, centroids, assignments, neighbours)
        elif selection == "knn_cluster":
            keep = assignments[neighbours] == assignments[:, None]
        else:
            keep = torch.ones_like(neighbours, dtype=torch.bool)
        return candidates_from_neighbours(neighbours, keep, count, generator), keep.sum(1)
    none = torch.zeros(len(assignments), dtype=torch.long, device=assignments.device)
    if selection == "cluster":
        return same_cluster_candidates(assignments, count, generator, neighbours), none
    if selection == "random":
        return random_candidates(len(assignments), count, generator, assignments.device), none
    raise ValueError(f"unknown selection '{selection}' (one of {', '.join(get_args(Selection))})")


def pair_purity(candidates: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of (anchor, candidate) pairs of one true class, over the pairs whose labels are known
    (labels (N,), -1 unknown); nan without any."""
    anchor = labels[:, None].expand_as(candidates)
    other = labels[candidates]
    known = (anchor >= 0) & (other >= 0)
    return ((anchor == other) & known).sum().item() / known.sum().item() if known.any() else float("nan")


def class_members(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(C, M) int64: row c lists the positions i with labels[i] == c, in order, padded with -1
    (M = the largest class)."""
    counts = torch.bincount(labels, minlength=classes)
    table = torch.full((classes, max(int(counts.max()) if len(labels) else 0, 1)), -1, dtype=torch.long, device=labels.device)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    table[labels[order], slot] = order
    return table


@torch.no_grad()
def sample_members(
    members: torch.Tensor, classes: torch.Tensor, count: int, generator: torch.Generator, shard: Shard
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` members of each query's class (SsCL's labeled positives): distinct when the class
    has at least ``count``, else all of them and then repeats drawn uniformly. members (C, M) from
    :func:`class_members`; classes (B,) this shard's queries' classes (-1: none). Draws are made for
    the global batch (``shard.total`` rows). Returns (B, count) positions and a (B, count) bool that is
    False where the class has no member (or the query no class)."""
    device = members.device
    total, width = shard.total, members.shape[1]
    order_draw = shard.rows(torch.rand(total, width, generator=generator, device=device))
    repeat_draw = shard.rows(torch.rand(total, count, generator=generator, device=device))
    rows = members[classes.clamp_min(0)]  # (B, M)
    present = rows >= 0
    n = present.sum(dim=1, keepdim=True)  # (B, 1)
    slots = torch.topk(torch.where(present, order_draw, 2.0), min(count, width), dim=1, largest=False).indices
    if count > width:
        slots = torch.cat([slots, slots[:, :1].expand(-1, count - width)], dim=1)
    repeats = slots.gather(1, torch.floor(repeat_draw * n.clamp_min(1)).long().clamp(max=min(count, width) - 1))
    slot = torch.where(torch.arange(count, device=device) < n, slots, repeats)
    valid = (n > 0).expand(-1, count) & (classes >= 0).unsqueeze(1)
    return rows.gather(1, slot).clamp_min(0), valid
