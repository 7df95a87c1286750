"""`kinship eval` and `kinship export` end to end on tiny checkpoints: report, cache, export, errors."""

import json

import pytest
import torch
from PIL import Image

from kinship.assembly import RunData, build_config, build_method
from kinship.blocks.features import extract_features
from kinship.checkpoint import save_atomic
from kinship.cli import main
from kinship.config import to_dict
from kinship.data import DataError, DataInfo, ImageSet, TrainData
from kinship.errors import CheckpointError
from kinship.eval.export import export_backbone
from kinship.eval.metrics import clustering_scores
from kinship.eval.suite import Evaluation, check_labels
from kinship.train.trainer import Trainer

from helpers import tiny_run_config

EVAL_SETTINGS = [
    "eval.finetune.fractions=[0.25]",
    "eval.finetune.epochs=2",
    "eval.finetune.batch_size=32",
    "eval.linear.l2_grid=[1e-4,1e-2]",
    "eval.clustering_restarts=2",
    "eval.tsne_points=100",
    "eval.purity_k=[1,5,10]",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    Trainer(build_config(tiny_run_config(**{"train.epochs": 1})), out, log=lambda *_: None).fit()
    return out / "last.pt"


def quiet_eval(path, out, extra=()):
    return Evaluation(path, out, EVAL_SETTINGS + list(extra), progress=False, log=lambda *_: None)


def test_report_end_to_end(tiny_checkpoint, tmp_path):
    report = quiet_eval(tiny_checkpoint, tmp_path).run_all()
    p = report["protocols"]
    assert set(p) == {"knn", "linear", "finetune", "clustering", "purity", "tsne", "curves", "classifier"}
    assert "no classifier of its own" in p["classifier"]["skipped"]  # MoCo v2
    assert [(r["k"], r["T"]) for r in p["knn"]["weighted"]] == [(20, 0.07), (200, 0.1)]
    assert all(0 <= r["top1"] <= 100 for r in p["knn"]["weighted"] + p["knn"]["plain"])
    assert p["linear"]["mode"] == "lbfgs" and 0 <= p["linear"]["top1"] <= 100
    assert p["finetune"]["settings"][0]["images"] == 64  # 25% of 64 images in each of 4 classes
    assert json.loads((tmp_path / "finetune_25pct_indices.json").read_text())["count"] == 64
    assert {r["clustering"] for r in p["clustering"]["rows"]} == {"k-means (spherical, fit on train)"}
    assert set(p["purity"]["purity"]) == {"1", "5", "10"}
    for name in ("tsne.png", "curves.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()  # a valid PNG
        assert f"]({name})" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["protocols"]["knn"] == p["knn"] and saved["sha256"] == report["sha256"]
    assert all(r["seconds"] >= 0 for r in p.values())


def test_features_are_cached_by_checkpoint_hash(tiny_checkpoint, tmp_path):
    first = quiet_eval(tiny_checkpoint, tmp_path)
    f1 = first.features()
    second = quiet_eval(tiny_checkpoint, tmp_path)
    f2 = second.features()
    assert not f1.cached and f2.cached
    assert torch.equal(f1.train, f2.train) and torch.equal(f1.test, f2.test)
    assert second.run("knn") | {"seconds": 0} == first.run("knn") | {"seconds": 0}
    # another checkpoint (other weights) gets another cache entry
    state = torch.load(tiny_checkpoint, weights_only=True)
    for value in state["method"].values():
        if value.is_floating_point():
            value.mul_(0.5)
    other = tmp_path / "other.pt"
    save_atomic(state, other)
    assert quiet_eval(other, tmp_path).cache_path() != first.cache_path()


def test_sgd_linear_probe_runs_on_images(tiny_checkpoint, tmp_path):
    result = quiet_eval(
        tiny_checkpoint,
        tmp_path,
        ["eval.linear.mode=sgd", "eval.linear.epochs=3", "eval.linear.batch_size=64", "eval.linear.milestones=[2]"],
    ).run("linear")
    assert result["mode"] == "sgd" and 0 <= result["top1"] <= 100 and result["final_loss"] > 0


def test_cluster_head_argmax_is_reported(tiny_checkpoint, tmp_path, monkeypatch):
    from kinship.methods.mocov2 import MoCoV2

    # a stand-in prototype head: the argmax over the first 3 feature dimensions
    monkeypatch.setattr(MoCoV2, "cluster_scores", lambda self, features: features[:, :3], raising=False)
    evaluation = quiet_eval(tiny_checkpoint, tmp_path)
    rows = evaluation.run("clustering")["rows"]
    head = [r for r in rows if r["clustering"] == "method head argmax"]
    predicted = evaluation.features().test[:, :3].argmax(1)
    expected = clustering_scores(evaluation.data.test.labels.cpu(), predicted.cpu())
    assert len(head) == 1 and head[0]["k"] == 3 and head[0]["occupied"] == len(predicted.unique())
    assert head[0]["acc"] == pytest.approx(expected["acc"]) and head[0]["nmi"] == pytest.approx(expected["nmi"])
    cached = quiet_eval(tiny_checkpoint, tmp_path).run("clustering")["rows"]  # from the feature cache
    assert [r for r in cached if r["clustering"] == "method head argmax"] == head


def _checkpoint_of(tmp_path, **model):
    config = build_config(tiny_run_config(**{f"model.{k}": v for k, v in model.items()}))
    info = DataInfo(256, 4, 16)
    method = build_method(config, TrainData.describe(info))
    g = torch.Generator().manual_seed(0)
    for name, buffer in method.named_buffers():  # trained-looking BN statistics
        if "running_mean" in name or "running_var" in name:
            buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
    path = tmp_path / "ckpt.pt"
    save_atomic({"config": to_dict(config), "method": method.state_dict(), "data_info": info.__dict__}, path)
    return path, method


@pytest.mark.parametrize("cifar_stem,stem_padding", [(True, 1), (True, 2), (False, 1)])
def test_exported_backbone_loads_into_torchvision_with_same_features(tmp_path, cifar_stem, stem_padding):
    path, method = _checkpoint_of(tmp_path, backbone="resnet18", cifar_stem=cifar_stem, stem_padding=stem_padding)
    how = export_backbone(path, tmp_path / "backbone.pt")
    namespace = {}
    exec(how, namespace)  # the printed loading lines, as a user runs them (strict load)
    model = namespace["model"].eval()
    assert model.conv1.padding == ((stem_padding,) * 2 if cifar_stem else (3, 3))
    images = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    recipe = method.eval_recipe
    ours = extract_features(method.eval_backbone, images, recipe)
    from kinship.augment.views import center_view

    with torch.no_grad():
        theirs = model(center_view(images, recipe).contiguous())
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_checkpoint_errors_name_the_problem(tiny_checkpoint, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        quiet_eval(junk, tmp_path)
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a kinship pre-training checkpoint"):
        quiet_eval(plain, tmp_path)
    with pytest.raises(CheckpointError, match=r"backbone convnet \(width 8.*backbone convnet \(width 16"):
        quiet_eval(tiny_checkpoint, tmp_path, ["model.width=16"])
    with pytest.raises(DataError, match="nope.npz"):
        quiet_eval(tiny_checkpoint, tmp_path, ["data.name=cifar10-npz", f"data.path={tmp_path / 'nope.npz'}"])


def test_label_sets_must_match():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    train = ImageSet(images, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    test = ImageSet(images, torch.tensor([0, 1, 2, 2]), ["a", "b"])
    with pytest.raises(DataError, match=r"labels \[2\].*do not match"):
        check_labels(RunData(TrainData(DataInfo(4, 2, 8), train.labels), train, test, train))
    renamed = ImageSet(images, torch.tensor([0, 1, 0, 1]), ["a", "c"])
    with pytest.raises(DataError, match="different classes"):
        check_labels(RunData(TrainData(DataInfo(4, 2, 8), train.labels), train, renamed, train))


def test_cli_eval_and_export(tiny_checkpoint, tmp_path, capsys):
    code = main(["eval", "knn", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["weighted"]) == 2 and (tmp_path / "eval_knn.json").is_file()
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "b.pt")]) == 0
    assert "build_backbone('convnet', width=8)" in capsys.readouterr().out
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_a_protocol_that_cannot_run_is_skipped_with_its_reason(tiny_checkpoint, tmp_path, monkeypatch):
    def no_images(self):
        raise DataError("semi-supervised fine-tuning needs the train split in memory")

    monkeypatch.setattr(Evaluation, "finetune", no_images)
    alone = tmp_path / "alone.pt"  # no metrics.jsonl beside it: no curves either
    alone.write_bytes(tiny_checkpoint.read_bytes())
    report = quiet_eval(alone, tmp_path, ["eval.protocols=[knn,finetune,curves]"]).run_all()
    assert "needs the train split" in report["protocols"]["finetune"]["skipped"]
    assert "no metrics.jsonl" in report["protocols"]["curves"]["skipped"]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Skipped" in markdown and "- finetune: semi-supervised" in markdown and "## k-NN" in markdown
