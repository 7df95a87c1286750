"""Seeded sampling: Beta from the step's generator, and augmentation that does not depend on how the
global batch is split across processes."""

import pytest
import torch

from kinship.augment.views import make_views
from kinship.config import AugmentConfig
from kinship.data import Batch
from kinship.sampling import Shard, beta


@pytest.mark.parametrize("a,b", [(2.0, 2.0), (0.2, 0.2), (2.0, 5.0), (1.0, 1.0)])
def test_beta_moments(a, b):
    x = beta(200_000, a, b, torch.Generator().manual_seed(0), "cpu")
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert x.min() >= 0 and x.max() <= 1
    assert abs(x.mean().item() - mean) < 0.004 and abs(x.var().item() - var) < 0.004


def test_beta_is_seeded_by_its_generator_only():
    state = torch.get_rng_state()
    first = beta(100, 2.0, 2.0, torch.Generator().manual_seed(5), "cpu")
    torch.manual_seed(123)  # the global RNG has no say
    assert torch.equal(first, beta(100, 2.0, 2.0, torch.Generator().manual_seed(5), "cpu"))
    torch.set_rng_state(state)
    assert not torch.equal(first, beta(100, 2.0, 2.0, torch.Generator().manual_seed(6), "cpu"))
    with pytest.raises(ValueError):
        beta(3, 0.0, 1.0, torch.Generator(), "cpu")


def test_views_of_a_shard_are_the_rows_of_the_global_batch_views():
    """What two processes compute for their halves is what one process computes for the whole."""
    images = (torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    recipes = [AugmentConfig(crop_size=12, blur_p=0.5, solarize_p=0.3), AugmentConfig(crop_size=8, jitter_p=0.5)]
    aspect = torch.linspace(0.5, 2.0, 12)  # images stored as squares, originally of these shapes
    index = torch.arange(12)
    whole = make_views(Batch(index, images, index, aspect=aspect), recipes, torch.Generator().manual_seed(9))
    for cut in (6, 5):  # equal halves, as the batch plan gives, and any other split
        parts = [
            make_views(
                Batch(index[rows], images[rows], index[rows], Shard(rows.start, len(range(12)[rows]), 12), aspect=aspect[rows]),
                recipes,
                torch.Generator().manual_seed(9),
            )
            for rows in (slice(0, cut), slice(cut, 12))
        ]
        for v, view in enumerate(whole):
            assert torch.equal(torch.cat([part[v] for part in parts]), view)
