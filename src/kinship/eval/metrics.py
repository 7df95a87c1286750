"""Label-aware metrics of a feature space: clustering ACC/NMI/ARI, neighbour purity, class cosines."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from kinship.blocks.knn import topk_neighbors


def clustering_accuracy(labels: np.ndarray | torch.Tensor, predicted: np.ndarray | torch.Tensor) -> float:
    """ACC: the best one-to-one map of clusters to classes (Hungarian), as a fraction in [0, 1].

    The contingency matrix M[cluster, class] is padded to square when there are more clusters than
    classes (or fewer), so extra clusters match nothing; there is no many-to-one majority map.
    """
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must be equal-length vectors")
    _, y = np.unique(y, return_inverse=True)
    _, p = np.unique(p, return_inverse=True)
    size = max(y.max(), p.max()) + 1
    contingency = np.zeros((size, size), dtype=np.int64)
    np.add.at(contingency, (p, y), 1)
    rows, cols = linear_sum_assignment(-contingency)
    return float(contingency[rows, cols].sum() / len(y))


def clustering_scores(labels: np.ndarray | torch.Tensor, predicted: np.ndarray | torch.Tensor) -> dict[str, float]:
    """ACC (Hungarian), NMI (arithmetic normalisation, scikit-learn's default) and ARI, in percent."""
    y, p = np.asarray(labels), np.asarray(predicted)
    return {
        "acc": 100.0 * clustering_accuracy(y, p),
        "nmi": 100.0 * float(normalized_mutual_info_score(y, p)),
        "ari": 100.0 * float(adjusted_rand_score(y, p)),
    }


@torch.no_grad()
def neighbour_purity(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 10, 20, 50, 100, 200),
) -> dict[int, float]:
    """purity@k: percent of each query's k nearest bank items (cosine) that share its label, averaged."""
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    _, idx = topk_neighbors(queries, bank, max(ks))
    same = (bank_labels[idx] == query_labels.view(-1, 1)).float()
    return {k: 100.0 * same[:, :k].mean().item() for k in ks if k <= idx.shape[1]}


@torch.no_grad()
def class_cosines(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity over all pairs of distinct images of the same class, and of different classes.

    Exact and O(N d): with unit rows, the pair sum within a set is ||sum||^2 minus its n self-pairs.
    """
    x = F.normalize(features.double(), dim=1)
    classes, labels = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=len(classes)).double()
    intra_sum = ((sums * sums).sum(1) - counts).sum()
    intra_pairs = (counts * (counts - 1)).sum()
    total = x.sum(0)
    all_sum = total @ total - x.shape[0]
    all_pairs = x.shape[0] * (x.shape[0] - 1)
    inter_pairs = all_pairs - intra_pairs
    return {
        "intra_class_cosine": (intra_sum / intra_pairs).item() if intra_pairs > 0 else float("nan"),
        "inter_class_cosine": ((all_sum - intra_sum) / inter_pairs).item() if inter_pairs > 0 else float("nan"),
    }
