"""Assignment solvers: MIRA's fixed point (MIRA Eq. 5-7) and SwAV's Sinkhorn (main_swav.py: distributed_sinkhorn)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kinship.blocks.assignment import mira_targets, sinkhorn

from helpers import skewed_logits

TAU = 0.225


def reference_mira(logits, beta, iterations=1000):
    """Eq. 5 and Eq. 7 in probability space, float64, many iterations."""
    p = torch.softmax(logits.double() / TAU, dim=1)
    a = p ** (1 / (1 - beta))
    c = -beta / (1 - beta)
    u = a.mean(0) ** (1 - beta)
    for _ in range(iterations):
        u = ((a / (a * u**c).sum(1, keepdim=True)).mean(0)) ** (1 - beta)
    w = a * u**c
    return w / w.sum(1, keepdim=True)


def objective(w, logits, beta):
    """Eq. 4: -(1/B) sum w log p + ((1-beta)/B) sum w log w + beta sum wbar log wbar."""
    log_p = torch.log_softmax(logits / TAU, dim=1)
    wbar = w.mean(0)
    b = w.shape[0]
    return -(w * log_p).sum() / b + (1 - beta) * (w * w.log()).sum() / b + beta * (wbar * wbar.log()).sum()


@pytest.mark.parametrize("beta", [2 / 3, 0.75])
def test_mira_matches_float64_reference_and_converges(beta):
    logits = skewed_logits()
    w = mira_targets(logits.float(), TAU, beta, 30)
    assert torch.allclose(w.sum(1), torch.ones(len(w)), atol=1e-6) and (w > 0).all()
    reference = reference_mira(logits, beta)
    assert (w.double() - reference).abs().max() <= 2e-6
    # the update's change on W (not on the raw scale of u) falls geometrically below a tolerance
    change = [(mira_targets(logits, TAU, beta, n) - mira_targets(logits, TAU, beta, n - 1)).abs().max() for n in (10, 30, 60)]
    assert change[1] <= 1e-7 and change[2] <= 1e-10 and change[0] > change[1] > change[2]


def test_mira_satisfies_its_optimality_condition_and_beats_perturbations():
    beta = 2 / 3
    logits = skewed_logits(b=128, k=20, seed=1)
    w = mira_targets(logits, TAU, beta, 200)
    # Eq. 5 recomputed from the solution's own marginal reproduces W
    p = torch.softmax(logits / TAU, dim=1)
    again = w.mean(0) ** (-beta / (1 - beta)) * p ** (1 / (1 - beta))
    assert (again / again.sum(1, keepdim=True) - w).abs().max() <= 1e-10
    best = objective(w, logits, beta)
    assert best <= objective(p, logits, beta)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # feasible perturbations: rows stay on the simplex
        d = 1e-3 * torch.randn(w.shape, generator=g, dtype=w.dtype)
        d = d - d.mean(1, keepdim=True)
        candidate = w + d
        if (candidate > 0).all():
            assert objective(candidate, logits, beta) >= best - 1e-12


def test_mira_special_cases_and_invariances():
    logits = skewed_logits(b=64, k=10, seed=2)
    assert torch.allclose(mira_targets(logits, TAU, 0.0), torch.softmax(logits / TAU, dim=1), atol=1e-12)  # beta 0
    same = logits[:1].expand(32, -1)  # collapse: identical rows are a fixed point, W = P
    assert torch.allclose(mira_targets(same, TAU, 2 / 3), torch.softmax(same / TAU, dim=1), atol=1e-12)
    w = mira_targets(logits.float(), TAU, 0.7)
    shifted = mira_targets(logits.float() + torch.randn(64, 1), TAU, 0.7)
    assert torch.allclose(w, shifted, atol=1e-6)
    perm_k, perm_b = torch.randperm(10), torch.randperm(64)
    assert torch.allclose(mira_targets(logits.float()[:, perm_k], TAU, 0.7), w[:, perm_k], atol=1e-6)
    assert torch.allclose(mira_targets(logits.float()[perm_b], TAU, 0.7), w[perm_b], atol=1e-6)


def test_mira_is_finite_for_extreme_logits_in_low_precision():
    logits = skewed_logits(b=128, k=20, seed=3)
    logits[:, 5] = logits.max(1).values - 10.0  # a dead column
    w32 = mira_targets(logits.float(), TAU, 0.75)
    assert torch.isfinite(w32).all()
    assert (w32.double() - mira_targets(logits, TAU, 0.75)).abs().max() <= 1e-6
    wild = 200 * skewed_logits(b=256, k=50, seed=7)  # far beyond cosines: whole columns underflow in fp32
    w32 = mira_targets(wild.float(), TAU, 0.75)
    assert torch.isfinite(w32).all() and (w32.double() - mira_targets(wild, TAU, 0.75)).abs().max() <= 1e-5
    w16 = mira_targets((3 * logits).half(), TAU, 0.75)  # upcast before dividing by the temperature
    assert w16.dtype == torch.float32 and torch.isfinite(w16).all()
    with pytest.raises(ValueError, match="beta"):
        mira_targets(logits, TAU, 1.0)


def test_sinkhorn_codes_meet_their_marginals():
    scores = skewed_logits(b=256, k=20, seed=4)
    b, k = scores.shape
    q3 = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(q3.sum(1), torch.ones(b, dtype=q3.dtype), atol=1e-6)  # each code sums to 1
    deviation = lambda q: ((q.sum(0) - b / k).abs() / (b / k)).max().item()  # noqa: E731
    assert deviation(q3) >= 0.3  # a skewed batch is far from equal partition after 3 iterations
    assert deviation(sinkhorn(scores, 0.05, 100)) <= 1e-6
    assert deviation(sinkhorn(scores, 0.5, 200)) <= 1e-4
    errors = [deviation(sinkhorn(scores, 0.05, n)) for n in (1, 3, 10, 30)]
    assert errors == sorted(errors, reverse=True)


def reference_sinkhorn(scores, epsilon, iterations):
    """``main_swav.py: distributed_sinkhorn`` on one process, float64 (the max subtracted first)."""
    q = (scores.double() / epsilon - scores.double().max() / epsilon).exp().T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_matches_swav_code(iterations):
    scores = skewed_logits(b=256, k=20, seed=8)
    reference = reference_sinkhorn(scores, 0.05, iterations)
    assert (sinkhorn(scores, 0.05, iterations) - reference).abs().max() <= 1e-12
    assert (sinkhorn(scores.float(), 0.05, iterations).double() - reference).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn(scores, 0.05, 0)


@pytest.mark.parametrize("epsilon", [0.05, 0.01])
def test_sinkhorn_in_fp32_when_half_the_batch_is_far_from_every_prototype(epsilon):
    """Cosine scores span up to 2 / epsilon = 200 in the exponent: the row scalings span that range
    too, and fp32 must still agree with fp64."""
    g = torch.Generator().manual_seed(9)
    scores = torch.rand(256, 500, generator=g, dtype=torch.float64) * 0.1 - 1.0
    scores[::2] = torch.rand(128, 500, generator=g, dtype=torch.float64) * 2 - 1
    scores[::2, :5] = 1.0
    q = sinkhorn(scores.float(), epsilon, 3)
    assert torch.isfinite(q).all() and (q.double() - sinkhorn(scores, epsilon, 3)).abs().max() <= 1e-6


def test_sinkhorn_special_cases():
    constant = torch.full((8, 5), 0.3, dtype=torch.float64)
    assert torch.allclose(sinkhorn(constant), torch.full((8, 5), 0.2, dtype=torch.float64), atol=1e-12)
    scores = skewed_logits(b=32, k=6, seed=5)
    assert torch.allclose(sinkhorn(scores), sinkhorn(scores + 3.0), atol=1e-9)
    assert torch.isfinite(sinkhorn(scores.half())).all()


def test_mira_is_not_an_equal_partition():
    w = mira_targets(skewed_logits(b=256, k=20, seed=6), TAU, 2 / 3)
    marginal = w.mean(0)
    assert -(marginal * marginal.log()).sum() < math.log(20) - 0.01


def test_prototype_head_gives_cosines_and_freezes():
    from kinship.models.heads import PrototypeHead

    torch.manual_seed(0)
    head = PrototypeHead(8, 5)
    z = (torch.randn(4, 8) * 3).requires_grad_()  # an embedding from the network
    logits = head(z)
    manual = F.normalize(z, dim=1) @ F.normalize(head.weight, dim=1).T
    assert torch.allclose(logits, manual, atol=1e-6) and logits.abs().max() <= 1 + 1e-6
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    before = head.weight.detach().clone()
    head(z, frozen=True).sum().backward()
    optimizer.step()
    assert head.weight.grad is None and torch.equal(head.weight, before)  # frozen: untouched
    head(z).sum().backward()
    optimizer.step()
    assert not torch.equal(head.weight, before)


SOLVERS = {"sinkhorn": lambda s: sinkhorn(s, 0.05, 3), "mira": lambda s: mira_targets(s, TAU, 2 / 3, 30)}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_and_prototype_head_under_bf16_autocast_match_fp64(name):
    """The trainer's bf16 autocast must not reach the prototype head or the solvers: the targets of
    unit embeddings (B, d) through the head and the solver stay within 1e-5 of the fp64 ones."""
    from kinship.models.heads import PrototypeHead

    torch.manual_seed(0)
    head = PrototypeHead(32, 300)
    z = torch.randn(256, 32) + 2 * head.weight.detach()[torch.randint(0, 300, (256,))]
    solver = SOLVERS[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(z, frozen=True)
        targets = solver(logits)
        solver_alone = solver(skewed_logits().float())
    expected = solver(head.double()(z.double(), frozen=True))
    assert logits.dtype == targets.dtype == torch.float32
    assert (targets - expected).abs().max() < 1e-5
    assert (solver_alone - solver(skewed_logits())).abs().max() < 1e-5


# -- CoKe: online constrained k-means (Qian et al., 2022) ---------------------------------------------
from kinship.blocks.assignment import OnlineCentres, constrained_assignment, dual_step  # noqa: E402


def unit_rows(n, d, generator, scale=1.0, around=None):
    x = scale * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return F.normalize(x if around is None else around + x, dim=1)


def test_assignment_is_the_argmax_of_similarity_plus_duals_and_two_views_average_their_similarities():
    g = torch.Generator().manual_seed(0)
    x1, x2, centres = unit_rows(500, 8, g), unit_rows(500, 8, g), unit_rows(6, 8, g)
    rho = torch.rand(6, generator=g, dtype=torch.float64)
    assert torch.equal(constrained_assignment(x1, centres, rho), (x1 @ centres.T + rho).argmax(1))  # Eq. 10
    assert torch.equal(constrained_assignment(x1, centres, torch.zeros(6)), (x1 @ centres.T).argmax(1))  # nearest
    mean = (x1 + x2) / 2  # Eq. 17: the mean of the views, not renormalised
    assert torch.equal(constrained_assignment(mean, centres, rho), ((x1 @ centres.T + x2 @ centres.T) / 2 + rho).argmax(1))
    assert not torch.equal(
        constrained_assignment(F.normalize(mean, dim=1), centres, rho), constrained_assignment(mean, centres, rho)
    )


def test_dual_step_exact_numbers():
    """K 4, b 8, every point in cluster 0, eta 1 (Eq. 18); clamped at 0 only below the equality."""
    labels = torch.zeros(8, dtype=torch.long)
    assert torch.allclose(dual_step(torch.zeros(4), labels, gamma=0.4, eta=1.0), torch.tensor([0.0, 0.1, 0.1, 0.1]))
    assert torch.allclose(dual_step(torch.zeros(4), labels, gamma=1.0, eta=1.0), torch.tensor([-0.75, 0.25, 0.25, 0.25]))


def constrained_stream(seed, gamma, eta, epochs=3, n=10_000, d=8, k=10, b=100):
    """Fixed centres, half of them on the far side of the data: the worst cluster's size over its
    bound gamma N / K in each epoch, the largest dual, and the last epoch's sizes."""
    g = torch.Generator().manual_seed(seed)
    m = F.normalize(torch.randn(d, generator=g), dim=0)
    x = F.normalize(m + 0.5 * torch.randn(n, d, generator=g), dim=1)  # one cap around m
    centres = F.normalize(torch.cat([m + 0.3 * torch.randn(5, d, generator=g), -m + 0.3 * torch.randn(5, d, generator=g)]), dim=1)
    rho, worst, largest = torch.zeros(k), [], 0.0
    for _ in range(epochs):
        sizes = torch.zeros(k)
        for rows in torch.randperm(n, generator=g).split(b):
            labels = constrained_assignment(x[rows], centres, rho)
            rho = dual_step(rho, labels, gamma, eta)
            largest = max(largest, rho.max().item())
            sizes += torch.bincount(labels, minlength=k)
        worst.append((sizes.min() / (gamma * n / k)).item())
    return worst, largest, sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duals_keep_every_cluster_above_its_lower_bound_where_greedy_starves_half(seed):
    worst, largest, _ = constrained_stream(seed, gamma=0.4, eta=0.4)
    assert min(worst[1:]) >= 0.95 and 0 <= largest < 2  # every epoch after the first
    greedy, _, _ = constrained_stream(seed, gamma=0.4, eta=0.0)
    assert greedy[-1] < 0.25
    _, _, sizes = constrained_stream(seed, gamma=1.0, eta=0.4)  # the equality: balanced within 5%
    assert ((sizes - 1000).abs() <= 50).all()


def test_centres_are_normalised_running_means_whatever_the_batch_size():
    g = torch.Generator().manual_seed(3)
    x, labels = unit_rows(700, 5, g), torch.randint(0, 4, (700,), generator=g)
    expected = F.normalize(torch.stack([x[labels == k].sum(0) for k in range(4)]), dim=1)  # Eq. 13
    for b in (1, 7, 100, 700):
        centres = OnlineCentres(4, 5).double()
        centres.start_epoch()
        for rows in torch.arange(700).split(b):
            centres.update(x[rows], labels[rows])
        assert torch.allclose(centres.running, expected, atol=1e-6), b
        before = centres.previous.clone()
        centres.end_epoch()
        assert torch.equal(centres.previous, centres.running) and not torch.equal(before, centres.previous)
    # the official code's per-batch renormalisation depends on the batch size (a drifting stream)
    drift = F.normalize(torch.linspace(0, 1, 700, dtype=torch.float64)[:, None] * torch.tensor([1.0, -1, 0, 0, 0]) + x, dim=1)
    results = []
    for b in (7, 100):
        centres = OnlineCentres(4, 5, renormalise_per_batch=True).double()
        for rows in torch.arange(700).split(b):
            centres.update(drift[rows], labels[rows])
        results.append(centres.running.clone())
    assert not torch.allclose(results[0], results[1], atol=1e-4)


def test_a_centre_without_features_keeps_its_value():
    centres = OnlineCentres(3, 4, generator=torch.Generator().manual_seed(0))
    start = centres.running.clone()
    centres.update(F.normalize(torch.randn(5, 4), dim=1), torch.zeros(5, dtype=torch.long))
    assert torch.equal(centres.running[1:], start[1:]) and not torch.equal(centres.running[0], start[0])


def test_bf16_features_on_a_near_tie_are_assigned_as_in_float64():
    centres = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), dim=1)
    x = F.normalize(torch.tensor([[0.70715, 0.70706]], dtype=torch.float64), dim=1)  # similarity gap ~1e-4
    expected = constrained_assignment(x, centres, torch.zeros(2, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = constrained_assignment(x.float(), centres.float(), torch.zeros(2))
    assert expected.item() == 0 and torch.equal(got, expected)
