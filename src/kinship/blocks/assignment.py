"""Assignment solvers: soft pseudo-labels (B, K) from scores or logits (B, K) of a batch.

Both run in log space in fp32 (or fp64 when given fp64), without gradient, and treat the batch of
all processes as one: every sum over the batch is all-reduced, and the batch size is counted, so N
processes give exactly the single-process result on the concatenated batch (also for unequal shards).

- :func:`sinkhorn`: SwAV's equal-partition codes (Caron et al. 2020, Sinkhorn-Knopp).
- :func:`mira_targets`: MIRA's mutual-information regularised pseudo-labels by the fixed point of
  its Eq. 7 (seed 004, Prop. 1-3), computed as in ``shared/spec/mira.md`` §1.3.
CoKe's constrained assignment will join them here.
"""
from __future__ import annotations

import math

import torch

from kinship.runtime import all_reduce


def _working(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 inputs are upcast before any division by a temperature (exp(1/0.05) overflows fp16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def batch_logsumexp(a: torch.Tensor) -> torch.Tensor:
    """(K,) log of the column sums of exp(a) over the rows of every process."""
    m = all_reduce(a.max(dim=0).values.clone(), "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m + all_reduce((a - m).exp().sum(dim=0), "sum").log()


def global_batch_size(a: torch.Tensor) -> int:
    return int(all_reduce(torch.tensor([a.shape[0]], device=a.device, dtype=torch.float64), "sum").item())


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's codes: scores (B, K) -> Q (B, K), each row a distribution, each prototype's column mass
    approaching B/K as the iterations grow. exp(scores / epsilon) alternately normalised so that
    every prototype holds 1/K of the mass and every sample 1/B (``main_swav.py:
    distributed_sinkhorn``), in log space."""
    log_q = _working(scores) / epsilon
    k, b = scores.shape[1], global_batch_size(scores)
    log_q = log_q - batch_logsumexp(log_q.reshape(-1, 1)).squeeze()  # total mass 1
    for _ in range(iterations):
        log_q = log_q - batch_logsumexp(log_q) - math.log(k)  # each prototype: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b)  # each sample: 1/B
    return (log_q + math.log(b)).exp()


@torch.no_grad()
def mira_targets(logits: torch.Tensor, tau: float = 0.225, beta: float = 2 / 3, iterations: int = 30) -> torch.Tensor:
    """MIRA's pseudo-labels W (B, K) for teacher logits (B, K), beta in [0, 1).

    W minimises (1/B) sum_i KL(w_i || p_i) - beta I(Y_W; i), p_i = softmax(l_i / tau) (Eq. 1, 4). Its
    optimum satisfies w_ij ∝ u_j^(-beta/(1-beta)) p_ij^(1/(1-beta)) (Eq. 5) with u the fixed point of
    Eq. 7, reached geometrically from u0 = (mean_i k_ij)^(1-beta), k = softmax(l / (tau (1-beta))) [C].
    The marginal is over the global batch. u is renormalised each iteration: a global factor on u
    leaves W unchanged (spec §1.3 "scale mode").
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"MIRA's beta must lie in [0, 1), got {beta}")
    c = -beta / (1.0 - beta)
    log_k = torch.log_softmax(_working(logits) / (tau * (1.0 - beta)), dim=1)
    log_b = math.log(global_batch_size(logits))
    log_u = (1.0 - beta) * (batch_logsumexp(log_k) - log_b)
    for _ in range(iterations):
        log_t = log_k - torch.logsumexp(c * log_u + log_k, dim=1, keepdim=True)
        log_u = (1.0 - beta) * (batch_logsumexp(log_t) - log_b)  # Eq. 7
        log_u = log_u - torch.logsumexp(log_u, dim=0)
    return torch.softmax(c * log_u + log_k, dim=1)  # Eq. 5
