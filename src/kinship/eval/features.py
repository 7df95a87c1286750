"""Frozen-backbone feature extraction: one deterministic centre view per image, in chunks."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from kinship.augment.views import center_view
from kinship.config import AugmentConfig


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    recipe: AugmentConfig,
    batch_size: int = 512,
    autocast: bool = False,
    progress: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """uint8 (N, 3, H, W) on the backbone's device -> float32 features (N, D); BN in eval mode."""
    was_training = backbone.training
    backbone.eval()
    try:
        out = []
        for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            x = center_view(images[start : start + batch_size], recipe)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
                out.append(backbone(x).float())
        return torch.cat(out)
    finally:
        backbone.train(was_training)


def pixel_features(images: torch.Tensor, recipe: AugmentConfig) -> torch.Tensor:
    """Raw normalised pixels, flattened: the 'no learning at all' k-NN baseline."""
    return center_view(images, recipe).flatten(1).float()
