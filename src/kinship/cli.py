"""``kinship`` command line: pretrain, eval, export, views, pack-npz, bench, check-data."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from kinship.errors import ConfigError, DataError, KinshipError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from kinship.assembly import load_config
    from kinship.runtime import rank
    from kinship.train.trainer import Trainer

    config_path = args.config
    if config_path is None:
        config_path = Path(args.out) / "config.yaml"
        if not args.resume:
            raise ConfigError("pretrain needs --config FILE (or --resume to continue the run in --out)")
        if not config_path.is_file():
            raise ConfigError(
                f"--resume without --config: {args.out} has no config.yaml (and so no run to continue); "
                "give --config for the first start: the same command then serves every restart"
            )
    config = load_config(config_path, [*args.set, *(["train.progress=false"] if args.no_progress else [])])
    log = print if rank() == 0 else (lambda *_: None)
    summary = Trainer(
        config, Path(args.out), resume=args.resume, log=log, compile_cache=args.compile_cache, allow_changes=args.allow_changes
    ).fit()
    if rank() == 0:
        parts = [f"k-NN top-1 {summary['knn_top1']:.2f}%" if "knn_top1" in summary else "no k-NN evaluation yet"]
        if "knn_pixel_top1" in summary:
            parts.append(f"raw pixels {summary['knn_pixel_top1']:.2f}%")
            parts.append(f"random init {summary['knn_random_init_top1']:.2f}%")
        print(f"done in {summary['minutes']:.1f} min ({summary['epochs_done']} epochs): " + ", ".join(parts))
        print(f"run folder: {args.out}")
    return 0


def data_overrides(spec: str | None) -> list[str]:
    """``--data`` as config overrides: a dataset name (cifar10, cifar100, stl10, synthetic, ...), an
    .npz file in kinship's CIFAR format, or an ImageFolder root (with train/ and val/ or test/)."""
    if not spec:
        return []
    path = Path(spec).expanduser()
    if spec.endswith(".npz"):
        return ["data.name=cifar10-npz", f"data.path={path}"]
    if path.is_dir():
        test = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
        if (path / "train").is_dir() and test is not None:
            return ["data.name=imagefolder", f"data.path={path / 'train'}", f"data.test_path={test}"]
        raise DataError(f"--data {spec}: an ImageFolder root needs train/ and val/ (or test/) folders of class folders")
    return [f"data.name={spec}", "data.path=''"]  # the data folder's copy


def cmd_eval(args: argparse.Namespace) -> int:
    from kinship.eval.suite import Evaluation

    overrides = data_overrides(args.data) + args.set
    evaluation = Evaluation(args.checkpoint, args.out, overrides, progress=not args.no_progress)
    if args.protocol == "all":
        report = evaluation.run_all()
        print(f"wrote {evaluation.out_dir / 'report.md'} and report.json")
        for name, result in report["protocols"].items():
            print(f"{name}: {result['seconds']:.1f} s")
        return 0
    result = evaluation.run(args.protocol)
    path = evaluation.out_dir / f"eval_{args.protocol}.json"
    path.write_text(json.dumps({**evaluation.header(), args.protocol: result}, indent=2))
    print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kinship.eval.export import export_backbone

    how = export_backbone(args.checkpoint, args.out, args.set)
    print(f"wrote {args.out}; load it with:\n{how}")
    return 0


def cmd_views(args: argparse.Namespace) -> int:
    """A PNG grid: each row one image, first column the original, then the method's views."""
    import torch
    import torchvision

    from kinship.assembly import build_method, load_config
    from kinship.data import Batch, TrainData, load_split
    from kinship.methods import StepInfo

    config = load_config(args.config, args.set)
    data = load_split(config.data, "train")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    # semi-supervised methods: the picked images are the labeled batch too, and the others unlabeled
    method = build_method(config, TrainData.of(data, pick if config.train.labeled_batch_size else None))
    batch = Batch(pick, data.images[pick], data.labels[pick])
    batch.labeled = batch
    views = method.views(batch, StepInfo(0, 0, 1, torch.Generator().manual_seed(args.seed), args.seed))
    size = max(v.shape[-1] for v in views)
    recipe = method.eval_recipe
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    columns = [batch.images.float() / 255] + [(v.float() * std + mean).clamp(0, 1) for v in views]
    columns = [torch.nn.functional.interpolate(c, size=(size, size), mode="nearest") for c in columns]
    grid = torch.stack(columns, dim=1).flatten(0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, args.out, nrow=len(columns), padding=2, pad_value=1.0)
    print(f"wrote {args.out}: {args.images} images x (original + {len(views)} views)")
    return 0


def cmd_pack_npz(args: argparse.Namespace) -> int:
    """The JPEG npz the CPU presets and the demo read, from a torchvision dataset or an ImageFolder."""
    from kinship.config import DataConfig, parse_override
    from kinship.data.home import data_home
    from kinship.data.store import load_split, pack_npz

    overrides = data_overrides(args.source)
    values = {".".join(key): value for key, value in map(parse_override, overrides)}
    name = values.get("data.name", args.source)
    if name == "cifar10-npz":
        raise ConfigError("pack-npz reads cifar10, cifar100, stl10 or an ImageFolder root, not an npz")
    config = DataConfig(
        name=name,
        path=values.get("data.path") or args.root or str(data_home() / "torchvision"),
        test_path=values.get("data.test_path", ""),
        download=args.download,
        image_size=args.image_size,
    )
    train, test = load_split(config, "train"), load_split(config, "test")
    pack_npz(train, test, Path(args.out), args.quality)
    print(
        f"wrote {args.out}: {len(train)} train and {len(test)} test images, {len(train.classes)} classes, "
        f"{train.images.shape[-1]} px, JPEG quality {args.quality}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kinship.bench import bench, loader_bench

    if args.loader_only:
        if not args.data:
            raise ConfigError("bench --loader-only needs --data FOLDER (an ImageFolder root: FOLDER/<class>/<image>)")
        print(
            json.dumps(
                loader_bench(
                    args.data,
                    args.workers,
                    args.batch,
                    args.steps,
                    args.image_size,
                    args.views,
                    device=args.device,
                    decoder=args.decoder,
                )
            )
        )
        return 0
    if not args.method:
        raise ConfigError("bench needs --method NAME (or --loader-only --data FOLDER)")
    result = bench(
        args.method,
        args.device,
        args.backbone,
        args.batch,
        args.steps,
        args.compute_only,
        compile=args.compile,
        precision=args.precision,
        width=args.width,
        overrides=args.set,
        tune_allocator=not args.no_tune_allocator,
        channels_last=not args.no_channels_last,
    )
    print(json.dumps(result))
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    """Exit status 0 when every image decodes, 1 (with one line per bad file) when some do not."""
    from kinship.data.store import list_image_folder
    from kinship.data.stream import check_files

    files, _, classes = list_image_folder(Path(args.path).expanduser())
    bad = check_files(files, progress=not args.no_progress)
    for path, error in bad:
        print(f"{path}: {error}")
    print(f"{len(files) - len(bad)} of {len(files)} images in {len(classes)} classes decode; {len(bad)} do not")
    return 1 if bad else 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train a backbone and monitor it with k-NN")
    p.add_argument("--config", help="YAML config (default with --resume: OUT/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=10")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt, or start the run if OUT has no checkpoint yet (one command for "
        "the first start and every restart)",
    )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: accept config keys changed since the checkpoint beyond those that only say when to "
        "stop, save or log (the run then no longer continues exactly)",
    )
    p.add_argument(
        "--compile-cache",
        type=Path,
        metavar="FILE",
        help="with train.compile: load compiled artifacts from FILE and save them there; torch runs the code "
        "such a file holds, so name only a file you trust (default: this user's ~/.cache/kinship)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (as train.progress=false)")
    p.set_defaults(func=cmd_pretrain)


def add_eval(sub: argparse._SubParsersAction) -> None:
    from kinship.config import Protocol

    e = sub.add_parser(
        "eval", help="evaluate a checkpoint: knn, linear, finetune, clustering, purity, tsne, curves, classifier or all"
    )
    e.add_argument("protocol", choices=["all", *typing.get_args(Protocol)], help="the protocol to run, or all of them")
    e.add_argument("--checkpoint", required=True, help="last.pt of a pretrain run")
    e.add_argument("--data", help="evaluate on other data: cifar10, cifar100, stl10, a .npz file or an ImageFolder root")
    e.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. eval.finetune.epochs=5"
    )
    e.add_argument("--out", help="where the report, figures and feature cache go (default: the checkpoint's folder)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)


def add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="write the pre-trained backbone as a plain torchvision state_dict")
    x.add_argument("--checkpoint", required=True, help="last.pt of a pretrain run")
    x.add_argument("--out", required=True, help="output file, e.g. backbone.pt")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    x.add_argument("--no-progress", action="store_true", help="accepted for symmetry: export shows no progress bar")
    x.set_defaults(func=cmd_export)


def add_views(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("views", help="save a PNG grid of a config's augmented views")
    v.add_argument("--config", required=True, help="YAML config whose method's view recipes are drawn")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    v.add_argument("--out", default="views.png", help="the PNG to write (default: views.png)")
    v.add_argument("--images", type=int, default=8, help="training images, one row each (default: 8)")
    v.add_argument("--seed", type=int, default=0, help="seed of the images and of the augmentation draws")
    v.add_argument("--no-progress", action="store_true", help="accepted for symmetry: views shows no progress bar")
    v.set_defaults(func=cmd_views)


def add_pack_npz(sub: argparse._SubParsersAction) -> None:
    n = sub.add_parser(
        "pack-npz", help="write the JPEG npz the demo and CPU presets read, from torchvision data or an ImageFolder"
    )
    n.add_argument("source", help="cifar10, cifar100, stl10, or an ImageFolder root with train/ and val/ (or test/)")
    n.add_argument(
        "--root", help="torchvision datasets: where they are (or go, with --download); default: the data folder's torchvision/"
    )
    n.add_argument("--download", action="store_true", help="torchvision datasets: download when missing")
    n.add_argument("--image-size", type=int, default=32, help="STL-10 and ImageFolder: stored side length")
    n.add_argument("--quality", type=int, default=75, help="JPEG quality (75: the shared CIFAR-10 file's, same size per image)")
    n.add_argument("--out", required=True, help="the .npz to write")
    n.add_argument("--no-progress", action="store_true", help="accepted for symmetry: torchvision draws its download bar")
    n.set_defaults(func=cmd_pack_npz)


def add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="training throughput of one method, or of the streaming loader alone, as one JSON line")
    b.add_argument("--method", help="the method to time (not with --loader-only)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the step runs (default: cpu)")
    b.add_argument("--backbone", default="convnet", help="convnet (default, the CPU presets'), resnet18 (CIFAR stem) or resnet50")
    b.add_argument("--width", type=int, default=32, help="convnet width (default: 32)")
    b.add_argument("--batch", type=int, default=256, help="global batch (default: 256)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per measure (default: 10)")
    b.add_argument("--compute-only", action="store_true", help="fixed augmented views: model step only")
    b.add_argument("--compile", action="store_true", help="torch.compile the step (train.compile)")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="as train.precision")
    b.add_argument(
        "--no-tune-allocator", action="store_true", help="keep glibc's default malloc thresholds (to measure the tuning)"
    )
    b.add_argument("--no-channels-last", action="store_true", help="keep the default memory format (to measure channels_last)")
    b.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. method.symmetric=false"
    )
    b.add_argument("--no-progress", action="store_true", help="accepted for symmetry: bench shows no progress bar")
    b.add_argument(
        "--loader-only",
        action="store_true",
        help="time the streaming loader alone on --data: source images/s and peak memory (this process and its workers)",
    )
    b.add_argument("--data", help="--loader-only: an ImageFolder root (FOLDER/<class>/<image>)")
    b.add_argument("--workers", type=int, default=8, help="--loader-only: decoding processes")
    b.add_argument("--image-size", type=int, default=224, help="--loader-only: output side of each crop")
    b.add_argument("--views", type=int, default=2, help="--loader-only: random-resized crops per image")
    b.add_argument("--decoder", default="pil", choices=["pil", "nvjpeg"], help="--loader-only: as data.decoder")
    b.set_defaults(func=cmd_bench)


def add_check_data(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("check-data", help="list every image of a folder that does not decode, before a long run")
    c.add_argument("path", help="an ImageFolder root (PATH/<class>/<image>)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_check_data)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="kinship", description="Representation learning from an image's kin.")
    try:
        installed = version("kinship")
    except PackageNotFoundError:  # run from a source tree that was not installed
        installed = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"kinship {installed}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_pretrain, add_eval, add_export, add_views, add_pack_npz, add_bench, add_check_data):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        settings = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
        hint = f"; set config keys with --set: {' '.join(f'--set {s}' for s in settings)}" if settings else ""
        print(f"kinship: error: unrecognized arguments: {' '.join(extra)}{hint}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KinshipError as exc:
        print(f"kinship: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from kinship.runtime import leave_distributed  # the process group a torchrun command joined

        leave_distributed()


if __name__ == "__main__":
    sys.exit(main())
