"""Peak memory of a short streamed run against the folder's size, beside the same runs in memory: MoCo v2
with the small CNN, 4 steps of batch 32 at 96 px, and the k-NN monitor over every image in chunks of 64,
each run a fresh process (its peak RSS, and that of its largest child: a decoding worker). One JSON
line per run.

    python benchmarks/stream_memory.py --root /tmp/stream_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RUN = """
import json, resource, sys
from kinship.assembly import build_config
from kinship.train.trainer import Trainer
Trainer(build_config(json.loads(sys.argv[1])), sys.argv[2], log=lambda *_: None).fit()
print(json.dumps({"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def config(root: Path, streaming: bool) -> dict:
    return {
        "method": {"name": "mocov2", "queue_size": 128, "augment": {"crop_size": 16}},
        "data": {
            "name": "imagefolder",
            "path": str(root / "train"),
            "test_path": str(root / "test"),
            "image_size": 96,
            "workers": 2,
            "streaming": streaming,
        },
        "model": {"backbone": "convnet", "width": 8, "norm": "none"},
        "train": {"epochs": 2, "batch_size": 32, "stop_after_steps": 4, "progress": False, "log_every": 2},
        "eval": {"knn_k": 20, "knn_every": 1, "batch_size": 64},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="where the folders are written")
    parser.add_argument("--per-class", type=int, nargs="+", default=[40, 160], help="images per class (4 classes)")
    args = parser.parse_args()
    from kinship.data.store import write_image_folder

    for streaming in (True, False):
        for per_class in args.per_class:
            root = Path(args.root) / str(per_class)
            if not (root / "train").is_dir():
                write_image_folder(root / "train", classes=4, per_class=per_class, width=160, height=120, seed=0, quality=75)
                write_image_folder(root / "test", classes=4, per_class=10, width=160, height=120, seed=1, quality=75)
            run = root / f"run_{'streamed' if streaming else 'in_memory'}"
            done = subprocess.run(
                [sys.executable, "-c", RUN, json.dumps(config(root, streaming)), str(run)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            peaks = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({"streaming": streaming, "images": 4 * per_class, **{k: round(v, 1) for k, v in peaks.items()}}))


if __name__ == "__main__":
    main()
