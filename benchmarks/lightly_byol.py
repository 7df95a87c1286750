"""kinship vs lightly's BYOL recipe: images/s of a full training step, data path included.

lightly side: its own BYOLTransform (PIL, per image) in a torch DataLoader over the shared CIFAR-10
JPEGs, its BYOL heads, NegativeCosineSimilarity and update_momentum, as in lightly's BYOL example.
kinship side: ``kinship bench --method byol`` (uint8 data in memory -> batched augmentation -> step).
Both use the same backbone module, batch size and thread count, each in its own process with
the same environment variables. lightly is not a kinship dependency: ``pip install lightly``.

    python benchmarks/lightly_byol.py --backbone convnet --batch 256 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kinship.data.home import data_home

NPZ = data_home() / "cifar10-jpeg.npz"  # kinship's default: the data folder's CIFAR-10


class JpegDataset(torch.utils.data.Dataset):
    def __init__(self, path: Path, transform) -> None:
        data = np.load(path)
        self.jpeg, self.offsets, self.transform = data["train_jpeg"], data["train_offsets"], transform

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.open(io.BytesIO(self.jpeg[self.offsets[i] : self.offsets[i + 1]].tobytes())).convert("RGB")
        return self.transform(img), 0


def run_lightly(backbone_name: str, batch: int, steps: int, threads: int, workers: int, warmup: int = 3) -> dict:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    from kinship.models.backbones import build_backbone

    torch.set_num_threads(threads)
    cifar = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0, normalize=cifar),
        view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0, normalize=cifar),
    )
    loader = torch.utils.data.DataLoader(
        JpegDataset(NPZ, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    backbone = build_backbone(backbone_name)
    projection = BYOLProjectionHead(backbone.feature_dim, 4096, 256)
    prediction = BYOLPredictionHead(256, 4096, 256)
    backbone_m, projection_m = copy.deepcopy(backbone), copy.deepcopy(projection)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(projection_m)
    params = [*backbone.parameters(), *projection.parameters(), *prediction.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.06)
    criterion = NegativeCosineSimilarity()
    total = warmup + steps
    it = iter(loader)
    times = []
    for step in range(total):
        start = time.perf_counter()
        (x0, x1), _ = next(it)  # waiting for the DataLoader counts, as kinship's augmentation does
        m = cosine_schedule(step, total, 0.99, 1.0)
        update_momentum(backbone, backbone_m, m=m)
        update_momentum(projection, projection_m, m=m)
        p0 = prediction(projection(backbone(x0)))
        z0 = projection_m(backbone_m(x0)).detach()
        p1 = prediction(projection(backbone(x1)))
        z1 = projection_m(backbone_m(x1)).detach()
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    # the same statistics as `kinship bench`: median step time, and the mean beside it
    return {
        "library": "lightly",
        "backbone": backbone_name,
        "batch": batch,
        "threads": threads,
        "workers": workers,
        "img_per_s": round(batch / statistics.median(times), 1),
        "img_per_s_mean": round(batch * steps / sum(times), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workers", type=int, default=None, help="lightly DataLoader workers (default: threads)")
    parser.add_argument("--only", choices=["lightly"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers = args.threads if args.workers is None else args.workers
    if args.only == "lightly":
        print(json.dumps(run_lightly(args.backbone, args.batch, args.steps, args.threads, workers)))
        return
    if not NPZ.is_file():
        sys.exit(f"shared CIFAR-10 npz not found at {NPZ}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    common = ["--backbone", args.backbone, "--batch", str(args.batch), "--steps", str(args.steps)]
    lightly = subprocess.run(
        [sys.executable, __file__, "--only", "lightly", "--threads", str(args.threads), "--workers", str(workers), *common],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    kinship = subprocess.run(
        [sys.executable, "-m", "kinship.cli", "bench", "--method", "byol", "--device", "cpu", *common],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    a, b = json.loads(lightly.stdout.strip().splitlines()[-1]), json.loads(kinship.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "backbone": args.backbone,
                "batch": args.batch,
                "threads": args.threads,
                "lightly_img_per_s": a["img_per_s"],
                "kinship_img_per_s": b["img_per_s"],
                "speedup": round(b["img_per_s"] / a["img_per_s"], 2),
                "lightly_img_per_s_mean": a["img_per_s_mean"],
                "kinship_img_per_s_mean": b["img_per_s_mean"],
                "speedup_mean": round(b["img_per_s_mean"] / a["img_per_s_mean"], 2),
                "lightly_workers": workers,
                "env": b["env"],
            }
        )
    )


if __name__ == "__main__":
    main()
