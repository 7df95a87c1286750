"""Seconds of one CLIM refresh (the CPU preset's: embed the 50,000 training images, k-means with 400
centres, the 40-nearest-neighbour table, the candidate table) with faiss and with the exact torch
search, alternated in fresh processes, on the real CIFAR-10 of the data folder.

    python benchmarks/refresh_time.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_refresh() -> dict:
    import torch

    from kinship.assembly import assemble_training, load_config, load_run_data
    from kinship.blocks import faiss_search
    from kinship.methods import StepInfo

    torch.manual_seed(0)  # the same random-init network in every process
    config = load_config(ROOT / "configs" / "clim_cpu.yaml", ["eval.baselines=false"])
    data = load_run_data(config, torch.device("cpu"), None)
    method, _, _ = assemble_training(config, data.handle, torch.device("cpu"))
    info = StepInfo(3, 0, 1, torch.Generator().manual_seed(0), 0, 195)
    start = time.perf_counter()
    metrics = method.refresh("positives", info)
    seconds = time.perf_counter() - start
    return {
        "faiss": faiss_search.available(torch.zeros(1)),
        "refresh_s": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "purity_selected": round(float(metrics["purity_selected"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_refresh()))
        return
    for _ in range(args.repeats):
        for flag in ("0", "1"):
            env = {**os.environ, "KINSHIP_FAISS": flag}
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
