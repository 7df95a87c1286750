"""The command line: clear errors with exit codes, and the views picture."""
import yaml
from PIL import Image

from conftest import tiny_run_config
from kinship.cli import main


def test_unknown_key_exits_2_with_message(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config()))
    assert main(["pretrain", "--config", str(config), "--set", "train.epoch=3", "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'train.epoch' (did you mean 'epochs'?)" in capsys.readouterr().err


def test_missing_dataset_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    values = tiny_run_config()
    values["data"] = {"name": "cifar10-npz", "path": str(tmp_path / "nope.npz")}
    config.write_text(yaml.safe_dump(values))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "dataset file not found" in capsys.readouterr().err


def test_views_picture(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config()))
    out = tmp_path / "views.png"
    assert main(["views", "--config", str(config), "--out", str(out), "--images", "4"]) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 18 + 2, 4 * 18 + 2)  # original + 2 views, 4 rows, 16 px tiles, 2 px padding
