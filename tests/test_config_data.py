"""Config validation, data loading errors, labeled subsets and the batch plan."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinship.assembly import build_config, load_config
from kinship.data import BatchPlan, DataError, labeled_subset
from kinship.data.store import load_npz, read_image_file
from kinship.errors import ConfigError

from helpers import data_handle


def test_unknown_key_names_it_and_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'epochs'"):
        build_config({"method": {"name": "byol"}, "train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"method.queue_sise.*queue_size"):
        build_config({"method": {"name": "mocov2", "queue_sise": 3}})
    with pytest.raises(ConfigError, match=r"unknown method 'moco'.*mocov2"):
        build_config({"method": {"name": "moco"}})


def test_ill_typed_values_are_errors():
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got 'ten'"):
        build_config({"method": {"name": "byol"}, "train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"crop_scale: expected 2 values"):
        build_config({"method": {"name": "byol", "view1": {"crop_scale": [0.1]}}})
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        build_config({"method": {"name": "byol"}, "optim": {"lr": -1}})


def test_overrides_and_int_to_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: byol}\noptim: {lr: 1}\n")
    config = load_config(path, ["train.epochs=3", "method.view2.solarize_p=0.5"])
    assert config.train.epochs == 3 and config.optim.lr == 1.0 and config.method.view2.solarize_p == 0.5


def test_a_section_overrides_only_the_keys_it_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "method:\n  name: mira\n  local: {mean: [0.485, 0.456, 0.406]}\n  view2: {blur_p: 0.1}\neval:\n  linear: {epochs: 5}\n"
    )
    config = load_config(path, ["method.view1.crop_size=24"])
    local = config.method.local
    assert local.mean == (0.485, 0.456, 0.406)
    assert local.crop_size == 16 and local.crop_scale == (0.05, 0.14)  # MIRA's local-crop defaults kept
    assert config.method.view2.blur_p == 0.1 and config.method.view2.solarize_p == 0.2  # MIRA's view2 default
    assert config.method.view1.crop_size == 24 and config.method.view1.crop_scale == (0.2, 1.0)
    assert config.eval.linear.epochs == 5 and config.eval.linear.milestones == [15, 30]


def test_imagenet_presets_have_96_px_local_crops_with_imagenet_statistics():
    for name in ("cmsf_imagenet_resnet50", "mira_imagenet_resnet50", "mira_imagenet100_resnet18"):
        local = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml", []).method.local
        assert local.crop_size == 96 and local.mean == (0.485, 0.456, 0.406) and local.std == (0.229, 0.224, 0.225), name


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _write_npz(path, blobs):
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    arrays = {"classes": np.array(["a", "b"])}
    for split in ("train", "test"):
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = offsets
        arrays[f"{split}_labels"] = np.arange(len(blobs)) % 2
    np.savez(path, **arrays)


def test_npz_loads_and_corrupt_image_is_named(tmp_path):
    good = [_jpeg((255, 0, 0)), _jpeg((0, 0, 255)), _jpeg((0, 255, 0))]
    _write_npz(tmp_path / "ok.npz", good)
    data = load_npz(tmp_path / "ok.npz", "train", threads=2)
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.images[0, 0].float().mean() > 200 and data.images[1, 2].float().mean() > 200
    _write_npz(tmp_path / "bad.npz", [good[0], b"\xff\xd8 not a jpeg at all", good[2]])
    with pytest.raises(DataError, match=r"cannot decode image 1 of the train split in .*bad.npz"):
        load_npz(tmp_path / "bad.npz", "train", threads=2)
    with pytest.raises(DataError, match="dataset file not found"):
        load_npz(tmp_path / "missing.npz", "train", threads=1)


def test_corrupt_file_in_image_folder_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        read_image_file(bad, 8)


def test_labeled_subset_is_stratified_and_seeded():
    labels = torch.arange(1000) % 10
    a = labeled_subset(labels, per_class=7, seed=3)
    assert len(a) == 70 and torch.bincount(labels[a]).tolist() == [7] * 10
    assert torch.equal(a, labeled_subset(labels, per_class=7, seed=3))
    assert not torch.equal(a, labeled_subset(labels, per_class=7, seed=4))
    b = labeled_subset(labels, fraction=0.1, seed=0)
    assert torch.bincount(labels[b]).tolist() == [10] * 10


def test_batch_plan_ranks_partition_the_global_batch():
    single = BatchPlan(100, 16, seed=5)
    ranks = [BatchPlan(100, 16, seed=5, rank=r, world=2) for r in range(2)]
    for step in range(single.steps_per_epoch):
        assert torch.equal(torch.cat([p.indices(1, step) for p in ranks]), single.indices(1, step))
    seen = torch.cat([single.indices(0, s) for s in range(single.steps_per_epoch)])
    assert len(torch.unique(seen)) == 96  # drop_last, no repeats
    assert not torch.equal(single.indices(0, 0), single.indices(1, 0))


PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_builds_its_method(path):
    from kinship.assembly import build_method

    config = load_config(path)
    if config.model.backbone == "resnet50":  # parse only: ResNet-50 methods with ImageNet banks are large
        return
    method = build_method(config, data_handle(50_000, 100, 32)).eval()
    with torch.no_grad():
        assert method.eval_backbone(torch.zeros(2, 3, 32, 32)).shape == (2, method.backbone.feature_dim)


IDENTITY = {("data", "name"), ("model", "backbone"), ("train", "epochs"), ("train", "batch_size")}


def leaf_keys(values: dict, prefix: tuple = ()) -> list[tuple]:
    return [
        key
        for name, value in values.items()
        for key in (leaf_keys(value, (*prefix, name)) if isinstance(value, dict) else [(*prefix, name)])
    ]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_states_only_what_differs_from_its_defaults(path, tmp_path):
    """Each key a preset writes (but those saying what the run is) changes the parsed config."""
    import copy

    import yaml

    from kinship.config import to_dict

    raw = yaml.safe_load(path.read_text())
    parsed = to_dict(load_config(path))
    restated = []
    for key in leaf_keys({k: v for k, v in raw.items() if k != "extends"}):
        if key in IDENTITY or key == ("method", "name"):
            continue
        trial = copy.deepcopy(raw)
        node = trial
        for part in key[:-1]:
            node = node[part]
        del node[key[-1]]
        if "extends" in trial:
            trial["extends"] = str(path.parent / trial["extends"])
        (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
        try:
            unchanged = to_dict(load_config(tmp_path / "trial.yaml")) == parsed
        except ConfigError:  # the key is needed (another check reads it)
            unchanged = False
        if unchanged:
            restated.append(".".join(key))
    assert not restated, f"{path.name} restates defaults: {', '.join(restated)}"


def test_a_preset_extends_another_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("method: {name: mocov2, momentum: 0.9}\ntrain: {epochs: 3, batch_size: 64}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\ntrain: {epochs: 5}\n")
    config = load_config(tmp_path / "sub" / "child.yaml", ["optim.lr=0.1"])
    assert config.method.momentum == 0.9 and config.train.epochs == 5 and config.train.batch_size == 64
    assert config.optim.lr == 0.1
    (tmp_path / "base.yaml").write_text("extends: sub/child.yaml\nmethod: {name: byol}\n")
    with pytest.raises(ConfigError, match="extends it back"):
        load_config(tmp_path / "sub" / "child.yaml")
    (tmp_path / "sub" / "child.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*extended by"):
        load_config(tmp_path / "sub" / "child.yaml")


def test_a_choice_names_its_options_and_the_nearest():
    with pytest.raises(
        ConfigError, match="method.constraint must be one of none, self, supervised, semi, got 'sefl' .did you mean 'self'"
    ):
        build_config({"method": {"name": "cmsf", "constraint": "sefl"}})


def test_image_folder_images_are_stored_whole_with_their_aspect_ratio(tmp_path):
    """Random-resized crops must be able to reach the borders: the store keeps the whole image."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # a white band at the left border, outside any centre square
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image, aspect = read_image_file(tmp_path / "wide.png", 32)
    assert image.shape == (3, 32, 32) and aspect == 2.0
    assert image[:, :, :2].float().mean() > 200 and image[:, :, 8:].float().mean() < 20


def test_imagenet_presets_evaluate_on_resize_256_center_crop_224():
    from kinship.assembly import build_method

    from helpers import data_handle

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*imagenet*.yaml")):
        config = load_config(path, [])
        method = build_method(config, data_handle(200_000, 1000, 256))
        assert (method.eval_recipe.crop_size, method.eval_recipe.eval_resize) == (224, 256), path.name
        assert config.data.image_size == 256, path.name


def test_mira_imagenet_preset_zero_initialises_residual_branches_and_warms_up_from_0_3():
    from kinship.models.backbones import build_backbone

    config = load_config(Path(__file__).parents[1] / "configs" / "mira_imagenet_resnet50.yaml", [])
    assert config.model.zero_init_residual and config.optim.warmup_start_lr == 0.3
    blocks = [m for m in build_backbone("resnet18", zero_init_residual=True).modules() if hasattr(m, "bn2")]
    assert blocks and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)  # each block starts as identity
    with pytest.raises(ConfigError, match="zero_init_residual applies to ResNet"):
        build_config({"method": {"name": "byol"}, "model": {"backbone": "convnet", "zero_init_residual": True}})


def test_moco_cifar_preset_matches_the_moco_cifar_demo():
    from kinship.assembly import build_method
    from kinship.models.backbones import SplitBatchNorm2d

    from helpers import data_handle

    config = load_config(Path(__file__).parents[1] / "configs" / "mocov2_cifar10_resnet18.yaml", [])
    method = build_method(config, data_handle(50_000, 10, 32))
    norms = [m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, SplitBatchNorm2d) and m.splits == 8 for m in norms)  # both encoders
    assert isinstance(method.head, torch.nn.Sequential) and [type(m) for m in method.head] == [torch.nn.Linear]
    with pytest.raises(ConfigError, match="multiple of model.bn_splits"):
        build_config({"method": {"name": "mocov2"}, "model": {"norm": "split"}, "train": {"batch_size": 100}})
