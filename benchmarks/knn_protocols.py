"""k-NN top-1 of a pre-training checkpoint and of raw pixels under both common weighted k-NN settings.

Reference figures for the shared CIFAR-10 (raw pixels 45.8%, a naive InfoNCE run 51.6%) use
k=20, T=0.07; kinship's monitor defaults to the MoCo CIFAR demo's k=200, T=0.1.

    python benchmarks/knn_protocols.py runs/demo/last.pt
"""

from __future__ import annotations

import json
import sys

import torch

from kinship import checkpoint
from kinship.assembly import build_config, load_pretrained, load_run_data
from kinship.blocks.features import extract_features, pixel_features
from kinship.blocks.knn import knn_accuracy


def main(path: str) -> None:
    state = checkpoint.read_checkpoint(path)
    config = build_config(state["config"])
    data = load_run_data(config, torch.device("cpu"), None)
    method = load_pretrained(path, state, config, data.handle.info, torch.device("cpu"))
    recipe = method.eval_recipe
    features = {
        "model": (
            extract_features(method.eval_backbone, data.bank.images, recipe),
            extract_features(method.eval_backbone, data.test.images, recipe),
        ),
        "pixels": (pixel_features(data.bank.images, recipe), pixel_features(data.test.images, recipe)),
    }
    for k, temperature in ((200, 0.1), (20, 0.07)):
        row = {"k": k, "T": temperature}
        for name, (bank, queries) in features.items():
            row[f"{name}_top1"] = round(knn_accuracy(bank, data.bank.labels, queries, data.test.labels, k, temperature)[1], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1])
