"""Classifiers trained on images: the SGD linear probe (frozen backbone) and semi-supervised fine-tuning.

One model serves both: backbone -> l2-normalise -> standardise (fixed train statistics) -> Linear,
CMSF's evaluation head. With ``train_backbone=False`` the backbone stays in eval mode under
``no_grad`` (the frozen probe of the papers, trained on augmented images); with ``True`` every
layer is fine-tuned. Images stay uint8 on the device and are augmented there in batches.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from kinship.augment.views import augment, to_float
from kinship.blocks.features import extract_features
from kinship.blocks.knn import topk_accuracy
from kinship.config import AugmentConfig
from kinship.data.store import ImageSet
from kinship.data.stream import FileImages
from kinship.errors import NonFiniteLossError
from kinship.eval.linear import Standardizer
from kinship.optim import cosine_ramp, scaled_lr, training_step
from kinship.runtime import progress_bar


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, standardize: Standardizer, head: nn.Linear, train_backbone: bool) -> None:
        super().__init__()
        self.backbone, self.standardize, self.head, self.train_backbone = backbone, standardize, head, train_backbone
        backbone.requires_grad_(train_backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            features = self.backbone(x)
        return self.head(self.standardize(features))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # frozen probe: BN statistics are part of the frozen backbone
        return self


def random_head(dim: int, num_classes: int, device: torch.device) -> nn.Linear:
    """The papers' new classifier: weights N(0, 0.01), zero bias."""
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def train_recipe(eval_recipe: AugmentConfig, crop_scale: tuple[float, float]) -> AugmentConfig:
    """Random-resized-crop and flip only, at the evaluation resolution and normalisation."""
    return dataclasses.replace(
        eval_recipe, crop_scale=crop_scale, flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0
    )


def train_classifier(
    model: Classifier,
    data: ImageSet | FileImages,
    recipe: AugmentConfig,
    epochs: int,
    batch_size: int,
    lr_backbone: float,
    lr_head: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: list[int] | None = None,
    seed: int = 0,
    autocast: bool = False,
    progress: bool = False,
    desc: str = "classifier",
) -> list[float]:
    """SGD with cross-entropy on augmented views of ``data`` (its images, labels and aspect ratios, in
    memory or decoded a batch at a time from files); learning rates are given at batch 256 and scaled
    linearly. Cosine over all steps, or x0.1 at each epoch in ``milestones``. Returns epoch losses."""
    device = next(model.parameters()).device
    groups = [{"params": list(model.head.parameters()), "base_lr": scaled_lr(lr_head, batch_size, 256)}]
    if model.train_backbone:
        groups.append({"params": list(model.backbone.parameters()), "base_lr": scaled_lr(lr_backbone, batch_size, 256)})
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=weight_decay)
    n = len(data)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size) if min(s + batch_size, n) - s >= 2]
    total = epochs * len(batches)
    generator = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    losses, step = [], 0
    model.train()
    for epoch in progress_bar(range(epochs), progress, desc=desc):
        order = torch.randperm(n, generator=order_gen).to(device)
        epoch_loss = torch.zeros((), device=device)
        for start, stop in batches:
            factor = 0.1 ** sum(epoch >= m for m in milestones) if milestones else cosine_ramp(step, total, 1.0, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            batch = data[order[start:stop]]
            views = augment(to_float(batch.images), recipe, generator, aspect=batch.aspect)
            loss, _ = training_step(
                optimizer, lambda: (F.cross_entropy(model(views).float(), batch.labels), {}), device.type if autocast else None
            )
            epoch_loss += loss.detach()
            step += 1
        losses.append(epoch_loss.item() / len(batches))
        if not math.isfinite(losses[-1]):
            raise NonFiniteLossError(f"{desc}: loss is {losses[-1]} in epoch {epoch + 1}; lower the learning rate")
    model.eval()
    return losses


def classifier_accuracy(
    model: Classifier,
    images: torch.Tensor | ImageSet,
    labels: torch.Tensor,
    recipe: AugmentConfig,
    batch_size: int = 512,
    autocast: bool = False,
) -> dict[int, float]:
    """Top-1/top-5 (percent) on centre views, BN in eval mode: the class scores are the model's
    "features" in the evaluation's chunked extraction."""
    return topk_accuracy(extract_features(model, images, recipe, batch_size, autocast), labels)
