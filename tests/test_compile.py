"""``train.compile`` compiles a step's two regions, the views' transforms and the method's forward
(its backward with it), each into graphs that serve every later step: no graph break (nothing
dynamo cannot trace: no host read-back, no random generator, no Python object identity) and no
compilation after the first step (no per-step Python number that dynamo would guard on: schedules
live in tensors, phases in flags set before the step). Checked with dynamo's own tracing
(``backend="eager"``: no code generation, so fast on a CPU) over five steps of the bench."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from kinship import checkpoint
from kinship.assembly import build_config
from kinship.augment.views import compiled_views, make_views
from kinship.config import AugmentConfig
from kinship.data import Batch
from kinship.errors import ConfigError
from kinship.train.trainer import Trainer

from helpers import assert_resumed_exactly, losses, resume_values, small_bench

pytestmark = pytest.mark.slow  # torch.compile graphs

SRC = Path(__file__).resolve().parents[1] / "src"

# graphs of the first step: the forward and the views, whose graph serves every call with the same
# recipes and shapes (SsCL and FixMatch make the labeled batch's weak view apart: one more)
FIRST_STEP = {"sscl": 3, "fixmatch": 3}


def compiled_steps(name: str) -> dict:
    torch._dynamo.reset()
    counters.clear()
    result = small_bench(name, ["train.compile_backend=eager"], compile=True)
    return {"graphs": result["compiled_graphs"], "breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize(
    "name", ["byol", "mocov2", "msf", "cmsf", "cmsf-semi", "swav", "mira", "coke", "clim", "supervised", "sscl", "fixmatch"]
)
def test_no_graph_break_and_nothing_compiled_after_the_first_step(name):
    assert compiled_steps(name) == {"graphs": [FIRST_STEP.get(name, 2), 0, 0, 0, 0], "breaks": 0}


def test_a_phase_change_compiles_once_more():
    """SwAV's queue joins the assignment once full (here at the third step): one more forward graph, then no more."""
    assert compiled_steps("swav-queue") == {"graphs": [2, 0, 1, 0, 0], "breaks": 0}


def test_the_views_compile_as_one_graph_and_give_the_same_images():
    """Every op of every recipe (crops, jitter, blur, solarize, RandAugment, Cutout), one graph
    with ``fullgraph`` (a break would raise), the same images as eager from the same draws."""
    recipes = [
        AugmentConfig(blur_p=0.5, solarize_p=0.2),
        AugmentConfig(crop_size=16, crop_scale=(0.05, 0.14)),
        AugmentConfig(crop_mode="pad", jitter_p=0.0, grayscale_p=0.0, randaugment=2, cutout=0.5),
    ]
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = Batch(torch.arange(16), images, torch.zeros(16, dtype=torch.long))
    torch._dynamo.reset()
    counters.clear()
    with compiled_views(True, backend="eager"):
        compiled = [make_views(batch, recipes, torch.Generator().manual_seed(seed)) for seed in range(3)]
    for seed, views in enumerate(compiled):
        eager = make_views(batch, recipes, torch.Generator().manual_seed(seed))
        assert all(torch.equal(a, b) for a, b in zip(views, eager))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiled_run_computes_what_the_eager_run_does_and_resumes_exactly(tmp_path):
    """MIRA (its beta a tensor filled at every step, prototypes frozen in the first epoch) trained
    with train.compile (dynamo's tracing, backend eager): the eager run's losses and weights; stopped
    mid-epoch and resumed, the straight compiled run's."""
    values = resume_values("mira")
    eager = Trainer(build_config(values), tmp_path / "eager", log=lambda *_: None).fit()
    values["train"].update({"compile": True, "compile_backend": "eager"})
    assert_resumed_exactly(tmp_path, values, {"stop_after_steps": 6})
    a, b = (checkpoint.load(tmp_path / name / "last.pt")["method"] for name in ("eager", "a"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert losses(tmp_path / "eager" / "metrics.jsonl") == losses(tmp_path / "a" / "metrics.jsonl")
    assert eager["knn_top1"] == Trainer(build_config(values), tmp_path / "a", resume=True, log=lambda *_: None).fit()["knn_top1"]


CACHED_COMPILE = """
import sys, torch
from torch._dynamo.utils import counters
from kinship.checkpoint import load_compile_cache, save_compile_cache
loaded = load_compile_cache(sys.argv[1])
torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum(1))(torch.randn(8, 16))
print(loaded, save_compile_cache(sys.argv[1]) if not loaded else None, counters["inductor"]["fxgraph_cache_hit"])
"""


def test_the_compile_cache_serves_a_fresh_machine(tmp_path):
    """Inductor's artifacts saved by one process load into another whose own cache is empty (a
    fresh machine): its compilation is a cache hit."""
    lines = []
    for machine in ("first", "second"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / machine), "PYTHONPATH": str(SRC)}
        out = subprocess.run(
            [sys.executable, "-c", CACHED_COMPILE, str(tmp_path / "compile_cache.bin")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        lines.append(out.stdout.split())
    assert lines == [["False", "True", "0"], ["True", "None", "1"]]


def test_a_backend_that_does_not_exist_is_a_config_error():
    with pytest.raises(
        ConfigError, match="train.compile_backend 'inductr' is not a torch.compile backend .did you mean 'inductor'"
    ):
        build_config({"method": {"name": "byol"}, "train": {"compile": True, "compile_backend": "inductr"}})
