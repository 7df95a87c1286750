"""A shortened demo on the real shared CIFAR-10 beats k-NN on the randomly initialised network."""
from pathlib import Path

from kinship.config import load_config
from kinship.train.trainer import Trainer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_short_demo_beats_random_init(tmp_path, cifar_npz):
    config = load_config(DEMO, [
        f"data.path={cifar_npz}", "data.train_limit=10240", "data.test_limit=2000",
        "train.epochs=3", "train.progress=false",
    ])
    summary = Trainer(config, tmp_path, log=lambda *_: None).fit()
    margin = summary["knn_top1"] - summary["knn_random_init_top1"]
    assert margin >= 5.0, summary
