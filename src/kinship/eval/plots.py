"""Pictures for the report: a t-SNE map of test features and the training curves of a run."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def stratified_sample(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of about ``count`` items, the same share of every class, seeded."""
    labels = labels.cpu()
    if count >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        take = max(1, round(count * len(members) / len(labels)))
        picks.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.cat(picks).sort().values


def tsne_png(features: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, title: str, seed: int = 0) -> dict:
    """2-D t-SNE (scikit-learn, PCA init, perplexity 30) of l2-normalised features, one colour per class."""
    from sklearn.manifold import TSNE

    x = F.normalize(features.float(), dim=1).cpu().numpy()
    y = labels.cpu().numpy()
    perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6.5), dpi=110)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(y):
        mask = y == c
        name = classes[c] if c < len(classes) else str(c)
        ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(c % cmap.N), label=name, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"png": path.name, "points": int(len(x))}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_png(metrics_path: Path, path: Path, title: str) -> dict:
    """Training loss (and learning rate) by step, and k-NN top-1 by epoch with its baselines, the
    method's own classifiers and the online linear probe."""
    records = read_metrics(metrics_path)
    steps = [r for r in records if "loss" in r]
    knn = [r for r in records if "knn_top1" in r]
    base = next((r for r in records if "knn_pixel_top1" in r), None)
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.2, color="tab:blue")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss", color="tab:blue")
        ax_lr = ax_loss.twinx()
        ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=0.8, color="tab:gray", ls="--")
        ax_lr.set_ylabel("learning rate", color="tab:gray")
    points = ([(0, base["knn_random_init_top1"])] if base else []) + [(r["epoch"], r["knn_top1"]) for r in knn]
    if points:  # the network at epoch 0 is the random-init baseline
        # with only the first and last evaluation, a dotted line: nothing was measured in between
        ax_knn.plot(*zip(*points), marker="o", ls="-" if len(points) > 2 else ":", label="model")
        ax_knn.set_xlim(-0.3, max(1, max(e for e, _ in points)) + 0.3)
    if base:
        ax_knn.axhline(base["knn_pixel_top1"], color="tab:red", ls=":", label="raw pixels")
        ax_knn.axhline(base["knn_random_init_top1"], color="tab:gray", ls="--", label="random init")
    classifiers = sorted({k for r in records for k in r if k.startswith("classifier_") and k.endswith("_top1")})
    for key in classifiers:  # a method's own classifiers (semi-supervised methods)
        series = [(r["epoch"], r[key]) for r in records if key in r]
        ax_knn.plot(*zip(*series), lw=1.2, label=key.removeprefix("classifier_").replace("_top1", " classifier"))
    probe = [(r["epoch"], r["online_probe_top1"]) for r in records if "online_probe_top1" in r]
    if probe:  # the online linear probe, on training views before each update
        ax_knn.plot(*zip(*probe), lw=1.2, ls="-.", color="tab:green", label="online linear probe")
    ax_knn.xaxis.get_major_locator().set_params(integer=True)
    ax_knn.set_xlabel("epoch")
    ax_knn.set_ylabel("top-1 (%)" if classifiers or probe else "k-NN top-1 (%)")
    ax_knn.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {
        "png": path.name,
        "steps_logged": len(steps),
        "knn_points": len(knn),
        "classifiers": classifiers,
        "online_probe_points": len(probe),
    }
