"""k-NN top-1 of a pre-training checkpoint and of raw pixels under both common weighted k-NN settings.

The issue's reference figures (raw pixels 45.8%, a naive InfoNCE run 51.6%) use k=20, T=0.07;
kinship's monitor defaults to the MoCo CIFAR demo's k=200, T=0.1 (baselines.md).

    python benchmarks/knn_protocols.py runs/demo/last.pt
"""
from __future__ import annotations

import json
import sys

import torch

from kinship.blocks.knn import knn_accuracy
from kinship.config import build_config
from kinship.eval.features import extract_features, pixel_features
from kinship.train import checkpoint
from kinship.train.trainer import build_method, load_run_data


def main(path: str) -> None:
    state = checkpoint.load(path)
    config = build_config(state["config"])
    data = load_run_data(config, torch.device("cpu"), None)
    method = build_method(config, data.info)
    method.load_state_dict(state["method"])
    recipe = method.eval_recipe
    features = {
        "model": (extract_features(method.backbone, data.bank.images, recipe), extract_features(method.backbone, data.test.images, recipe)),
        "pixels": (pixel_features(data.bank.images, recipe), pixel_features(data.test.images, recipe)),
    }
    for k, temperature in ((200, 0.1), (20, 0.07)):
        row = {"k": k, "T": temperature}
        for name, (bank, queries) in features.items():
            row[f"{name}_top1"] = round(knn_accuracy(bank, data.bank.labels, queries, data.test.labels, k, temperature)[1], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1])
