"""Step time of MSF and CMSF over BYOL-asym (CMSF's k = 1 case) with equal heads, interleaved repeats.

    python benchmarks/cmsf_overhead.py --backbone convnet --steps 30 --repeats 4 [--device cuda]

Prints one JSON line per method: the median over repeats of the median step's images/s, and the
ratio of BYOL-asym's images/s to it (the issue's target: at most 1.10).
"""
from __future__ import annotations

import argparse
import json
import statistics

from kinship.bench import bench


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
            r = bench(method, args.device, args.backbone, args.batch, args.steps, args.mode == "compute_only", overrides=overrides)
            speeds[name].append(r["img_per_s"])
            env = r["env"]
    base = statistics.median(speeds["byol-asym"])
    for name, values in speeds.items():
        median = statistics.median(values)
        print(json.dumps({"method": name, "backbone": args.backbone, "device": args.device, "mode": args.mode,
                          "img_per_s": median, "repeats": values, "step_time_over_byol_asym": round(base / median, 3)}))
    print(json.dumps({"env": env}))


if __name__ == "__main__":
    main()
