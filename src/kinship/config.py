"""Typed run configuration: YAML files and ``--set key=value`` overrides onto dataclasses.

Every section is a dataclass, so an unknown or ill-typed key is an error that names the key and the
nearest valid one. The ``method`` section is method-specific: :func:`parse_config` takes the table
of method config dataclasses by name (:func:`kinship.assembly.build_config` passes the registry's),
so this module depends on no method. Each method's dataclass checks its own values in
``validate``, when the config is parsed, before any data is read.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from kinship.checkpoint import write_text_atomic
from kinship.errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "parse_config", "read_values", "to_dict", "save_config"]


@dataclass
class DataConfig:
    name: Literal["cifar10-npz", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic"] = "cifar10-npz"
    # npz file, torchvision root or ImageFolder root; empty: the data folder's copy of data.name
    # ($KINSHIP_DATA, else ~/.cache/kinship; cifar10-npz, cifar10, cifar100, stl10), built there on first use
    path: str = ""
    test_path: str = ""  # ImageFolder only: the evaluation split's root
    download: bool = False  # torchvision datasets: download when missing (only when asked)
    image_size: int = (
        32  # STL-10, in-memory ImageFolder: stored side after resize; streamed ImageFolder: side of eval and random-access reads
    )
    train_limit: int = 0  # >0: a seeded random subset of the train split (quick runs)
    test_limit: int = 0  # >0: a seeded random subset of the test split
    labeled_per_class: int = 0  # >0: labeled subset with N images per class
    labeled_fraction: float = 0.0  # >0: labeled subset with this fraction of each class
    # or a labeled subset from a file, one image per line: file names for an ImageFolder (the SimCLR
    # 1 % / 10 % ImageNet splits), else train-split indices (e.g. a run's labeled_indices.json, one per line)
    labeled_file: str = ""
    label_noise: float = 0.0  # >0: this fraction of the training labels changed to another class (seeded)
    superclasses: bool = False  # cifar100: train and evaluate on its 20 super-classes (CIFAR-100-20, CoKe Table 18)
    label_map: str = ""  # JSON list: training label of each class (coarse labels, CMSF Table 5); evaluation keeps the fine ones
    decode_threads: int = 0  # 0: all cores
    # decode each step's batch from the files in DataLoader workers, cropping each view from the original
    # image (kinship.data.stream); null (default): on for imagefolder, off for the in-memory sources
    streaming: bool | None = None
    workers: int = 8  # streaming: decoding processes per training process, alive for the whole run
    prefetch: int = 4  # streaming: batches each worker prepares ahead
    # streaming: pil (each worker decodes its images at the DCT reduction the crops allow and cuts them) |
    # nvjpeg (workers send the JPEG bytes and crop boxes; torchvision.io.decode_jpeg decodes the batch on
    # the training device, nvJPEG on a GPU, and roi_align cuts the crops there)
    decoder: Literal["pil", "nvjpeg"] = "pil"
    # streaming: a file that cannot be read is replaced by the next readable one, logged with its path;
    # the run stops once more than this share of the training images has failed
    max_bad_files: float = 0.001
    # in-memory sources: refuse to decode a split whose uint8 pixels exceed this many GiB (stream an ImageFolder instead)
    memory_budget_gb: float = 32.0

    @property
    def streams(self) -> bool:
        """Whether the train split is streamed from files (``streaming``, by default for an ImageFolder)."""
        return self.name == "imagefolder" if self.streaming is None else self.streaming


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18 | resnet50 | wrn28_2 | wrn28_8 (wrnDEPTH_WIDEN) | convnet
    cifar_stem: bool = True  # 3x3 stride-1 conv1, no max-pool (ResNets)
    stem_padding: int = 1  # of the CIFAR stem's conv1; MIRA's and solo-learn's code use 2 (34 x 34 maps)
    zero_init_residual: bool = False  # ResNets: last BN of each residual block starts at 0 (MIRA's code)
    width: int = 32  # convnet base width
    # none: every BatchNorm of the method (backbone and heads) is an identity. Batch statistics are
    # the one thing that differs between N processes and one process fed the same global batch, so
    # a BN-free run is exactly reproducible across process counts (the distributed tests use it).
    # split: the backbone's BN normalises each process's batch as `bn_splits` sub-batches (the MoCo
    # CIFAR demo's SplitBatchNorm, 8 splits: one GPU imitating 8 GPUs' per-GPU statistics).
    norm: Literal["batch", "none", "split"] = "batch"
    bn_splits: int = 8


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = 0.05  # at batch `lr_batch`; scaled linearly with the global batch
    lr_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = False  # sgd: Nesterov momentum (FixMatch's optimizer)
    weight_decay: float = 5e-4
    # after warm-up: cosine (half a period, lr -> lr * final_lr_ratio) | fixmatch: lr cos(7 pi k / 16 K)
    # (FixMatch, Sec. 4; ends at 0.2 lr)
    schedule: Literal["cosine", "fixmatch"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0  # the warm-up's first rate, absolute (not scaled with the batch)
    final_lr_ratio: float = 0.0  # cosine ends at lr * final_lr_ratio
    lars_eta: float = 0.001
    lars_clip: bool = False  # each layer's LARS rate min(trust, lr) instead of lr * trust (LARC clip, solo-learn clip_lr)
    exclude_bias_bn: bool = False  # no weight decay (and no LARS adaptation) on biases and norms
    betas: tuple[float, float] = (0.9, 0.999)  # adamw


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch, split over processes
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    channels_last: bool = True
    compile: bool = False  # torch.compile the method's forward (the step's loss)
    compile_backend: str = "inductor"  # inductor | eager (dynamo's tracing alone: checks graph breaks fast) | ...
    # reduce-overhead: CUDA graphs
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    sync_bn: bool = True  # under DDP on GPU
    # a collective that waits longer than this (a process died, a node hangs) ends the run with an error
    dist_timeout_min: float = 30.0
    # repeatable GPU runs: cuDNN's deterministic kernels (no autotuning), torch's deterministic algorithms
    # (index_add_, scatter_add_, ... on CUDA) and deterministic cuBLAS; slower. A CPU run is repeatable already
    deterministic: bool = False
    checkpoint_every: int = 1  # epochs
    # for jobs interrupted more often than an epoch lasts: also checkpoint every N steps and/or every
    # N minutes (mid-epoch checkpoints resume exactly, like epoch ones)
    checkpoint_every_steps: int = 0
    checkpoint_every_min: float = 0.0
    time_limit_min: float = 0.0  # >0: stop training (checkpointed) after this many minutes
    stop_after_epochs: int = 0  # >0: stop (checkpointed) after this epoch; --resume continues the schedule
    stop_after_steps: int = 0  # >0: stop (checkpointed) after this many steps in all, mid-epoch or not
    # >0: an epoch is this many steps (FixMatch-style papers: 1,024), the batches running on through
    # seeded passes over the data; 0: an epoch is one pass
    steps_per_epoch: int = 0
    # a labeled batch beside every unlabeled one (semi-supervised methods): global size, drawn from
    # the labeled images in seeded passes that wrap around as often as needed; 0: none
    labeled_batch_size: int = 0
    # a checkpoint written by N processes resumes on N processes; true also allows another number
    # (state is global, but per-process BN statistics then see other shards: not bit-exact)
    allow_resharding: bool = False
    log_every: int = 20  # steps between metrics lines
    progress: bool = True
    # where the records go: jsonl (metrics.jsonl, always: resume and `kinship eval` read it), csv
    # (metrics.csv), tensorboard (tensorboard/; pip install tensorboard), wandb (offline unless
    # WANDB_MODE says otherwise; pip install wandb)
    loggers: list[Literal["jsonl", "csv", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    # a linear classifier on the detached features of each step's first view, trained beside the
    # method (its accuracy before each update, per epoch: online_probe_top1); off under train.compile
    online_probe: bool = True


@dataclass
class LinearEvalConfig:
    """``kinship eval linear``: the fast probe on cached features, or the papers' SGD probe on images."""

    mode: Literal["lbfgs", "sgd"] = "lbfgs"  # lbfgs: full-batch logistic regression on cached features (CIFAR scale)
    l2_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    val_fraction: float = 0.1  # held-out share of train that picks the l2 coefficient
    max_iter: int = 300  # L-BFGS iterations per fit
    # mode sgd: CMSF's protocol (after CompRess): l2-normalised, standardised features, one Linear,
    # RRC + flip, SGD lr 0.01, momentum 0.9, wd 1e-4, batch 256, 40 epochs, x0.1 at 15 and 30
    epochs: int = 40
    lr: float = 0.01
    weight_decay: float = 1e-4
    batch_size: int = 256
    milestones: list[int] = field(default_factory=lambda: [15, 30])  # empty: cosine
    crop_scale: tuple[float, float] = (0.08, 1.0)


@dataclass
class FinetuneEvalConfig:
    """``kinship eval finetune``: the whole network fine-tuned on a seeded labeled subset.

    Defaults follow MIRA's semi-supervised protocol for 10 % labels (backbone lr 0.02, classifier
    lr 0.1, SGD, cosine, batch 256, 20 epochs) with random-resized-crop and flip only (CLIM). The
    classifier starts from the frozen linear probe fitted on the same subset ("LP-FT", kinship's choice), with
    CMSF's head (l2-norm, standardise, Linear), so the fine-tuning is measured against that probe.
    """

    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])  # of each class
    per_class: list[int] = field(default_factory=list)  # or N labels per class
    epochs: int = 20
    batch_size: int = 256
    lr_backbone: float = 0.02  # at batch 256, scaled linearly
    lr_head: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    # for 32-96 px images: RRC(0.5, 1) fine-tuned the demo to 63.4% at 10% labels where the
    # ImageNet default RRC(0.08, 1) gave 60.3%; ImageNet presets set (0.08, 1)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    head_init: Literal["probe", "random"] = "probe"  # random: N(0, 0.01)
    seed: int = 0


Protocol = Literal["knn", "linear", "finetune", "clustering", "purity", "tsne", "curves", "classifier"]


@dataclass
class EvalConfig:
    knn_k: int = 200  # training monitor: weighted k-NN of the MoCo CIFAR demo (k 200, T 0.1)
    knn_temperature: float = 0.1
    knn_every: int = 10  # epochs; the last epoch is always evaluated
    classifier_every: int = 1  # epochs between test evaluations of a method's own classifiers (FixMatch: every epoch)
    knn_train_limit: int = 0  # >0: size of the k-NN feature bank (a seeded subset of train); streaming data: 0 means 10,000
    baselines: bool = True  # also k-NN on raw pixels and on the randomly initialised network
    # >0: the raw-pixel baseline on this many bank and test images (seeded); streaming data: 0 means 1,000
    # (a 224 px evaluation view is 600 KB of float pixels per image)
    baseline_limit: int = 0
    batch_size: int = 512
    # `kinship eval`: weighted k-NN settings (DINO/MIRA k 20 T 0.07; MoCo demo k 200 T 0.1) and the
    # plain majority vote of CMSF/MSF ("NN", "20-NN")
    knn_protocols: list[tuple[int, float]] = field(default_factory=lambda: [(20, 0.07), (200, 0.1)])
    knn_plain_k: list[int] = field(default_factory=lambda: [1, 20])
    purity_k: list[int] = field(default_factory=lambda: [1, 10, 20, 50, 100, 200])
    clustering_k: int = 0  # clusters of the k-means protocol; 0: the number of classes
    clustering_restarts: int = 10
    tsne_points: int = 2000  # test images in the t-SNE picture
    protocols: list[Protocol] = field(default_factory=lambda: list(typing.get_args(Protocol)))  # what `kinship eval all` runs
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    finetune: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)


@dataclass
class AugmentConfig:
    """One augmentation recipe; methods choose how many views of which recipe they need."""

    crop_size: int = 32
    # resized: RandomResizedCrop(crop_scale, crop_ratio) | pad: FixMatch's weak view, a translation by
    # up to `pad` px (reflect-padded RandomCrop) of the image resized to crop_size
    crop_mode: Literal["resized", "pad"] = "resized"
    pad: int = 4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    randaugment: int = 0  # RandAugment operations per image, random magnitude (FixMatch's strong view: 2)
    cutout: float = 0.0  # >0: a Cutout square of this fraction of the side, last (FixMatch: 0.5, 16 px at 32)
    # the evaluation view: >0 Resize(eval_resize) of the shorter side + CenterCrop(crop_size), as
    # the ImageNet papers' code (256, 224); 0: the whole image resized to crop_size (CIFAR, STL-10)
    eval_resize: int = 0
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


@dataclass
class MethodConfig:
    """Base of every method's own config dataclass (registered in :mod:`kinship.methods`)."""

    name: str = ""
    needs_labeled_batch: typing.ClassVar[bool] = False  # a labeled batch beside every unlabeled one (semi-supervised)

    def validate(self, run: "RunConfig") -> None:
        """Raise :class:`ConfigError` for values of this section (or combinations with the rest of
        the run config) that cannot work; called when the config is parsed, before data is read."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _nearest(key: str, options: list[str], hint: bool = True) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid keys: {', '.join(sorted(options))})" if hint else ""


def _coerce(value: Any, hint: Any, where: str, default: Any = None) -> Any:
    """Check ``value`` against a type hint, converting only where no information is lost. A mapping
    for a dataclass section overrides the keys it names on ``default`` (the section's default)."""
    origin = typing.get_origin(hint)
    if origin is Literal:  # a choice: the one place its options are written
        choices = [str(choice) for choice in typing.get_args(hint)]
        if value not in typing.get_args(hint):
            nearest = _nearest(str(value), choices, hint=False)
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}{nearest}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where, default)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the scalar type ``hint`` (bool, int, float, str or Any)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    else:
        raise ConfigError(f"{where}: unsupported type {hint}")
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, values: dict, where: str, base: Any = None) -> Any:
    """``cls`` with the keys of ``values`` set on ``base`` (default: ``cls()``); a nested section
    merges into the base's section the same way, so the keys a YAML section leaves out keep their
    defaults (e.g. MIRA's ``local:`` crop size when a preset sets only its normalisation)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    base = cls() if base is None else base
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path, getattr(base, key))
    return dataclasses.replace(base, **kwargs)


def parse_config(values: dict, method_configs: Mapping[str, type[MethodConfig]]) -> RunConfig:
    """Turn a nested dict (from YAML) into a validated :class:`RunConfig`; ``method_configs`` maps
    each ``method.name`` to its config dataclass."""
    values = dict(values)
    train = values.get("train")
    if isinstance(train, dict) and "compile_cache" in train:  # a key of earlier releases, in their saved config.yaml
        if train["compile_cache"]:
            raise ConfigError(
                "train.compile_cache is no longer read from a config: torch runs the code such a file "
                "holds, so name a file you trust on the command line (kinship pretrain --compile-cache FILE)"
            )
        values["train"] = {k: v for k, v in train.items() if k != "compile_cache"}
    method_values = dict(values.pop("method", None) or {})
    if "name" not in method_values:
        raise ConfigError("config key 'method.name' is required")
    name = method_values["name"]
    if name not in method_configs:
        raise ConfigError(
            f"unknown method '{name}'{_nearest(name, list(method_configs), hint=False)}; "
            f"the methods: {', '.join(sorted(method_configs))}"
        )
    config = _build(RunConfig, values, "")
    config.method = _build(method_configs[name], method_values, "method")
    validate(config)
    config.method.validate(config)
    return config


BACKBONES = "resnet18, resnet34, resnet50, wrnDEPTH_WIDEN (wrn28_2, wrn28_8) or convnet"


def known_backbone(name: str) -> bool:
    """Whether ``model.backbone`` names one of :data:`BACKBONES` (kinship.models.backbones builds them)."""
    return name in ("resnet18", "resnet34", "resnet50", "convnet") or (
        name.startswith("wrn") and name.count("_") == 1 and name[3:].replace("_", "").isdigit()
    )


def _model_checks(config: RunConfig) -> list[tuple[bool, str]]:
    return [
        (known_backbone(config.model.backbone), f"unknown model.backbone '{config.model.backbone}' (choose {BACKBONES})"),
        (
            config.model.norm != "split"
            or (config.model.bn_splits >= 1 and config.train.batch_size % config.model.bn_splits == 0),
            f"model.norm split: train.batch_size ({config.train.batch_size}) must be a multiple of "
            f"model.bn_splits ({config.model.bn_splits})",
        ),
        (
            not config.model.zero_init_residual or config.model.backbone.startswith("resnet"),
            "model.zero_init_residual applies to ResNet backbones only",
        ),
    ]


def compile_backends() -> list[str]:
    """The names ``torch.compile`` accepts as a backend (dynamo imported only when asked)."""
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


def _train_checks(config: RunConfig) -> list[tuple[bool, str]]:
    backend = config.train.compile_backend
    backends = compile_backends() if config.train.compile else [backend]  # dynamo only for a compiled run
    return [
        (
            backend in backends,
            f"train.compile_backend '{backend}' is not a torch.compile backend{_nearest(backend, backends)}",
        ),
        (config.train.epochs >= 1, "train.epochs must be >= 1"),
        (
            min(
                config.train.checkpoint_every,
                config.train.checkpoint_every_steps,
                config.train.stop_after_steps,
                config.train.stop_after_epochs,
                config.train.labeled_batch_size,
                config.train.steps_per_epoch,
            )
            >= 0
            and min(config.train.checkpoint_every_min, config.train.time_limit_min) >= 0,
            "train.checkpoint_every*, stop_after_*, time_limit_min, labeled_batch_size and steps_per_epoch must be >= 0",
        ),
        (config.train.log_every >= 1, "train.log_every must be >= 1"),
        ("jsonl" in config.train.loggers, "train.loggers must keep jsonl: resume and kinship eval read metrics.jsonl"),
        (config.train.batch_size >= 2, "train.batch_size must be >= 2"),
        (config.train.dist_timeout_min > 0, "train.dist_timeout_min must be > 0"),
    ]


def _optim_checks(config: RunConfig) -> list[tuple[bool, str]]:
    return [
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (
            config.optim.warmup_start_lr >= 0 and config.optim.warmup_epochs >= 0,
            "optim.warmup_start_lr and warmup_epochs must be >= 0",
        ),
        (not config.optim.nesterov or config.optim.name == "sgd", "optim.nesterov is for optim.name: sgd"),
    ]


def _data_checks(config: RunConfig) -> list[tuple[bool, str]]:
    return [
        (
            sum(map(bool, (config.data.labeled_per_class, config.data.labeled_fraction, config.data.labeled_file))) <= 1,
            "set only one of data.labeled_per_class, data.labeled_fraction and data.labeled_file",
        ),
        (0.0 <= config.data.labeled_fraction <= 1.0, "data.labeled_fraction must be in [0, 1]"),
        (0.0 <= config.data.label_noise < 1.0, "data.label_noise must be in [0, 1)"),
        (
            not config.data.superclasses or config.data.name == "cifar100",
            "data.superclasses is for data.name: cifar100 (CIFAR-100-20)",
        ),
        (not config.data.streaming or config.data.name == "imagefolder", "data.streaming is for data.name: imagefolder"),
        (config.data.workers >= 0 and config.data.prefetch >= 1, "data.workers must be >= 0 and data.prefetch >= 1"),
        (
            config.data.decoder == "pil" or config.data.streams,
            "data.decoder nvjpeg is for streamed data (data.name: imagefolder)",
        ),
        (0.0 <= config.data.max_bad_files < 1.0, "data.max_bad_files (a share of the training images) must be in [0, 1)"),
        (config.data.memory_budget_gb > 0, "data.memory_budget_gb must be > 0"),
    ]


def _eval_checks(config: RunConfig) -> list[tuple[bool, str]]:
    return [
        (config.eval.knn_k >= 1, "eval.knn_k must be >= 1"),
        (config.eval.knn_temperature > 0, "eval.knn_temperature must be > 0"),
        (all(0 < f <= 1 for f in config.eval.finetune.fractions), "eval.finetune.fractions must lie in (0, 1]"),
        (all(n >= 1 for n in config.eval.finetune.per_class), "eval.finetune.per_class must be >= 1"),
        (all(k >= 1 and t > 0 for k, t in config.eval.knn_protocols), "eval.knn_protocols: each entry is [k >= 1, T > 0]"),
        (
            config.eval.clustering_k >= 0 and config.eval.clustering_restarts >= 1,
            "eval.clustering_k must be >= 0 and eval.clustering_restarts >= 1",
        ),
        (
            config.eval.baseline_limit >= 0 and config.eval.knn_train_limit >= 0,
            "eval.baseline_limit and eval.knn_train_limit must be >= 0",
        ),
    ]


def validate(config: RunConfig) -> None:
    """Value checks that types alone cannot express, section by section."""
    for checks in (_model_checks, _train_checks, _optim_checks, _data_checks, _eval_checks):
        for ok, message in checks(config):
            if not ok:
                raise ConfigError(message)


def to_dict(config: Any) -> dict:
    out = dataclasses.asdict(config)

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(out)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: the value is not valid YAML: {str(exc).splitlines()[0]}") from None


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of ``values`` with each ``key.path=value`` set (the input stays untouched)."""
    values = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
        node[path[-1]] = value
    return values


def read_values(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The YAML file's mapping (empty without a file), merged onto the file it ``extends`` (a path
    relative to it), with the ``--set`` overrides applied."""
    values = _read_preset(Path(path), ()) if path is not None else {}
    return apply_overrides(values, list(overrides))


def _read_preset(path: Path, children: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {children[-1]})" if children else ""))
    if path.resolve() in children:
        raise ConfigError(f"{children[-1]} extends {path}, which extends it back")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends names one config file, got {parent!r}")
    return _merged(_read_preset(path.parent / parent, (*children, path.resolve())), values)


def _merged(base: dict, values: dict) -> dict:
    """``base`` with ``values`` set on it, section by section (lists and scalars replaced)."""
    out = dict(base)
    for key, value in values.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_config(config: RunConfig, path: Path) -> None:
    write_text_atomic(yaml.safe_dump(to_dict(config), sort_keys=False), path)
