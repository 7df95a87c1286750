"""``train.compile`` compiles a step's two regions, the views' transforms and the method's forward
(its backward with it), each into graphs that serve every later step: no graph break (nothing
dynamo cannot trace: no host read-back, no random generator, no Python object identity) and no
compilation after the first step (no per-step Python number that dynamo would guard on: schedules
live in tensors, phases in flags set before the step). Checked with dynamo's own tracing
(``backend="eager"``: no code generation, so fast on a CPU) over five steps of the bench."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from kinship.augment.views import compiled_views, make_views
from kinship.bench import bench
from kinship.config import AugmentConfig
from kinship.data import Batch
from test_host_sync import SMALL

# graphs of the first step: the forward and the views, whose graph serves every call with the same
# recipes and shapes (SsCL and FixMatch make the labeled batch's weak view apart: one more)
FIRST_STEP = {"sscl": 3, "fixmatch": 3}


def compiled_steps(name: str) -> dict:
    torch._dynamo.reset()
    counters.clear()
    result = bench(name.split("-")[0], "cpu", "convnet", batch=32, steps=1, compute_only=False, warmup=2, width=8,
                   compile=True, overrides=SMALL.get(name, []) + ["train.compile_backend=eager"], tune_allocator=False,
                   images=512)
    return {"graphs": result["compiled_graphs"], "breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("name", ["byol", "mocov2", "msf", "cmsf", "swav", "mira", "coke", "clim", "supervised", "sscl", "fixmatch"])
def test_no_graph_break_and_nothing_compiled_after_the_first_step(name):
    assert compiled_steps(name) == {"graphs": [FIRST_STEP.get(name, 2), 0, 0, 0, 0], "breaks": 0}


def test_a_phase_change_compiles_once_more():
    """SwAV's queue joins the assignment once full (here at the third step): one more forward graph, then no more."""
    assert compiled_steps("swav-queue") == {"graphs": [2, 0, 1, 0, 0], "breaks": 0}


def test_the_views_compile_as_one_graph_and_give_the_same_images():
    """Every op of every recipe (crops, jitter, blur, solarize, RandAugment, Cutout), one graph
    with ``fullgraph`` (a break would raise), the same images as eager from the same draws."""
    recipes = [AugmentConfig(blur_p=0.5, solarize_p=0.2), AugmentConfig(crop_size=16, crop_scale=(0.05, 0.14)),
               AugmentConfig(crop_mode="pad", jitter_p=0.0, grayscale_p=0.0, randaugment=2, cutout=0.5)]
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
