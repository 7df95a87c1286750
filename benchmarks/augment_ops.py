"""Time the augmentation pipeline on CPU: two views of MoCo's recipe for a batch of CIFAR-sized images,
and the hue shift (its costliest op) eager and under ``torch.compile`` (compile time reported apart).

    python benchmarks/augment_ops.py [--batch 256] [--repeats 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kinship.augment import ops
from kinship.augment.views import make_views
from kinship.config import AugmentConfig
from kinship.data import Batch
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
    two_views = median_ms(lambda: make_views(batch, [recipe, recipe], g), args.repeats)
    x = images.float() / 255
    shift = torch.rand(args.batch, generator=g) * 0.2 - 0.1
    hue_eager = median_ms(lambda: ops._shift_hue(x, shift), args.repeats)
    start = time.perf_counter()
    compiled = torch.compile(ops._shift_hue)
    compiled(x, shift)
    compile_s = time.perf_counter() - start
    hue_compiled = median_ms(lambda: compiled(x, shift), args.repeats)
    print(json.dumps({"batch": args.batch, "threads": args.threads, "two_views_ms": round(two_views, 2),
                      "views_img_per_s": round(args.batch / two_views * 1000), "hue_eager_ms": round(hue_eager, 2),
                      "hue_compiled_ms": round(hue_compiled, 2), "hue_compile_s": round(compile_s, 1), "env": environment()}))


if __name__ == "__main__":
    main()
