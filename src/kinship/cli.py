"""``kinship`` command line: pretrain, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kinship.config import ConfigError, load_config
from kinship.data import DataError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from kinship.runtime import rank
    from kinship.train.trainer import Trainer

    config_path = args.config
    if config_path is None and args.resume:
        config_path = Path(args.out) / "config.yaml"
    config = load_config(config_path, args.set)
    log = print if rank() == 0 else (lambda *_: None)
    summary = Trainer(config, Path(args.out), resume=args.resume, log=log).fit()
    if rank() == 0:
        parts = [f"k-NN top-1 {summary.get('knn_top1', float('nan')):.2f}%"]
        if "knn_pixel_top1" in summary:
            parts.append(f"raw pixels {summary['knn_pixel_top1']:.2f}%")
            parts.append(f"random init {summary['knn_random_init_top1']:.2f}%")
        print(f"done in {summary['minutes']:.1f} min ({summary['epochs_done']} epochs): " + ", ".join(parts))
        print(f"run folder: {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kinship.bench import bench

    result = bench(args.method, args.device, args.backbone, args.batch, args.steps, args.compute_only,
                   compile=args.compile, precision=args.precision, width=args.width)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kinship", description="Representation learning from an image's kin.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a backbone and monitor it with k-NN")
    p.add_argument("--config", help="YAML config (default with --resume: OUT/config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=10")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.set_defaults(func=cmd_pretrain)

    b = sub.add_parser("bench", help="training throughput of one method, as one JSON line")
    b.add_argument("--method", required=True)
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--backbone", default="resnet18", help="resnet18 (CIFAR stem), resnet50 or convnet")
    b.add_argument("--width", type=int, default=32, help="convnet width")
    b.add_argument("--batch", type=int, default=256)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--compute-only", action="store_true", help="fixed augmented views: model step only")
    b.add_argument("--compile", action="store_true")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    b.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"kinship: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from kinship.train.trainer import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(f"kinship: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
