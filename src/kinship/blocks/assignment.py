"""Assignment solvers: pseudo-labels from scores or logits (B, K) of a batch.

Sinkhorn and MIRA give soft labels; both exponentiate the (B, K) matrix once and then only rescale
its rows and columns, so that each iteration is two matrix-vector products (no exp/log of the matrix
inside the loop: the log-space form took 18% of a small-CNN MIRA step, this one 3%). They run in
fp32 (fp64 when given fp64) with autocast switched off, so the trainer's bf16 autocast never reaches
them (under CPU bf16 autocast MIRA's fixed point moved 1e-2 from its fp64 value, Sinkhorn's codes
4e-3), without gradient, and treat the batch of all processes as one: every sum over the batch is
all-reduced and the batch size is counted, so N processes give the single-process result on the
concatenated batch (also for unequal shards).

- :func:`sinkhorn`: SwAV's equal-partition codes (Caron et al. 2020, Sinkhorn-Knopp).
- :func:`mira_targets`: MIRA's mutual-information regularised pseudo-labels by the fixed point of
  its Eq. 7 (Lee et al., NeurIPS 2022, Prop. 1-3).
- :func:`constrained_assignment`, :func:`dual_step` and :class:`OnlineCentres`: CoKe's online
  constrained k-means (Qian et al., 2022): hard labels argmax(x^T C + rho) (Eq. 10 / 17), a projected
  gradient step on the dual variables rho that keeps every cluster above its lower bound (Eq. 18), and
  centres that are the normalised running means of their features within an epoch (Eq. 13);
  :func:`update_label_slots` and :func:`slot_targets`: its moving-average soft labels (Sec. 3.4).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from kinship.runtime import all_reduce, is_distributed


def full_precision(solver: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``solver(x, ...)`` with autocast off on ``x``'s device (its inputs are upcast by :func:`_working`)."""

    @functools.wraps(solver)
    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return solver(x, *args, **kwargs)

    return run


def _working(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 inputs are upcast before any division by a temperature (exp(1/0.05) overflows fp16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def global_batch_size(a: torch.Tensor) -> int | torch.Tensor:
    """The rows B of ``a`` (..., B, K) over every process: a Python int on one process, an all-reduced
    0-d tensor under DDP; neither makes the host wait for the device."""
    if not is_distributed():
        return a.shape[-2]
    return all_reduce(torch.full((), a.shape[-2], dtype=a.dtype, device=a.device), "sum")


def _inverse_or_zero(x: torch.Tensor) -> torch.Tensor:
    """1/x, and 0 where x is 0: a prototype no sample reaches in working precision gets no mass."""
    return torch.where(x > 0, x.reciprocal(), torch.zeros_like(x))


@full_precision
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's codes: scores (..., B, K) -> Q (..., B, K), each row a distribution, each prototype's
    column mass approaching B/K as the iterations grow (``main_swav.py: distributed_sinkhorn``).
    Leading dimensions are independent problems (both crops at once: (2, B, K)).

    Q = diag(a) exp(scores / epsilon) diag(c): each iteration first sets c so that every prototype
    holds 1/K of the mass, then a so that every sample holds 1/B; Q is returned scaled by B. The
    exponentials are row-stabilised (largest entry 1 per row) and a starts at each row's share of
    the global maximum, which is exactly SwAV's start exp(scores / epsilon) / total."""
    if iterations < 1:
        raise ValueError(f"Sinkhorn needs at least one iteration, got {iterations}")
    x = _working(scores).reshape(-1, *scores.shape[-2:]) / epsilon  # (P, B, K): bmm, one op per product
    k, b = scores.shape[-1], global_batch_size(scores)
    row_max = x.amax(dim=-1, keepdim=True)  # (P, B, 1)
    e = (x - row_max).exp()
    e_t = e.mT
    a = (row_max - all_reduce(row_max.amax(dim=-2, keepdim=True), "max")).exp().clamp_min(torch.finfo(e.dtype).tiny)
    for _ in range(iterations):
        c = _inverse_or_zero(k * all_reduce(torch.bmm(e_t, a), "sum"))  # (P, K, 1) each prototype: 1/K
        a = (b * torch.bmm(e, c)).reciprocal()  # (P, B, 1) each sample: 1/B
    return (e * (b * a) * c.mT).reshape(scores.shape)


@full_precision
@torch.no_grad()
def mira_targets(
    logits: torch.Tensor, tau: float = 0.225, beta: float | torch.Tensor = 2 / 3, iterations: int = 30
) -> torch.Tensor:
    """MIRA's pseudo-labels W (..., B, K) for teacher logits (..., B, K), beta in [0, 1); leading
    dimensions are independent problems (both crops at once: (2, B, K)).

    W minimises (1/B) sum_i KL(w_i || p_i) - beta I(Y_W; i), p_i = softmax(l_i / tau) (Eq. 1, 4). Its
    optimum satisfies w_ij ∝ u_j^(-beta/(1-beta)) p_ij^(1/(1-beta)) (Eq. 5) with u the fixed point of
    Eq. 7, reached geometrically from u0 = (mean_i k_ij)^(1-beta), k = softmax(l / (tau (1-beta))) (the
    official code's start). The marginal is over the global batch.

    The iteration runs on m = u^(1/(1-beta)) = mean_i k_ij / sum_j' k_ij' m_j'^(-beta), a column of
    means of k's rows, so m <= 1 and the weights m^(-beta) >= 1: five ops per iteration, no
    exponential. A prototype whose column of k underflows to zero everywhere (dead) has m = 0; it
    gets weight 1 in the iteration (where it meets only zeros of k) instead of inf, and so no mass.
    """
    if not isinstance(beta, torch.Tensor) and not 0.0 <= beta < 1.0:  # a tensor (a schedule's value) is checked where set
        raise ValueError(f"MIRA's beta must lie in [0, 1), got {beta}")
    k = torch.softmax(_working(logits).reshape(-1, *logits.shape[-2:]) / (tau * (1.0 - beta)), dim=-1)  # (P, B, K)
    k_over_b = (k / global_batch_size(logits)).mT  # (P, K, B)
    mass = all_reduce(k_over_b.sum(dim=-1, keepdim=True), "sum")  # (P, K, 1) mean_i k_ij: only grows below
    dead = (mass == 0).to(mass.dtype)
    exponent = -beta  # once: a tensor beta would be negated at every iteration
    for _ in range(iterations):
        row_norm = torch.bmm(k, (mass + dead).pow(exponent))  # (P, B, 1) sum_j k_ij u_j^c
        mass = all_reduce(torch.bmm(k_over_b, row_norm.reciprocal()), "sum")  # Eq. 7: u_j^(1/(1-beta))
    w = k * (mass + dead).pow(exponent).mT  # Eq. 5
    return (w / w.sum(dim=-1, keepdim=True)).reshape(logits.shape)


@full_precision
@torch.no_grad()
def constrained_assignment(features: torch.Tensor, centres: torch.Tensor, duals: torch.Tensor) -> torch.Tensor:
    """CoKe's online assignment: labels (B,) = argmax_k (x_i^T c_k + rho_k) (Eq. 10).

    features (B, d): with two views the mean of the two unit features, *not* renormalised, which
    equals averaging the two similarities (Eq. 17); centres (K, d) unit rows; duals (K,). With
    rho = 0 this is the nearest centre. Ties go to the lowest index."""
    return (_working(features) @ _working(centres).T + _working(duals)).argmax(dim=1)


def label_counts(labels: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(k,) how many of ``labels`` (B,) fall in each cluster: ``bincount(labels, minlength=k)``
    without its read-back of the largest label (sums of ones: exact in floating point)."""
    return torch.zeros(k, dtype=dtype, device=labels.device).index_add_(0, labels, torch.ones_like(labels, dtype=dtype))


@full_precision
@torch.no_grad()
def dual_step(duals: torch.Tensor, labels: torch.Tensor, gamma: float, eta: float) -> torch.Tensor:
    """Eq. 18: rho_k - eta (n_k / b - gamma / K), n_k and b counted over the batch of every process.

    gamma is the lower bound as a fraction of the balanced size (each cluster >= gamma N / K);
    eta = 0 keeps rho at its value (rho = 0: greedy assignment). The clamp at 0 applies only for
    gamma < 1, as the official code (``update_center_mini_batch``); the paper writes it always, but
    gamma = 1 is an equality constraint, whose duals must be able to go negative to shrink a cluster."""
    k = duals.shape[0]
    counts = all_reduce(label_counts(labels, k, torch.float64), "sum")
    step = duals.to(torch.float64) - eta * (counts / counts.sum() - gamma / k)
    return (step.clamp_min(0) if gamma < 1 else step).to(duals.dtype)


class OnlineCentres(nn.Module):
    """CoKe's centres: within an epoch, centre k is the normalised mean of every feature assigned to
    it so far (Eq. 13), kept as running sums and counts and normalised when read, so the result does
    not depend on how the epoch is cut into batches or processes; a centre that has no feature yet
    keeps its previous value. ``previous`` holds the centres of the last finished epoch (the ones the
    loss uses, Table 2's decoupling) and ``running`` the current ones (the ones the assignment uses).

    ``renormalise_per_batch``: the official code's variant, which continues the running mean from
    the normalised centre after every batch (so earlier batches weigh 1/||mean|| more and the result
    depends on the batch size); CoKe's default, as the code produced the paper's numbers. All state
    is buffers: in the checkpoint and identical on every process (sums and counts are all-reduced)."""

    def __init__(self, k: int, dim: int, renormalise_per_batch: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        start = nn.functional.normalize(torch.randn(k, dim, generator=generator), dim=1)
        self.register_buffer("previous", start.clone())
        self.register_buffer("running", start.clone())
        self.register_buffer("sums", torch.zeros(k, dim))
        self.register_buffer("counts", torch.zeros(k))
        self.renormalise_per_batch = renormalise_per_batch

    def start_epoch(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add this process's features (B, d) under their labels (B,); every process must call it."""
        x = features.to(self.sums.dtype)  # fp32 (or the buffers' fp64): no autocast op below
        self.sums += all_reduce(torch.zeros_like(self.sums).index_add_(0, labels, x), "sum")
        self.counts += all_reduce(label_counts(labels, len(self.counts), self.counts.dtype), "sum")
        seen = (self.counts > 0).unsqueeze(1)  # a mask, not an index: nothing read back
        self.running.copy_(torch.where(seen, nn.functional.normalize(self.sums, dim=1), self.running))
        if self.renormalise_per_batch:  # the next batch continues from the unit centre
            self.sums.copy_(torch.where(seen, self.running * self.counts.unsqueeze(1), self.sums))

    def end_epoch(self, weight: float = 1.0) -> None:
        """C^{t-1} <- C^t; the next epoch's running centres start from it. ``weight`` < 1: the
        moving average of single-view stage 2 (Sec. 3.4), normalize((1 - w) C^{t-1} + w C^t), the
        outer normalisation as the official code (the centres must stay unit vectors, Eq. 6)."""
        if weight == 1.0:
            self.previous.copy_(self.running)
        else:
            self.previous.copy_(nn.functional.normalize((1 - weight) * self.previous + weight * self.running, dim=1))
            self.running.copy_(self.previous)


@torch.no_grad()
def update_label_slots(slots: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, factor: float | torch.Tensor) -> None:
    """CoKe's moving-average labels (Sec. 3.4, single view, stage 2), in place, for one row per image:
    v <- (1 - factor) v + factor onehot(y) with ``factor`` = 1 / (epochs averaged so far), kept as the
    L largest entries: slots (B, L) cluster ids, weights (B, L), labels (B,). A label already in a
    slot adds to it; a new one replaces the smallest slot, whose mass is dropped and the rest
    renormalised first (the official code's ``update_label``), so each row's weights sum to 1.
    ``factor`` = 1 starts the average: the row becomes onehot(y)."""
    rows = torch.arange(len(labels), device=labels.device)
    match = (slots == labels[:, None]) & (weights > 0)
    found = match.any(dim=1)
    slot = torch.where(found, match.int().argmax(dim=1), weights.argmin(dim=1))
    dropped = torch.where(found, torch.zeros_like(weights[:, 0]), weights[rows, slot])
    weights[rows, slot] -= dropped
    keep = torch.where(dropped < 1, (1 - factor) / (1 - dropped).clamp_min(1e-12), torch.zeros_like(dropped))
    weights.mul_(keep[:, None])
    slots[rows, slot] = labels
    weights[rows, slot] += factor


def slot_targets(slots: torch.Tensor, weights: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """(B, K) soft labels from the label slots: exp(v_k / temperature) normalised over the clusters
    with weight v_k > 0, zero elsewhere (Sec. 3.4's smoothing with lambda', 0.5 in the paper); a row
    without any weight (an image not yet averaged) is all zero."""
    dense = torch.zeros(len(slots), k, dtype=weights.dtype, device=weights.device)
    dense.scatter_add_(1, slots.clamp_min(0), torch.where(weights > 0, weights, torch.zeros_like(weights)))
    exp = torch.where(dense > 0, (dense / temperature).exp(), torch.zeros_like(dense))
    return exp / exp.sum(dim=1, keepdim=True).clamp_min(torch.finfo(exp.dtype).tiny)


class ClusteringHead(nn.Module):
    """One online constrained clustering (CoKe, Sec. 3): centres, duals, the label of every training
    image, the epoch's count of changed labels and, for the moving-average labels, the label slots.
    Every process holds the same state: the updates take the global batch's labels."""

    def __init__(self, k: int, dim: int, size: int, slots: int, per_batch: bool) -> None:
        super().__init__()
        self.k = k
        self.centres = OnlineCentres(k, dim, renormalise_per_batch=per_batch)
        self.register_buffer("duals", torch.zeros(k))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("changed", torch.zeros((), dtype=torch.long))  # labels that changed this epoch
        self.register_buffer("relabelled", torch.zeros((), dtype=torch.long))  # images that had a label before
        if slots:
            self.register_buffer("slots", torch.full((size, slots), -1, dtype=torch.long))
            self.register_buffer("slot_weights", torch.zeros(size, slots))

    @torch.no_grad()
    def update(self, features: torch.Tensor, y: torch.Tensor, bound: float, eta: float, per_batch: bool) -> None:
        """A dual step (CoKe Eq. 18) and the centres' update (Eq. 13) from this process's features
        (B, d) and their labels y (B,)."""
        self.duals.copy_(dual_step(self.duals, y, bound, eta))
        self.centres.renormalise_per_batch = per_batch
        self.centres.update(features, y)

    @torch.no_grad()
    def relabel(self, index: torch.Tensor, y: torch.Tensor, average_weight: torch.Tensor | None = None) -> None:
        """The global batch's labels y (dataset indices ``index``) into the table, counting the
        changes; with ``average_weight``, also into the moving-average slots."""
        before = self.labels[index]
        self.changed += ((before >= 0) & (before != y)).sum()
        self.relabelled += (before >= 0).sum()
        self.labels[index] = y
        if average_weight is not None:
            slots, weights = self.slots[index], self.slot_weights[index]
            update_label_slots(slots, weights, y, average_weight)
            self.slots[index], self.slot_weights[index] = slots, weights

    @torch.no_grad()
    def end_epoch(self, bound: float, weight: float) -> dict:
        """The epoch's smallest and largest cluster against the bound gamma' n / K (CoKe Table 1's
        columns; n = the images assigned in the epoch) and the share of labels that changed; then the
        centres' epoch ends (``weight``: of their moving average) and a fresh epoch's counts start."""
        counts = self.centres.counts
        row = {
            "k": self.k,
            "min": counts.min(),
            "max": counts.max(),
            "bound": bound * counts.sum() / self.k,
            "changed": (self.changed / self.relabelled).item() if self.relabelled > 0 else None,
            "dual_max": self.duals.max(),
        }
        self.centres.end_epoch(weight)
        self.centres.start_epoch()
        self.changed.zero_()
        self.relabelled.zero_()
        return row
