"""The losses of every CPU preset's first training steps, bit for bit: a check that a refactoring left
the behaviour unchanged.

    python benchmarks/loss_fingerprint.py --out runs/fingerprint.json             # record
    python benchmarks/loss_fingerprint.py --check runs/fingerprint.json           # compare, exit 1 on a change

Each preset (and the method switches that take another path through its file: CMSF's four
constraints, FixMatch's supervised-only mode) trains on the first 10,240 CIFAR-10 images
(40 steps an epoch at batch 256) for its scan steps plus 20 training steps, in one thread; every
step's loss is kept as ``float.hex``, so equal means bit-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from kinship.assembly import load_config
from kinship.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
RUNS: dict[str, tuple[str, list[str]]] = {
    "demo (MoCo v2)": ("demo.yaml", []),
    "byol": ("byol_cpu.yaml", []),
    "clim": ("clim_cpu.yaml", []),
    "cmsf self": ("cmsf_cpu.yaml", []),
    "msf": ("cmsf_cpu.yaml", ["method.constraint=none"]),
    "cmsf supervised": ("cmsf_cpu.yaml", ["method.constraint=supervised"]),
    "cmsf semi": ("cmsf_cpu.yaml", ["method.constraint=semi", "data.labeled_fraction=0.1"]),
    "coke": ("coke_cpu.yaml", []),
    "mira": ("mira_cpu.yaml", []),
    "swav": ("swav_cpu.yaml", []),
    "sscl": ("sscl_cpu.yaml", []),
    "fixmatch": ("fixmatch_cpu.yaml", []),
    "supervised-only": ("fixmatch_cpu.yaml", ["method.pseudo_label_weight=0"]),
}


def fingerprint(config_file: str, overrides: list[str]) -> list[str]:
    base = load_config(ROOT / "configs" / config_file, overrides)
    scan = getattr(base.method, "scan_epochs", 0)
    steps_per_epoch = 10240 // base.train.batch_size
    config = load_config(
        ROOT / "configs" / config_file,
        [
            *overrides,
            "data.train_limit=10240",
            "data.test_limit=500",
            "train.log_every=1",
            "train.progress=false",
            "train.time_limit_min=0",
            f"train.stop_after_steps={scan * steps_per_epoch + STEPS}",
        ],
    )
    losses: list[str] = []
    step = Trainer.step

    def recorded(self, *args, **kwargs):
        loss, logs = step(self, *args, **kwargs)
        losses.append(float(loss.detach().float()).hex())
        return loss, logs

    Trainer.step = recorded
    try:
        with tempfile.TemporaryDirectory() as out:
            Trainer(config, Path(out), log=lambda *_: None).fit()
    finally:
        Trainer.step = step
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the fingerprint here")
    group.add_argument("--check", type=Path, help="compare with this fingerprint")
    parser.add_argument("--only", action="append", help="a run name (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.only or list(RUNS)
    found = {name: fingerprint(*RUNS[name]) for name in names}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "runs": found}, indent=1) + "\n")
        print(f"wrote {args.out}: {', '.join(f'{k} ({len(v)} steps)' for k, v in found.items())}")
        return
    expected = json.loads(args.check.read_text())["runs"]
    changed = [name for name in names if found[name] != expected.get(name)]
    for name in names:
        print(f"{name}: {'CHANGED' if name in changed else 'identical'} ({len(found[name])} steps)")
    sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
