"""The data folder: where kinship keeps the datasets it knows by name, and builds them on first use.

``$KINSHIP_DATA`` names it, else ``~/.cache/kinship``. A config that leaves ``data.path`` empty reads
its dataset there: ``cifar10-npz`` is the file ``cifar10-jpeg.npz`` (packed from torchvision's
CIFAR-10 on first use: a 170 MB download, with a progress bar), ``cifar10`` / ``cifar100`` / ``stl10``
are torchvision's files under ``torchvision/`` (downloaded on first use; :mod:`kinship.data.store`
builds and reads them). Offline, the first use stops with one line naming the file to put there.
"""

from __future__ import annotations

import os
from pathlib import Path

from kinship.config import DataConfig
from kinship.errors import DataError

DATA_ENV = "KINSHIP_DATA"
OFFLINE_ENV = "KINSHIP_OFFLINE"  # 1: never download (the tests set it)
PACKED = {"cifar10-npz": ("cifar10", "cifar10-jpeg.npz")}  # name -> (torchvision source, file in the data folder)
TORCHVISION = ("cifar10", "cifar100", "stl10")


def data_home() -> Path:
    """``$KINSHIP_DATA``, else ``~/.cache/kinship``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "kinship").expanduser()


def managed(config: DataConfig) -> bool:
    """Whether the data folder holds (and may build) this config's dataset: ``data.path`` left empty."""
    return not config.path and (config.name in PACKED or config.name in TORCHVISION)


def downloads_allowed() -> bool:
    return os.environ.get(OFFLINE_ENV, "") in ("", "0")


def dataset_path(config: DataConfig) -> Path:
    """``data.path``, or where the data folder keeps ``data.name``'s files."""
    if config.path:
        return Path(config.path).expanduser()
    if config.name in PACKED:
        return data_home() / PACKED[config.name][1]
    if config.name in TORCHVISION:
        return data_home() / "torchvision"
    raise DataError(f"data.name {config.name} reads data.path (an ImageFolder root): set it")
