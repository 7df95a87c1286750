"""``kinship export``: the pre-trained backbone as a plain ``state_dict``, usable without kinship.

ResNet backbones keep torchvision's parameter names, so the file loads into
``torchvision.models.resnetXX()`` once its classifier is dropped (``fc = Identity``) and, for the
CIFAR stem, after the two-line stem change printed by :func:`loading_instructions`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kinship import checkpoint
from kinship.assembly import build_config, load_pretrained
from kinship.config import RunConfig, apply_overrides
from kinship.data import DataInfo
from kinship.models.backbones import ResNetBackbone


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Plain CPU tensors (contiguous, whatever memory format training used) under torchvision's names."""
    net = backbone.net if isinstance(backbone, ResNetBackbone) else backbone
    return {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}


def loading_instructions(config: RunConfig, path: Path) -> str:
    m = config.model
    if m.backbone.startswith("resnet"):
        lines = ["import torch, torchvision", f"model = torchvision.models.{m.backbone}()"]
        if m.cifar_stem:
            lines += [
                "model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, "
                f"padding={m.stem_padding}, bias=False)  # CIFAR stem",
                "model.maxpool = torch.nn.Identity()  # CIFAR stem",
            ]
        lines += [
            "model.fc = torch.nn.Identity()  # the backbone's features; put your own classifier here",
            f"model.load_state_dict(torch.load('{path}', weights_only=True))",
        ]
    else:
        lines = [
            "import torch",
            "from kinship.models.backbones import build_backbone  # kinship's WRN or small CPU network",
            f"model = build_backbone('{m.backbone}', width={m.width})",
            f"model.load_state_dict(torch.load('{path}', weights_only=True))",
        ]
    return "\n".join(lines)


def export_backbone(checkpoint_path: str | Path, out: str | Path, overrides: list[str] = ()) -> str:
    """Write the evaluation backbone of a pre-training checkpoint to ``out``; returns how to load it."""
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    state = checkpoint.read_checkpoint(checkpoint_path)
    config = build_config(apply_overrides(state["config"], list(overrides)))
    placeholder = DataInfo(size=0, num_classes=0, image_size=config.data.image_size)  # used only by pre-data_info checkpoints
    method = load_pretrained(checkpoint_path, state, config, placeholder, torch.device("cpu"))
    checkpoint.save_atomic(backbone_state_dict(method.eval_backbone), out)
    return loading_instructions(config, out)
