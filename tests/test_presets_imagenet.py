"""Every ImageNet preset runs as shipped on a small synthetic ImageFolder, streamed, to a checkpoint:
only the data paths, a small backbone and batch, a two-step stop and the sizes a folder of a hundred
images cannot hold are changed."""

from pathlib import Path

import pytest

from kinship import checkpoint
from kinship.assembly import load_config
from kinship.data.store import write_image_folder
from kinship.train.trainer import Trainer

pytestmark = pytest.mark.slow  # every ImageNet preset streamed to a checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*imagenet*.yaml"))
SMALL = {  # what a folder of 96 images cannot hold
    "clim": ["method.clusters=4"],
    "cmsf": ["method.bank_size=64"],
    "sscl": ["train.labeled_batch_size=8"],  # and data.labeled_file, below
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageNet-shaped JPEGs (about 160 x 120 px, shapes varying): train 4 x 24, val 4 x 4, and a
    labeled-split file naming 2 images per class."""
    root = tmp_path_factory.mktemp("imagenet")
    files = write_image_folder(root / "train", classes=4, per_class=24, width=160, height=120, seed=0, quality=80)
    write_image_folder(root / "val", classes=4, per_class=4, width=160, height=120, seed=1, quality=80)
    (root / "labeled.txt").write_text("".join(f"{p.name}\n" for p in files if int(p.stem.split("_")[1]) < 2))
    return root


def test_there_are_imagenet_presets():
    assert len(PRESETS) >= 10


@pytest.mark.parametrize("preset", PRESETS)
def test_imagenet_preset_runs_streamed_to_a_checkpoint(folder, tmp_path, preset):
    config = load_config(
        CONFIGS / preset,
        [
            f"data.path={folder / 'train'}",
            f"data.test_path={folder / 'val'}",
            "model.backbone=convnet",
            "model.width=8",
            "model.zero_init_residual=false",  # a small backbone (not a ResNet)
            "train.batch_size=16",
            "train.stop_after_steps=2",
            "train.progress=false",
            *([f"data.labeled_file={folder / 'labeled.txt'}"] if "labeled_file" in (CONFIGS / preset).read_text() else []),
            *SMALL.get(preset.split("_")[0], []),
        ],
    )
    assert config.data.streams and config.model.cifar_stem is False
    summary = Trainer(config, tmp_path / "run", log=lambda *_: None).fit()
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["position"][2] == 2 and summary["steps_done"] == 2 and 0 <= summary["knn_top1"] <= 100
