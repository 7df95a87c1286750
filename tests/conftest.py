from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.npz"


@pytest.fixture
def cifar_npz() -> Path:
    path = Path(os.environ.get("KINSHIP_CIFAR_NPZ", SHARED_NPZ))
    if not path.is_file():
        pytest.skip(f"shared CIFAR-10 npz not found at {path}")
    return path


def tiny_run_config(**overrides) -> dict:
    """A run on synthetic 16 px data with a width-8 CNN: seconds on CPU."""
    values = {
        "method": {"name": "mocov2", "queue_size": 128, "augment": {"crop_size": 16}},
        "data": {"name": "synthetic", "image_size": 16, "train_limit": 256, "test_limit": 128},
        "model": {"backbone": "convnet", "width": 8},
        "optim": {"lr": 0.05},
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "log_every": 1},
        "eval": {"knn_k": 20, "knn_every": 1},
    }
    for key, value in overrides.items():
        node = values
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return values
