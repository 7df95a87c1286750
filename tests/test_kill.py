"""A run killed with SIGKILL at several moments, once in the middle of writing a checkpoint, and
restarted each time with the same command, ends with the same weights and losses as a straight run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from kinship import checkpoint

from helpers import tiny_run_config

pytestmark = pytest.mark.slow  # runs killed and resumed

# Runs the CLI with torch.save replaced: the N-th save writes half of the file, then the process
# kills itself (SIGKILL), as a preemption in the middle of a checkpoint write would.
DIE_WHILE_SAVING = """
import io, os, signal, sys, torch
real, calls = torch.save, [0]
def dying_save(obj, f):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_SAVE"]):
        buffer = io.BytesIO()
        real(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
torch.save = dying_save
from kinship.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            DIE_WHILE_SAVING if env else "from kinship.cli import main; import sys; sys.exit(main(sys.argv[1:]))",
            *args,
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_after(proc: subprocess.Popen, metrics, more_lines: int, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` once metrics.jsonl has ``more_lines`` more lines than now; False if it ended first."""
    target, deadline = lines(metrics) + more_lines, time.time() + timeout
    while proc.poll() is None and lines(metrics) < target and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def loss_lines(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_killed_runs_resume_to_the_straight_result(tmp_path):
    values = tiny_run_config(**{"train.epochs": 3, "train.batch_size": 32, "train.checkpoint_every_steps": 2})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli(["pretrain", "--config", str(config), "--out", str(straight)]).wait() == 0

    command = ["pretrain", "--config", str(config), "--out", str(killed), "--resume"]
    assert cli(command, KILL_AT_SAVE="3").wait() == -signal.SIGKILL  # dies writing its 3rd checkpoint
    assert list(killed.glob(".last.pt.*.tmp")), "the half-written checkpoint is a temporary file"
    assert checkpoint.load(killed / "last.pt")["position"][2] == 4  # the 2nd checkpoint (step 4) is intact
    metrics = killed / "metrics.jsonl"
    kills = 1
    for more in (0, 3, 1, 5, 2, 4):  # 0: during start-up, before any step of this life
        kills += kill_after(cli(command), metrics, more)
    final = cli(command)
    assert final.wait() == 0, final.stderr.read()
    assert kills == 7 and not list(killed.glob(".last.pt.*.tmp"))

    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(killed / "last.pt")
    assert a["position"] == b["position"] == [3, 0, 24]
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key
    assert loss_lines(straight) == loss_lines(killed) and len(loss_lines(killed)) == 24
