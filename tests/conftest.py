from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kinship.data.home import OFFLINE_ENV, data_home

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ[OFFLINE_ENV] = "1"  # nothing downloads at test time (spawned processes inherit it)

SHARED_NPZ = data_home() / "cifar10-jpeg.npz"  # CI points KINSHIP_DATA at the shared data folder


@pytest.fixture(scope="session")
def cifar_npz() -> Path:
    """The real CIFAR-10 npz; its tests skip where it is absent, and fail instead under
    KINSHIP_REQUIRE_DATA=1 (CI, where the file is always there: a skip would hide a broken path)."""
    path = Path(os.environ.get("KINSHIP_CIFAR_NPZ", SHARED_NPZ))
    if not path.is_file():
        message = f"CIFAR-10 npz not found at {path} (set KINSHIP_DATA to the folder that holds cifar10-jpeg.npz)"
        if os.environ.get("KINSHIP_REQUIRE_DATA") == "1":
            pytest.fail(message + " (KINSHIP_REQUIRE_DATA=1)")
        pytest.skip(message)
    return path


DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory, cifar_npz) -> tuple[Path, dict]:
    """The demo shortened to 3 epochs on 10,240 real CIFAR-10 images (2,000 test): run folder and summary."""
    from kinship.assembly import load_config
    from kinship.train.trainer import Trainer

    out = tmp_path_factory.mktemp("short_demo")
    config = load_config(
        DEMO,
        [
            f"data.path={cifar_npz}",
            "data.train_limit=10240",
            "data.test_limit=2000",
            "train.epochs=3",
            "train.progress=false",
        ],
    )
    summary = Trainer(config, out, log=lambda *_: None).fit()
    return out, summary


@pytest.fixture(autouse=True, scope="session")
def private_compile_cache(tmp_path_factory):
    """Compiled artifacts of the tests go to a folder of their own, not the user's ~/.cache/kinship."""
    os.environ["KINSHIP_CACHE"] = str(tmp_path_factory.mktemp("kinship_cache"))


@pytest.fixture
def probe_method(monkeypatch):
    """The test method of ``probe.py``, registered as ``probe`` for one test only."""
    from kinship.methods import METHODS

    from probe import Probe

    monkeypatch.setitem(METHODS, "probe", Probe)
