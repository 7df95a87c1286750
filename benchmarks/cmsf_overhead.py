"""Step time of MSF and CMSF over BYOL-asym (CMSF's k = 1 case) with equal heads, interleaved repeats.

    python benchmarks/cmsf_overhead.py --backbone convnet --steps 30 --repeats 4 [--device cuda]

Prints one JSON line per method: the median over repeats of the median step's images/s, and the
ratio of BYOL-asym's images/s to it (target: at most 1.10); then the time of the
neighbour search alone (bank similarity, top-k, constraint, gather) on a full bank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kinship.assembly import build_config
from kinship.bench import bench
from kinship.blocks.knn import masked_topk
from kinship.data import DataInfo, TrainData
from kinship.methods.cmsf import CMSF
from kinship.models.backbones import build_backbone


def search_ms(constraint: str, backbone: str, batch: int, device: str, repeats: int = 30) -> float:
    """Median milliseconds of one step's neighbour selection with a full bank (8,192 slots)."""
    method = CMSF(
        build_config({"method": {"name": "cmsf", "constraint": constraint}}).method,
        build_backbone(backbone),
        TrainData.describe(DataInfo(16384, 10, 32)),
    ).to(device)
    size, dim = method.bank.size, method.bank.rows.shape[1]
    g = torch.Generator().manual_seed(0)
    rows = lambda n: F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)  # noqa: E731
    method.bank.push_gathered(rows(size), label=torch.zeros(size, device=device), index=torch.arange(size, device=device))
    if constraint == "self":
        method.previous_bank.push_gathered(rows(size), valid=torch.ones(size, device=device))
    u, w, w_valid = rows(batch), rows(batch), torch.ones(batch, device=device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        valid = method.bank.valid().unsqueeze(0)
        similarity = u @ method.bank.rows.T
        msf = masked_topk(similarity, valid, method.config.topk)
        index, selected = msf if constraint == "none" else method.self_selection(similarity, w, w_valid, valid, msf)
        method.neighbour_mean(index, selected, torch.zeros(batch, dtype=torch.long, device=device))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--mode", default="compute_only", choices=["compute_only", "pipeline"])
    args = parser.parse_args()
    feat = 128 if args.backbone == "convnet" else (2048 if args.backbone == "resnet50" else 512)
    heads = [f"method.projector_hidden={2 * feat}", f"method.projector_dim={feat // 4}", f"method.predictor_hidden={2 * feat}"]
    runs = {"byol-asym": ("byol", ["method.symmetric=false", *heads]), "msf": ("msf", []), "cmsf-self": ("cmsf", [])}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    env = None
    for _ in range(args.repeats):
        for name, (method, overrides) in runs.items():
            r = bench(
                method, args.device, args.backbone, args.batch, args.steps, args.mode == "compute_only", overrides=overrides
            )
            speeds[name].append(r["img_per_s"])
            env = r["env"]
    base = statistics.median(speeds["byol-asym"])
    for name, values in speeds.items():
        median = statistics.median(values)
        line = {
            "method": name,
            "backbone": args.backbone,
            "device": args.device,
            "mode": args.mode,
            "img_per_s": median,
            "repeats": values,
            "step_time_over_byol_asym": round(base / median, 3),
            "step_ms": round(1000 * args.batch / median, 1),
        }
        if name != "byol-asym":
            line["search_ms"] = round(search_ms("none" if name == "msf" else "self", args.backbone, args.batch, args.device), 2)
        print(json.dumps(line))
    print(json.dumps({"env": env}))


if __name__ == "__main__":
    main()
