"""Label sets derived from a dataset's: seeded labeled subsets for semi-supervised methods (N images
per class, or a fraction of each class), corrupted and coarse labels, CIFAR-100's 20 super-classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kinship.errors import DataError


def labeled_subset(labels: torch.Tensor, per_class: int = 0, fraction: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-stratified labeled subset (exactly ``per_class`` or ``round(fraction * n_c)``)."""
    if (per_class > 0) == (fraction > 0):
        raise DataError("give exactly one of per_class > 0 and fraction > 0")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = (labels == c).nonzero().squeeze(1)
        take = per_class if per_class > 0 else round(fraction * len(members))
        if take > len(members):
            raise DataError(f"class {c} has {len(members)} images, fewer than the {take} labels asked for")
        chosen.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.cat(chosen).sort().values


def read_labeled_file(path: Path, size: int, files: list[Path] | None = None) -> torch.Tensor:
    """Sorted indices of the labeled images listed in ``path``, one per line (blank lines and ``#``
    comments skipped): image file names for an ImageFolder (``files``; matched by name, e.g. the
    SimCLR 1 % and 10 % ImageNet splits' ``n01440764_10026.JPEG``), else indices into the train split."""
    if not path.is_file():
        raise DataError(f"data.labeled_file: file not found: {path}")
    entries = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        raise DataError(f"data.labeled_file {path} lists no images")
    if files is not None:
        where = {f.name: i for i, f in enumerate(files)}
        missing = [e for e in entries if Path(e).name not in where]
        if missing:
            raise DataError(
                f"data.labeled_file {path}: {len(missing)} of {len(entries)} names are not in the image folder, "
                f"e.g. {missing[:3]}"
            )
        chosen = [where[Path(e).name] for e in entries]
    else:
        if not all(e.isdigit() for e in entries):
            bad = next(e for e in entries if not e.isdigit())
            raise DataError(f"data.labeled_file {path}: expected one train-split index per line for this dataset, got '{bad}'")
        chosen = [int(e) for e in entries]
        if max(chosen) >= size:
            raise DataError(f"data.labeled_file {path}: index {max(chosen)} is outside the {size} training images")
    return torch.tensor(sorted(set(chosen)), dtype=torch.long)


def corrupt_labels(labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Labels with exactly round(rate * n) of them changed, each to a class drawn uniformly from the
    C - 1 others (CMSF's noisy-label experiment; seeded, done once before training)."""
    g = torch.Generator().manual_seed(seed)
    out = labels.clone()
    known = (labels >= 0).nonzero().squeeze(1).cpu()
    flip = known[torch.randperm(len(known), generator=g)[: round(rate * len(known))]].to(labels.device)
    shift = torch.randint(1, num_classes, (len(flip),), generator=g).to(labels.device)
    out[flip] = (labels[flip] + shift) % num_classes
    return out


def map_labels(labels: torch.Tensor, path: Path, num_classes: int) -> torch.Tensor:
    """Labels through a JSON list ``[parent of class 0, parent of class 1, ...]`` (e.g. CIFAR-100's 20
    super-classes, ImageNet's 93 coarse classes of CMSF Table 5)."""
    if not path.is_file():
        raise DataError(f"data.label_map: file not found: {path}")
    mapping = json.loads(path.read_text())
    if not isinstance(mapping, list) or len(mapping) != num_classes or not all(isinstance(c, int) and c >= 0 for c in mapping):
        raise DataError(f"data.label_map {path}: expected a list of {num_classes} non-negative class indices")
    table = torch.tensor(mapping, dtype=torch.long, device=labels.device)
    return torch.where(labels >= 0, table[labels.clamp_min(0)], labels)


def hide_unlabeled(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Labels with -1 everywhere except at ``keep``."""
    out = torch.full_like(labels, -1)
    out[keep] = labels[keep]
    return out


def save_indices(indices: torch.Tensor, path: Path) -> None:
    path.write_text(json.dumps({"count": len(indices), "indices": indices.tolist()}))


# CIFAR-100's super-class of each of its 100 classes (the dataset's own "coarse_labels"), as SCAN's
# and CoKe's CIFAR-100-20 clustering benchmark uses them; the names are CIFAR-100's coarse_label_names.
CIFAR100_SUPERCLASS = [
    4,
    1,
    14,
    8,
    0,
    6,
    7,
    7,
    18,
    3,
    3,
    14,
    9,
    18,
    7,
    11,
    3,
    9,
    7,
    11,
    6,
    11,
    5,
    10,
    7,
    6,
    13,
    15,
    3,
    15,
    0,
    11,
    1,
    10,
    12,
    14,
    16,
    9,
    11,
    5,
    5,
    19,
    8,
    8,
    15,
    13,
    14,
    17,
    18,
    10,
    16,
    4,
    17,
    4,
    2,
    0,
    17,
    4,
    18,
    17,
    10,
    3,
    2,
    12,
    12,
    16,
    12,
    1,
    9,
    19,
    2,
    10,
    0,
    1,
    16,
    12,
    9,
    13,
    15,
    13,
    16,
    19,
    2,
    4,
    6,
    19,
    5,
    5,
    8,
    19,
    18,
    1,
    2,
    15,
    6,
    0,
    17,
    8,
    14,
    13,
]
CIFAR100_SUPERCLASS_NAMES = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]


def cifar100_superclasses(labels: torch.Tensor) -> torch.Tensor:
    """CIFAR-100 labels (0..99) -> their super-classes (0..19)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= 100):
        raise DataError(f"CIFAR-100 labels must lie in 0..99, got {labels.min().item()}..{labels.max().item()}")
    return torch.tensor(CIFAR100_SUPERCLASS, dtype=torch.long, device=labels.device)[labels]
