"""What the online linear probe costs: the demo's training throughput with ``train.online_probe`` on and
off, alternated in fresh processes (images/s over steps 20-80 of each run, first 20 left out as warm-up),
and the probe's own update timed alone on the demo's features (batch 256, the small CNN's 256 dims).

    python benchmarks/probe_cost.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def throughput(probe: bool) -> float:
    with tempfile.TemporaryDirectory() as out:
        settings = [
            "data.train_limit=25600",
            "data.test_limit=500",
            "train.stop_after_steps=80",
            "train.log_every=20",
            "eval.baselines=false",
            f"train.online_probe={str(probe).lower()}",
        ]
        command = [sys.executable, "-m", "kinship.cli", "pretrain", "--config", str(ROOT / "configs" / "demo.yaml")]
        command += ["--out", out, "--no-progress", *(f"--set={s}" for s in settings)]
        subprocess.run(command, check=True, capture_output=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["img_per_s"] for r in rows if "img_per_s" in r][1:]  # the first 20 steps: warm-up
        return len(speeds) / sum(1 / s for s in speeds)  # images/s over the steps, equal images per line


def update_ms(steps: int = 200) -> float:
    """Median milliseconds of one probe update (capture, gather, forward, backward, SGD step)."""
    import statistics
    import time

    import torch

    from kinship.models.backbones import build_backbone
    from kinship.train.online_probe import OnlineProbe

    backbone = build_backbone("convnet", width=32)
    probe = OnlineProbe(backbone, classes=10)
    features, labels, times = torch.randn(256, backbone.feature_dim), torch.randint(0, 10, (256,)), []
    for _ in range(steps):
        start = time.perf_counter()
        probe.expect(256)
        probe.capture(backbone, (), features)
        probe.update(labels)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps({"probe_update_ms": round(update_ms(), 3)}), flush=True)
    for _ in range(args.repeats):
        for probe in (False, True):
            print(json.dumps({"online_probe": probe, "img_per_s": round(throughput(probe), 1)}), flush=True)


if __name__ == "__main__":
    main()
