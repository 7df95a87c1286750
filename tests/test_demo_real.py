"""On the real shared CIFAR-10: a shortened demo learns, and its evaluation protocols behave."""

import pytest

from kinship.eval.suite import Evaluation

pytestmark = pytest.mark.slow  # training on real CIFAR-10


def test_short_demo_beats_random_init(short_demo):
    _, summary = short_demo
    margin = summary["knn_top1"] - summary["knn_random_init_top1"]
    assert margin >= 5.0, summary


def test_finetuning_beats_the_frozen_probe_on_a_small_real_subset(short_demo, tmp_path):
    """Mean over 3 seeds (subset and fine-tuning): one seed of a 3-epoch backbone fine-tuned on 1,000
    images is not stable enough to decide (on one 2-core machine seed 0 lost 4.9 points where
    seeds 1 and 2 gained 6.9 and 6.2)."""
    run, _ = short_demo
    gains = []
    for seed in range(3):
        settings = ["eval.finetune.fractions=[]", "eval.finetune.per_class=[100]", f"eval.finetune.seed={seed}"]
        result = Evaluation(run / "last.pt", tmp_path, settings, progress=False, log=lambda *_: None).run("finetune")
        row = result["settings"][0]
        assert row["images"] == 1000
        gains.append(row["top1"] - row["frozen_probe_top1"])
    assert sum(gains) / len(gains) >= 1.0, gains
