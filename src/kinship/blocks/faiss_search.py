"""Exact search through faiss where it is installed (``pip install faiss-cpu``), for the searches over
a whole data set: the neighbour table of every image (CLIM's refresh), k-means' nearest centroid and
the k-NN monitor's bank. faiss is optional: without it (or with ``KINSHIP_FAISS=0``, or for tensors on
a GPU, where torch's search is fast) the chunked torch search runs. Both are exact: they agree up to
float rounding, so a neighbour whose distance ties another's within it may be ordered differently.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def available(x: torch.Tensor) -> bool:
    """Whether faiss serves a search over ``x``: installed, not switched off, and ``x`` on the CPU."""
    return (
        x.device.type == "cpu" and os.environ.get("KINSHIP_FAISS", "1") != "0" and importlib.util.find_spec("faiss") is not None
    )


@torch.no_grad()
def search(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` (N, d) to each of ``queries`` (Q, d): squared L2 distances
    (``metric="l2"``, smallest first) or inner products (``"ip"``, largest first), (Q, k) each, and
    their indices (Q, k) int64, by an exact (flat) faiss index."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(bank.shape[1]) if metric == "l2" else faiss.IndexFlatIP(bank.shape[1])
    index.add(bank.float().contiguous().numpy())
    values, indices = index.search(queries.float().contiguous().numpy(), k)
    return torch.from_numpy(values), torch.from_numpy(indices).long()
