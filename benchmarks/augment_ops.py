"""Time the augmentation pipeline on CPU: two views of MoCo's recipe for a batch of CIFAR-sized images,
eager and with the views' transforms compiled as one graph (``train.compile``; compile time reported
apart), and the ops the eager views dispatch.

    python benchmarks/augment_ops.py [--batch 256] [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kinship.augment.views import compiled_views, make_views
from kinship.config import AugmentConfig
from kinship.data import Batch
from kinship.dispatch import OpLog
from kinship.runtime import environment, tune_cpu_allocator


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    batch = Batch(torch.arange(args.batch), images, torch.zeros(args.batch, dtype=torch.long))
    recipe = AugmentConfig(crop_scale=(0.08, 1.0), saturation=0.4, hue=0.1)  # MoCo v2's CIFAR views
    views = lambda: make_views(batch, [recipe, recipe], g)  # noqa: E731
    two_views = median_ms(views, args.repeats)
    with OpLog() as log:
        views()
    with compiled_views(True):
        start = time.perf_counter()
        views()
        compile_s = time.perf_counter() - start
        compiled = median_ms(views, args.repeats)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "threads": args.threads,
                "two_views_ms": round(two_views, 2),
                "views_img_per_s": round(args.batch / two_views * 1000),
                "views_ops": log.total,
                "two_views_compiled_ms": round(compiled, 2),
                "compile_s": round(compile_s, 1),
                "env": environment(),
            }
        )
    )


if __name__ == "__main__":
    main()
