"""Backbones: torchvision ResNets (optionally with the CIFAR stem), the Wide ResNets of the
semi-supervised papers and a small CNN for CPU presets.

Every backbone maps images (B, 3, H, W) to features (B, D) and exposes ``feature_dim``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kinship.config import BACKBONES, known_backbone


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier.

    The CIFAR stem replaces conv1 by a 3x3 stride-1 convolution and drops the max-pool; the
    state_dict keys stay torchvision's, so an exported backbone loads into
    ``torchvision.models.resnet18()`` after the same two-line change (see ``kinship export``).
    """

    def __init__(self, name: str, cifar_stem: bool, stem_padding: int = 1, zero_init_residual: bool = False) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
            net.maxpool = nn.Identity()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class ConvNet(nn.Module):
    """A small VGG-style CNN for CPU presets: stride-2 stem, three stages of two convs + max-pool.

    At 32 px with width 32 the feature is 4 * width = 128-d and one forward costs ~25 MFLOPs, so
    a 2-core CPU trains it on CIFAR-10 in minutes.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, stride=2),
            _conv_bn(w, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 2 * w),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class WideBlock(nn.Module):
    """A pre-activation residual block of FixMatch's WRN: BN (momentum 0.001) and leaky ReLU (0.1)
    before each 3 x 3 conv. Where the width changes, the 1 x 1 shortcut sees the activated input
    (``activate_first``, the first group) or the raw input (the later groups), as in the reference."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_first: bool) -> None:
        super().__init__()
        self.same = c_in == c_out
        self.activate_first = self.same or activate_first
        if self.activate_first:
            self.bn1 = nn.BatchNorm2d(c_in, momentum=0.001)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=0.001)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Identity() if self.same else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate_first:
            activated = F.leaky_relu(self.bn1(x), 0.1)
            x = x if self.same else activated
        else:
            activated = x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(activated)), 0.1))
        return self.shortcut(x) + out


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko and Komodakis, 2016) as FixMatch's code builds it for 32 px images:
    a 16-channel stem, three groups of (depth - 4) / 6 blocks at 16, 32, 64 x widen channels (strides
    1, 2, 2), BN, leaky ReLU, global average pooling; He (fan-out) init. WRN-28-2: 1.5 M parameters,
    128-d features; WRN-28-8 (CIFAR-100): 23 M, 512-d."""

    def __init__(self, depth: int = 28, widen: int = 2) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet's depth is 6 n + 4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False)]
        for group in range(3):
            for i in range(n):
                layers.append(
                    WideBlock(
                        widths[group] if i == 0 else widths[group + 1],
                        widths[group + 1],
                        (1 if group == 0 else 2) if i == 0 else 1,
                        activate_first=group == 0,
                    )
                )
        layers += [
            nn.BatchNorm2d(widths[3], momentum=0.001),
            nn.LeakyReLU(0.1, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.features = nn.Sequential(*layers)
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(
    name: str, cifar_stem: bool = True, width: int = 32, stem_padding: int = 1, zero_init_residual: bool = False
) -> nn.Module:
    if not known_backbone(name):
        raise ValueError(f"unknown backbone '{name}' (choose {BACKBONES})")
    if name.startswith("resnet"):
        return ResNetBackbone(name, cifar_stem, stem_padding, zero_init_residual)
    if name == "convnet":
        return ConvNet(width)
    depth, widen = (int(v) for v in name[3:].split("_"))
    return WideResNet(depth, widen)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training batch is normalised as ``splits`` sub-batches, each with its own
    statistics (samples i, i + splits, ... form one), and running statistics averaged over them:
    the MoCo CIFAR demo's stand-in for the per-GPU BN of an 8-GPU run on one GPU."""

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.splits:
            raise ValueError(f"split batch norm: the batch of {n} does not divide into {self.splits} splits")
        mean, var = self.running_mean.repeat(self.splits), self.running_var.repeat(self.splits)
        out = F.batch_norm(
            x.reshape(n // self.splits, c * self.splits, h, w),
            mean,
            var,
            self.weight.repeat(self.splits),
            self.bias.repeat(self.splits),
            True,
            self.momentum,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(mean.view(self.splits, c).mean(0))
            self.running_var.copy_(var.view(self.splits, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.reshape(n, c, h, w)


def _replace(module: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            _replace(child, kind, make)
    return module


def remove_batch_norm(module: nn.Module) -> nn.Module:
    """Every BatchNorm inside ``module`` replaced by an identity, in place (``model.norm: none``)."""
    return _replace(module, nn.modules.batchnorm._BatchNorm, lambda _: nn.Identity())


def split_batch_norm(module: nn.Module, splits: int) -> nn.Module:
    """Every BatchNorm2d inside ``module`` replaced by a :class:`SplitBatchNorm2d`, in place."""

    def split(bn: nn.BatchNorm2d) -> SplitBatchNorm2d:
        new = SplitBatchNorm2d(bn.num_features, splits, eps=bn.eps, momentum=bn.momentum)
        new.load_state_dict(bn.state_dict())
        return new

    return _replace(module, nn.BatchNorm2d, split)
