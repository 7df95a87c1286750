"""The streaming loader beside the official MoCo / CoKe / SwAV loaders (torchvision ImageFolder +
DataLoader + RandomResizedCrop(224, (0.2, 1)) + RandomHorizontalFlip per view, uint8 out), at equal
workers on the same synthetic folder of ImageNet-shaped JPEGs, alternated ``--rounds`` times, each
run in a fresh process (its peak memory with its workers): one JSON line per run.

    python benchmarks/loader_vs_torchvision.py --make 1000 --width 500 --height 375 --folder /tmp/jpeg500
    python benchmarks/loader_vs_torchvision.py --folder /tmp/jpeg500 --workers 2 --batch 64 --steps 10
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

TORCHVISION = """
import itertools, json, sys, time, torch
from torchvision import datasets, transforms
from kinship.bench import peak_rss_mb
from kinship.runtime import environment
folder, workers, batch, steps, size, views, warmup = sys.argv[1], *map(int, sys.argv[2:8])
view = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), transforms.RandomHorizontalFlip(),
                           transforms.PILToTensor()])
data = datasets.ImageFolder(folder, transform=lambda image: torch.stack([view(image) for _ in range(views)]))
loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
batches = (b for _ in itertools.count() for b in loader)
for _ in range(warmup):
    next(batches)
start = time.perf_counter()
for _ in range(steps):
    next(batches)
seconds = time.perf_counter() - start
print(json.dumps({"loader": "torchvision", "folder": folder, "images": len(data), "workers": workers, "batch": batch,
                  "steps": steps, "views": views, "image_size": size, "img_per_s": round(batch * steps / seconds, 1),
                  "peak_rss_mb": peak_rss_mb(), "env": environment()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="ImageFolder root (FOLDER/<class>/<image>)")
    parser.add_argument("--make", type=int, default=0, help="first write this many JPEGs there (10 classes)")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.make:
        from kinship.data.store import write_image_folder

        start = time.perf_counter()
        write_image_folder(Path(args.folder), classes=10, per_class=args.make // 10, width=args.width, height=args.height)
        print(
            f"wrote {args.make} JPEGs of about {args.width} x {args.height} px in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
        return
    common = [str(args.workers), str(args.batch), str(args.steps), str(args.image_size), str(args.views), str(args.warmup)]
    kinship = [
        "-m",
        "kinship.cli",
        "bench",
        "--loader-only",
        "--data",
        args.folder,
        "--workers",
        common[0],
        "--batch",
        common[1],
        "--steps",
        common[2],
        "--image-size",
        common[3],
        "--views",
        common[4],
    ]
    for _, command in itertools.product(range(args.rounds), (kinship, ["-c", TORCHVISION, args.folder, *common])):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
