"""Losses as pure functions on tensors (shapes documented), each with the paper's formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss, mean over the batch of 2 - 2 cos(p, z) = ||p_hat - z_hat||^2.

    prediction, target: (B, D); the target is detached by the caller. Values in [0, 4].
    """
    return (2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


def info_nce_with_queue(
    query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float, reduction: str = "mean"
) -> torch.Tensor:
    """MoCo's InfoNCE: logits [q.k+, q.Queue] / T, cross-entropy with the positive at index 0.

    query, key: (B, D) l2-normalised; negatives: (K, D) l2-normalised. Returns the batch mean, or
    with ``reduction="none"`` the (B,) per-sample losses (CLIM's Eq. 1).
    """
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ negatives.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target, reduction=reduction)


def mixed_info_nce(
    query: torch.Tensor,
    anchor_key: torch.Tensor,
    positive_key: torch.Tensor,
    negatives: torch.Tensor,
    lam: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """CLIM Eq. 4, per sample: lambda nce(x_mix, x) + (1 - lambda) nce(x_mix, x~), where the mixed
    query holds a share lambda (B,) of the anchor's pixels. Shapes as :func:`info_nce_with_queue`;
    returns (B,)."""
    lam = lam.to(anchor_key.dtype)
    return lam * info_nce_with_queue(query, anchor_key, negatives, temperature, "none") + (1 - lam) * info_nce_with_queue(
        query, positive_key, negatives, temperature, "none"
    )


def mean_shift_loss(prediction: torch.Tensor, neighbour_mean: torch.Tensor) -> torch.Tensor:
    """MSF/CMSF Eq. (1), per query: the mean over its selected neighbours z of ||v - z||^2.

    prediction (B, D) l2-normalised online prediction v; neighbour_mean (B, D) the mean of the unit
    target embeddings in S_i (not unit). For unit vectors the mean of squared distances equals
    2 - 2 <v, mean z>, so the loss pulls v toward the neighbours' mean. Returns (B,) in [0, 4].
    Pass fp32 (or fp64) tensors: the caller keeps the loss out of bf16.
    """
    return 2 - 2 * (prediction * neighbour_mean.detach()).sum(dim=1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Batch mean of -sum_k q_ik log softmax(s_i / T)_k for logits s (B, K) and targets q (B, K),
    rows on the simplex, no gradient through q. Computed in fp32 at least (bf16 logits are upcast,
    fp64 stays fp64)."""
    s = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -(targets.detach() * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()


def swapped_prediction_loss(targets: list[torch.Tensor], logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """SwAV's and MIRA's swapped prediction (SwAV Eq. 1; MIRA Eq. 8 as its code normalises it).

    targets[g] (B, K): soft labels of global crop g (rows on the simplex, no gradient); logits[v] (B, K)
    of every crop v, the global crops first. Target g is predicted by every crop v != g with
    :func:`soft_cross_entropy`; mean over the batch and those crops, then over g.
    """
    per_target = [
        torch.stack([soft_cross_entropy(s, q, temperature) for v, s in enumerate(logits) if v != g]).mean()
        for g, q in enumerate(targets)
    ]
    return torch.stack(per_target).mean()


def margin_contrastive_loss(
    positive: torch.Tensor,
    negative: torch.Tensor,
    weight: torch.Tensor,
    gamma: float,
    margin: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SsCL's contrastive loss with several positives, a margin and self-paced weights, per query:

        L = log(1 + sum_n exp(gamma (s_n + m)) sum_p exp(-gamma alpha_p s_p))
          = softplus(LSE_n gamma (s_n + m) + LSE_p (-gamma alpha_p s_p))

    The paper's Eq. 5 is lost from its text; this is the form its appendix derivation (Eq. 10) and the
    bound of Eq. 9, max(gamma (max s_n - min alpha_p s_p + m), 0), imply: Circle loss's unified form
    (Sun et al., 2020) with the margin on the negatives and the weights on the positives. With one
    positive, alpha 1 and m 0 it is InfoNCE at temperature 1 / gamma.

    positive (B, P) cosines s_p; negative (B, K) cosines s_n; weight (B, P) alpha_p (no gradient);
    valid (B, P) bool: positives that exist (a row's padding gets -inf). Returns (B,), computed in
    fp32 at least.
    """
    dtype = torch.promote_types(positive.dtype, torch.float32)
    pos = -gamma * weight.detach().to(dtype) * positive.to(dtype)
    if valid is not None:
        pos = pos.masked_fill(~valid, float("-inf"))
    neg = gamma * (negative.to(dtype) + margin)
    return F.softplus(torch.logsumexp(neg, dim=1) + torch.logsumexp(pos, dim=1))


def pseudo_label_loss(strong_logits: torch.Tensor, target: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's and SsCL's Eq. 2: the cross-entropy of the strong view's logits (B, C) against the
    hard pseudo-label argmax of ``target`` (B, C, rows on the simplex, no gradient), kept where
    max target > ``threshold`` (strictly) and averaged over all B samples, kept or not. Returns the
    loss and the (B,) float mask."""
    confidence, pseudo = target.detach().max(dim=1)
    mask = (confidence > threshold).to(strong_logits.dtype)
    per_sample = F.cross_entropy(
        strong_logits.to(torch.promote_types(strong_logits.dtype, torch.float32)), pseudo, reduction="none"
    )
    return (per_sample * mask).mean(), mask
