"""Mixing an image with one of its kin: CutMix (Yun et al., 2019) and mixup (Zhang et al., 2018),
one independent draw per sample, batched on the device (CLIM, Eq. 3).

    x_mix = M * anchor + (1 - M) * positive            M = 1 outside one rectangle, 0 inside it
    lambda = share of the anchor's pixels in x_mix     (CutMix: counted after the box is clipped)

CutMix draws lambda_0 ~ Beta(alpha, alpha), a box of (1 - lambda_0) of the area centred on a
uniform pixel and clipped to the image, as the CutMix reference code (``rand_bbox``); the weight
returned is the area actually kept from the anchor, which clipping can only raise. Draws are made
for the global batch and each process keeps its shard's rows (:mod:`kinship.sampling`).
"""

from __future__ import annotations

import torch

from kinship.sampling import Shard, beta


def cutmix_boxes(
    shard: Shard, height: int, width: int, alpha: float, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """(shard.size, 4) int64 boxes (y0, y1, x0, x1), the rows [y0, y1) x [x0, x1) pasted from the
    positive; empty when y0 == y1 or x0 == x1."""
    n = shard.total
    cut = torch.sqrt(1.0 - beta(n, alpha, alpha, generator, device))
    cut_h, cut_w = torch.floor(height * cut).long(), torch.floor(width * cut).long()
    cy = torch.floor(torch.rand(n, generator=generator, device=device) * height).long()
    cx = torch.floor(torch.rand(n, generator=generator, device=device) * width).long()
    boxes = torch.stack(
        [
            (cy - cut_h // 2).clamp(0, height),
            (cy + cut_h // 2).clamp(0, height),
            (cx - cut_w // 2).clamp(0, width),
            (cx + cut_w // 2).clamp(0, width),
        ],
        dim=1,
    )
    return shard.rows(boxes)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) bool, True inside each sample's box (the positive's pixels)."""
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    y0, y1, x0, x1 = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).unsqueeze(1)


def anchor_share(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B,) float32 lambda = 1 - box area / (H W), as a ratio of integer pixel counts."""
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return (height * width - area).float() / (height * width)


def cutmix(anchor: torch.Tensor, positive: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3: every pixel of x_mix is the anchor's or, inside the box, the positive's; returns
    (x_mix (B, C, H, W), lambda (B,))."""
    height, width = anchor.shape[-2:]
    return torch.where(box_masks(boxes, height, width), positive, anchor), anchor_share(boxes, height, width)


def mixup(anchor: torch.Tensor, positive: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lambda anchor + (1 - lambda) positive, lambda (B,) per sample."""
    weight = lam.to(anchor.dtype).view(-1, *([1] * (anchor.dim() - 1)))
    return weight * anchor + (1 - weight) * positive


def mix(
    anchor: torch.Tensor, positive: torch.Tensor, mode: str, alpha: float, generator: torch.Generator, shard: Shard | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mode`` cutmix | mixup of two view batches (B, C, H, W): (x_mix, lambda (B,) float32)."""
    shard = shard or Shard.whole(anchor.shape[0])
    if mode == "cutmix":
        return cutmix(anchor, positive, cutmix_boxes(shard, *anchor.shape[-2:], alpha, generator, anchor.device))
    if mode == "mixup":
        lam = shard.rows(beta(shard.total, alpha, alpha, generator, anchor.device))
        return mixup(anchor, positive, lam), lam
    raise ValueError(f"unknown mixing '{mode}' (cutmix or mixup)")
