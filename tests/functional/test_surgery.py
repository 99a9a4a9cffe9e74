"""Gradient surgery (PCGrad, CAGrad, SAM-GS, GCond, sum, mean) against hand-computed values, the authors'
reference code (transcribed below as plain loops), a reference solver (scipy, when installed) and the
methods' defining properties.

Permutation invariance: CAGrad, SAM-GS, GCond (up to ties), sum and mean are invariant to the order of the
tasks. PCGrad is for 2 tasks; for T >= 3 it is not, by design: each task's projection order is drawn at
random per task index, and the projections do not commute.
"""

from __future__ import annotations

import doctest
import io
import itertools
import math
from collections import deque

import pytest
import torch

from lightning_optx.functional import surgery as S
from lightning_optx.functional.surgery import _gcond as GC
from lightning_optx.functional.surgery import _gram_space as GS


def rand_grads(num_tasks, n, seed, dtype=torch.float32, conflict=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(num_tasks, n, generator=gen, dtype=torch.float64)
    g *= torch.rand(num_tasks, 1, generator=gen, dtype=torch.float64) * 3 + 0.2
    if conflict:
        g[1] = -0.8 * g[0] + 0.3 * g[1]
    return g.to(dtype)


def test_doctests():
    result = doctest.testmod(S, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------------------------------------ basics


def test_sum_mean_and_statistics():
    g = rand_grads(3, 7, 0)
    assert torch.equal(S.aggregate_sum(g), g.sum(0))
    assert torch.equal(S.aggregate_mean(g), g.mean(0))
    assert torch.equal(S.make_aggregator("sum")(g, 0), g.sum(0))
    assert torch.equal(S.make_aggregator("mean")(g, 0), g.mean(0))
    assert S.sum_ is S.aggregate_sum and S.mean_ is S.aggregate_mean
    exact = g.double() @ g.double().T
    torch.testing.assert_close(S.gramian(g), exact, rtol=0, atol=1e-6 * float(exact.diagonal().max()))
    assert S.gramian(g).dtype == torch.float64
    torch.testing.assert_close(S.task_norms(g), g.norm(dim=1))
    h = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])  # pairs: (0,1) conflict, (0,2) 0, (1,2) agree
    assert S.conflict_rate(h).item() == pytest.approx(1 / 3)
    assert S.conflict_rate(h).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gramian_in_blocks(monkeypatch, dtype):
    """float64 products (float64 input; float32 input off the CPU) in blocks of _GRAM_BLOCK entries; float32
    products on the CPU in blocks of _F32_BLOCK parameters, summed in float64 (1e-6 of the norms)."""
    g = rand_grads(3, 50, 2, dtype=dtype)
    prev = rand_grads(3, 50, 3, dtype=dtype)
    expected = g.double() @ g.double().T
    monkeypatch.setattr(GS, "_GRAM_BLOCK", 7)  # float64 path: 2 parameters per block, 25 blocks
    monkeypatch.setattr(GS, "_F32_BLOCK", 3)  # float32 path: 17 blocks
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 0, "atol": 1e-6 * 30}
    torch.testing.assert_close(S.gramian(g), expected, **tol)
    torch.testing.assert_close(GS._gram(g, g[:2]), expected[:, :2], **tol)
    both = GS._gram_pair(g, prev)
    torch.testing.assert_close(both, torch.cat([expected, g.double() @ prev.double().T], 1), **tol)
    assert all(t.dtype == torch.float64 for t in (S.gramian(g), both))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 4), "at least 2"),
        (torch.zeros(4), "2-D"),
        (torch.zeros(2, 3, 4), "2-D"),
        (torch.zeros(2, 0), "n >= 1"),
        (torch.zeros(2, 3, dtype=torch.long), "floating-point"),
        ([[1.0, 2.0], [3.0, 4.0]], "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("method", S.METHODS)
def test_bad_grads(bad, match, method):
    with pytest.raises(ValueError, match=match):
        S.make_aggregator(method)(bad, 0)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("pcgrd", {}, "`method` must be one of"),
        ("cagrad", {"c": -0.1}, "`c` must be"),
        ("cagrad", {"rescale": 3}, "`rescale` must be one of"),
        ("sam_gs", {"gamma": 1.5}, r"`gamma` must be a float in \[0, 1\]"),
        ("sam_gs", {"beta1": 1.0}, r"`beta1` must be a float in \[0, 1\)"),
        ("sam_gs", {"beta2": -0.1}, "`beta2`"),
        ("sam_gs", {"eps": 0.0}, "`eps` must be a float > 0"),
        ("gcond", {"conflict_thresholds": (-0.5, -0.8, 0.0)}, "critical <= main <= weak"),
        ("gcond", {"conflict_thresholds": (-0.8, 0.0)}, "`conflict_thresholds`"),
        ("gcond", {"remap_power": 0}, "`remap_power`"),
        ("gcond", {"dominance_window": -1}, "`dominance_window`"),
        ("gcond", {"tie_breaking_weights": (0.0, 0.0)}, "`tie_breaking_weights`"),
        ("gcond", {"norm_ema_beta": 1.0}, "`norm_ema_beta`"),
        ("gcond", {"momentum_beta": 1.0}, "`momentum_beta`"),
        ("gcond", {"projection_max_iters": 0}, "`projection_max_iters`"),
        ("gcond", {"norm_cap": 0.0}, "`norm_cap`"),
        ("gcond", {"use_smooth_logic": 1}, "`use_smooth_logic`"),
        ("pcgrad", {"seed": -1}, "`seed`"),
        ("sum", {"c": 0.5}, r"Options \['c'\] are not accepted by method='sum'"),
        ("cagrad", {"seed": 1, "gamma": 0.1}, r"\['gamma', 'seed'\].*accepts \('c', 'rescale'\)"),
    ],
)
def test_bad_options(method, options, match):
    with pytest.raises(ValueError, match=match):
        S.make_aggregator(method, **options)


def test_bad_step_and_state_mismatch():
    agg = S.make_aggregator("pcgrad")
    with pytest.raises(ValueError, match="`step` must be an integer >= 0"):
        agg(rand_grads(2, 3, 0), -1)
    with pytest.raises(ValueError, match="Cannot load the state of method='gcond'"):
        S.make_aggregator("sam_gs").load_state_dict(S.make_aggregator("gcond").state_dict())
    for method in ("sam_gs", "gcond"):
        agg = S.make_aggregator(method)
        agg(rand_grads(3, 5, 0), 0)
        with pytest.raises(ValueError, match="fresh state"):
            agg(rand_grads(2, 5, 0), 1)


@pytest.mark.parametrize("method", S.METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_is_preserved(method, dtype):
    out = S.make_aggregator(method)(rand_grads(3, 6, 1, dtype=dtype), 0)
    assert out.dtype == dtype and out.shape == (6,) and torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------------------------- PCGrad


def reference_pcgrad(grads, orders):
    """Algorithm 1 of the paper as a loop (projection against the original gradients, then sum)."""
    out = []
    for i, g_i in enumerate(grads):
        g = g_i.clone()
        for j in orders[i].tolist():
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].norm() ** 2 * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)


def test_pcgrad_hand_computed():
    # g1' = g1 - (-1)/2 g2 = (0.5, 0.5); g2' = g2 - (-1)/1 g1 = (0, 1).
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(S.pcgrad(g), torch.tensor([0.5, 1.5]))
    # A third task orthogonal to both: only the first pair conflicts, whatever the order.
    g3 = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    for seed in range(5):
        out = S.pcgrad(g3, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, torch.tensor([0.5, 1.5, 2.0]))


@pytest.mark.parametrize("num_tasks", [3, 5])
def test_pcgrad_matches_reference_loop(num_tasks):
    g = rand_grads(num_tasks, 11, num_tasks, dtype=torch.float64)
    for seed in range(4):
        orders = S.pcgrad_orders(num_tasks, torch.Generator().manual_seed(seed))
        expected = reference_pcgrad(g, orders)
        out = S.pcgrad(g, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_pcgrad_float32_matches_reference_loop_relative_to_norms():
    """In float32 the Gram-space computation (float64 inner products) and the reference (float32 projected
    vectors) round differently; they agree to float32 precision relative to the norms."""
    g = rand_grads(8, 3000, 8)
    g[3] = -g[0] + 0.05 * g[3]  # a nearly opposite pair
    scale = float(g.double().norm(dim=1).max())
    for seed in range(4):
        orders = S.pcgrad_orders(8, torch.Generator().manual_seed(seed))
        coeffs = S.pcgrad_coefficients(S.gramian(g.double()), orders)
        expected = reference_pcgrad(g.double(), orders)
        torch.testing.assert_close(coeffs.sum(0) @ g.double(), expected, rtol=0, atol=1e-9 * scale)
        out = S.pcgrad(g, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * scale)


def test_pcgrad_orders_are_permutations_of_the_others():
    orders = S.pcgrad_orders(6, torch.Generator().manual_seed(0))
    assert orders.shape == (6, 5)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]


def test_pcgrad_two_tasks_properties():
    for seed in range(200):
        g = rand_grads(2, 5, seed, conflict=seed % 2 == 0)
        out = S.pcgrad(g)
        scale = g.norm(dim=1).max() ** 2
        assert (g @ out >= -1e-5 * scale).all(), seed
        torch.testing.assert_close(S.pcgrad(g.flip(0)), out, rtol=1e-5, atol=1e-6)


def test_pcgrad_no_conflict_is_the_sum():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert torch.equal(S.pcgrad(g, torch.Generator().manual_seed(3)), g.sum(0))


def test_pcgrad_zero_gradient_projects_nothing():
    g = torch.tensor([[0.0, 0.0], [-1.0, 1.0], [1.0, 0.0]])
    out = S.pcgrad(g)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))


def test_pcgrad_three_tasks_depends_on_the_order():
    """For T >= 3 the projections do not commute, so PCGrad is not permutation invariant (by design)."""
    g = rand_grads(3, 4, 11, dtype=torch.float64)
    g[2] = -0.5 * g[0] - 0.5 * g[1] + 0.2 * g[2]
    outs = {tuple(S.pcgrad(g, torch.Generator().manual_seed(seed)).tolist()) for seed in range(20)}
    assert len(outs) > 1


def test_pcgrad_aggregator_order_depends_only_on_seed_and_step():
    g = rand_grads(5, 9, 7)
    a, b = S.make_aggregator("pcgrad", seed=3), S.make_aggregator("pcgrad", seed=3)
    outs = [a(g, step) for step in range(6)]
    assert all(torch.equal(b(g, step), outs[step]) for step in reversed(range(6)))
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the order changes with the step


# ----------------------------------------------------------------------------------------------- CAGrad


def cagrad_value(gram, w, c):
    return float(S.cagrad_objective(gram, torch.as_tensor(w, dtype=torch.float64), c))


def simplex_grid(num_tasks, steps):
    pts = [p for p in itertools.product(range(steps + 1), repeat=num_tasks - 1) if sum(p) <= steps]
    w = torch.tensor([[*p, steps - sum(p)] for p in pts], dtype=torch.float64)
    return w / steps


def cagrad_cases(count=24):
    for seed in range(count):
        num_tasks = 2 + seed % 4
        g = rand_grads(num_tasks, 3 + seed % 7, seed, dtype=torch.float64, conflict=seed % 3 != 0)
        if seed % 5 == 0:
            g[-1] = -g[0]  # exact opposition
        if seed % 7 == 0:
            g[-1] = g[0]  # duplicate task (singular Gramian)
        yield g, [0.1, 0.5, 0.9, 1.5][seed % 4]


def test_cagrad_mean_when_c_is_zero():
    g = rand_grads(4, 9, 0)
    assert torch.equal(S.cagrad(g, c=0.0), g.mean(0))
    assert torch.equal(S.cagrad_weights(S.gramian(g), 0.0), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("num_tasks, steps", [(2, 2000), (3, 150)])
def test_cagrad_weights_beat_brute_force_grid(num_tasks, steps):
    grid = simplex_grid(num_tasks, steps)
    for seed in range(10):
        g = rand_grads(num_tasks, 4, seed, dtype=torch.float64)
        gram = g @ g.T
        for c in (0.2, 0.5, 1.0):
            w = S.cagrad_weights(gram, c)
            assert w.min() >= 0 and w.sum().item() == pytest.approx(1.0)
            best_on_grid = S.cagrad_objective(gram, grid, c).min().item()
            assert cagrad_value(gram, w, c) <= best_on_grid + 1e-12 * gram.diagonal().mean().item()


def test_cagrad_weights_match_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    np = pytest.importorskip("numpy")
    for g, c in cagrad_cases(12):
        gram = g @ g.T
        num_tasks, scale = gram.shape[0], gram.diagonal().mean().item()
        a = gram.numpy()

        def f(x, a=a, c=c):
            linear = x @ a @ np.full(len(x), 1 / len(x))
            return float(linear + c * math.sqrt(max(a.mean(), 0)) * math.sqrt(max(x @ a @ x, 0)))

        best = math.inf
        for start in [np.full(num_tasks, 1 / num_tasks), *(0.9 * np.eye(num_tasks) + 0.1 / num_tasks)[:2]]:
            res = optimize.minimize(
                f, start, method="SLSQP", bounds=[(0, 1)] * num_tasks,
                constraints={"type": "eq", "fun": lambda x: 1 - x.sum()}, options={"maxiter": 500, "ftol": 1e-15},
            )
            if res.x.min() >= -1e-9 and abs(res.x.sum() - 1) <= 1e-9:  # SLSQP can return infeasible points
                best = min(best, f(res.x))
        ours = cagrad_value(gram, S.cagrad_weights(gram, c), c)
        assert ours <= best + 1e-9 * scale


def test_cagrad_solves_the_primal():
    """d maximises min_i <g_i, d> over the ball ||d - g0|| <= c ||g0|| (Liu et al. 2021, Eq. (3))."""
    gen = torch.Generator().manual_seed(0)
    for g, c in cagrad_cases():
        g0, gram = g.mean(0), g @ g.T
        d = S.cagrad(g, c=c, rescale=0)
        scale = gram.diagonal().mean().item()
        radius = c * g0.norm().item()
        assert (d - g0).norm().item() <= radius * (1 + 1e-9) + 1e-12
        worst = (g @ d).min().item()
        # Strong duality: the worst task's improvement equals the dual optimum.
        dual = cagrad_value(gram, S.cagrad_weights(gram, c), c)
        assert worst == pytest.approx(dual, abs=1e-8 * scale)
        assert worst >= (g @ g0).min().item() - 1e-9 * scale
        for _ in range(20):  # no point of the ball does better
            u = torch.randn(g.shape[1], generator=gen, dtype=torch.float64)
            other = g0 + radius * torch.rand(1, generator=gen, dtype=torch.float64) * u / u.norm()
            assert worst >= (g @ other).min().item() - 1e-9 * scale


def test_cagrad_fista_fallback_agrees_with_exact_search():
    for g, c in cagrad_cases(12):
        gram = g @ g.T
        exact = cagrad_value(gram, S.cagrad_weights(gram, c), c)
        fallback = cagrad_value(gram, S.cagrad_weights(gram, c, max_faces=0), c)
        assert fallback == pytest.approx(exact, abs=1e-7 * gram.diagonal().mean().item())


def test_cagrad_permutation_invariant_and_rescale():
    for seed in range(6):
        g = rand_grads(4, 8, seed, dtype=torch.float64)
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(S.cagrad(g[perm]), S.cagrad(g), rtol=1e-7, atol=1e-9)
        d = S.cagrad(g, c=0.4, rescale=0)
        torch.testing.assert_close(S.cagrad(g, c=0.4, rescale=1), d / 1.16)
        torch.testing.assert_close(S.cagrad(g, c=0.4, rescale=2), d / 1.4)


def test_cagrad_degenerate_inputs_are_finite():
    g = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])  # g0 = 0: the ball is a point
    torch.testing.assert_close(S.cagrad(g), torch.zeros(2))
    assert torch.equal(S.cagrad(torch.zeros(3, 4)), torch.zeros(4))
    w = S.cagrad_weights(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), 2.0)  # optimum where g_w = 0
    assert torch.isfinite(w).all()


# ----------------------------------------------------------------------------------------------- SAM-GS


def reference_sam_gs(seq, gamma, b1, b2):
    """``SAMGS.balance_magnitude`` of ThomBors/samgs, on (n, T) columns, as in the authors' code."""
    m, v, outs = 0, 0, []
    for t, grads in enumerate(seq, 1):
        w = grads.T.clone()
        mg = torch.linalg.norm(w, dim=0).unsqueeze(1)
        sim_matrix = 2 * (mg @ mg.T) / (mg**2 + mg.T**2)
        sims = sim_matrix[torch.triu(torch.ones_like(sim_matrix, dtype=torch.bool), diagonal=1)]
        m = b1 * m + (1 - b1) * w
        v = b2 * v + ((1 - b2) * (1 - sims.mean()) ** 2) + 1e-8
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        if sims.mean() < gamma:
            norms = torch.norm(w, dim=0, p=2)
            outs.append((w / norms * norms.mean()).sum(1))
        else:
            outs.append((w * abs(mhat) / torch.sqrt(vhat)).sum(1))
    return outs


def sam_gs_sequence(steps=8, num_tasks=3, n=6):
    seq = []
    for step in range(steps):
        g = rand_grads(num_tasks, n, 100 + step, dtype=torch.float64)
        if step % 3 == 1:
            g[0] *= 60.0  # dissimilar magnitudes: the equalisation branch
        seq.append(g)
    return seq


def test_sam_gs_matches_reference():
    seq = sam_gs_sequence()
    for gamma in (0.1, 0.7):
        expected = reference_sam_gs(seq, gamma, 0.9, 0.99)
        state = S.init_sam_gs_state()
        for grads, ref in zip(seq, expected):
            torch.testing.assert_close(S.sam_gs(grads, state, gamma=gamma), ref, rtol=1e-10, atol=1e-10)
    assert state.step == len(seq)


def test_sam_gs_branches():
    # Dissimilar magnitudes (similarity 2*100/(100^2+1) < 0.1): each gradient rescaled to the mean norm 50.5.
    g = torch.tensor([[100.0, 0.0], [0.0, 1.0]])
    assert S.gradient_magnitude_similarity(g.norm(dim=1)).item() == pytest.approx(200 / 10001)
    torch.testing.assert_close(S.sam_gs(g, S.SamGsState()), torch.tensor([50.5, 50.5]))
    # Equal magnitudes (similarity 1): first step m_hat = g, v_hat = eps / (1 - beta2): g * |g| / 1e-3.
    g = torch.tensor([[1.0, 0.0], [0.0, -2.0]]) / torch.tensor([[1.0], [2.0]])
    torch.testing.assert_close(S.sam_gs(g, S.SamGsState()), torch.tensor([1000.0, -1000.0]))
    # A zero gradient stays zero in the equalisation branch (no 0/0).
    out = S.sam_gs(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), S.SamGsState())
    torch.testing.assert_close(out, torch.tensor([1.5, 2.0]))


def test_sam_gs_permutation_invariant():
    seq = sam_gs_sequence(num_tasks=4)
    perm = torch.tensor([2, 0, 3, 1])
    s1, s2 = S.SamGsState(), S.SamGsState()
    for grads in seq:
        torch.testing.assert_close(S.sam_gs(grads[perm], s2), S.sam_gs(grads, s1), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------ GCond


def reference_gcond(seq, thresholds=(-0.8, -0.5, 0.0), power=2.0, window=3, weights=(0.8, 0.2), ema_beta=0.95,
                    beta=0.85, max_iters=None, norm_cap=None, smooth=True):
    """``GradientConductor._project`` / ``_run_arbitrator`` / ``_momentum_update`` of AlevLab-dev/GCond on
    plain vectors, with the deviations documented in :func:`gcond` (raw previous gradients, a yielding
    dominant task, zero-only guards, decisions with a tolerance of ``S.COSINE_TOL``)."""
    crit, main, weak = thresholds
    ema, history, prev, m, outs = None, deque(maxlen=window), None, None, []

    def dominant(k):
        return window > 0 and len(history) == window and history.count(k) == window

    def arbitrate(i, j, g):
        if dominant(i) and not dominant(j):
            return j, i
        if dominant(j) and not dominant(i):
            return i, j
        ni, nj = g[i].norm().item(), g[j].norm().item()
        stab = [0.0, 0.0]
        if prev is not None:
            stab = [max(torch.dot(g[k], prev[k]).item() / (g[k].norm() * prev[k].norm()).item(), 0) for k in (i, j)]
        si, sj = ni / ema[i], nj / ema[j]
        score_i = weights[0] * stab[0] + weights[1] * si / (si + sj)
        score_j = weights[0] * stab[1] + weights[1] * sj / (si + sj)
        return (j, i) if score_j > score_i + S.COSINE_TOL else (i, j)

    for t, grads in enumerate(seq, 1):
        g = [row.double().clone() for row in grads]
        raw, num = [x.clone() for x in g], len(g)
        ema = ema or [1.0] * num
        ema = [max(ema_beta * e + (1 - ema_beta) * x.norm().item(), 1e-30) for e, x in zip(ema, g)]
        if norm_cap is not None:
            g = [x * (norm_cap / x.norm()) if x.norm() > norm_cap else x for x in g]
        floor = 1e-20 * max(x.norm().item() for x in raw) ** 2
        for _ in range(max_iters or 2 * num):
            cosines = [
                ((i, j), (torch.dot(g[i], g[j]) / (g[i].norm() * g[j].norm())).item())
                for i in range(num) for j in range(i + 1, num)
                if g[i].norm() ** 2 > floor and g[j].norm() ** 2 > floor
            ]
            low = min((cos for _, cos in cosines), default=weak)
            if not low < weak - S.COSINE_TOL:  # a resolved pair (cosine 0 up to rounding) is no conflict
                break
            (i, j), low = next((pair, cos) for pair, cos in cosines if cos <= low + S.COSINE_TOL)
            dot = torch.dot(g[i], g[j])
            if smooth:
                w, lo = arbitrate(i, j, g)
                if window > 0:
                    history.append(w)
                if low >= main:
                    angle = math.pi / 2 * (1 - min(max((low - main) / (weak - main), 0), 1))
                elif low > crit:
                    angle = math.pi / 2 + math.pi / 2 * ((low - main) / (crit - main)) ** power
                else:
                    angle = math.pi
                s_w = 0.0 if angle == math.pi else math.sin(angle)
                s_l = math.sin(min(angle, math.pi / 2))
                g[w], g[lo] = g[w] - s_w * dot / g[lo].norm() ** 2 * g[lo], g[lo] - s_l * dot / g[w].norm() ** 2 * g[w]
            elif low < main:
                w, lo = arbitrate(i, j, g)
                projected = g[lo] - torch.dot(g[lo], g[w]) / g[w].norm() ** 2 * g[w]
                g[lo] = torch.zeros_like(g[lo]) if low < crit else projected
                if window > 0:
                    history.append(w)
            else:
                g[i], g[j] = g[i] - dot / g[j].norm() ** 2 * g[j], g[j] - dot / g[i].norm() ** 2 * g[i]
        total = torch.stack(g).sum(0)
        m = total * (1 - beta) if m is None else beta * m + (1 - beta) * total
        outs.append(m / (1 - beta**t))
        prev = raw
    return outs


def gcond_sequence(steps=6, num_tasks=4, n=7, seed=0):
    return [rand_grads(num_tasks, n, seed + 10 * step, dtype=torch.float64) for step in range(steps)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_smooth_logic": False},
        {"norm_cap": 1.0, "dominance_window": 2},
        {"dominance_window": 0, "projection_max_iters": 3, "tie_breaking_weights": (0.3, 0.7)},
    ],
)
def test_gcond_matches_reference(options):
    names = {"use_smooth_logic": "smooth", "norm_cap": "norm_cap", "dominance_window": "window",
             "projection_max_iters": "max_iters", "tie_breaking_weights": "weights"}
    seq = gcond_sequence()
    expected = reference_gcond(seq, **{names[k]: v for k, v in options.items()})
    state = S.init_gcond_state()
    for grads, ref in zip(seq, expected):
        torch.testing.assert_close(S.gcond(grads, state, **options), ref, rtol=1e-9, atol=1e-9)


def run_gcond(g, state=None, **options):
    state = state if state is not None else S.GCondState()
    return S.gcond(g, state, momentum_beta=0.0, **options), state


def test_gcond_no_conflict_is_the_sum():
    g = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    out, state = run_gcond(g)
    torch.testing.assert_close(out, g.sum(0))
    assert state.history == []


def ulp_variants(g, count=6, max_ulps=4, seed=0):
    """``g`` and ``count`` copies with every entry moved by 1 to ``max_ulps`` ulps in a random direction: a
    decision that holds for all of them does not depend on the direction of rounding."""
    gen = torch.Generator().manual_seed(seed)
    variants = [g]
    for _ in range(count):
        moved = g.clone()
        toward = torch.where(torch.rand(g.shape, generator=gen) < 0.5, -math.inf, math.inf).to(g.dtype)
        steps = torch.randint(1, max_ulps + 1, g.shape, generator=gen)
        for k in range(1, max_ulps + 1):
            moved = torch.where(steps >= k, torch.nextafter(moved, toward), moved)
        assert not torch.equal(moved, g)
        variants.append(moved)
    return variants


def assert_close_to_norms(out, expected, g):
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * float(g.double().norm(dim=1).max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gcond_critical_conflict(dtype):
    # cos = -0.995 < -0.8. Norms 1 and 1.005 with both EMAs near 1: task 1 is "stronger" and wins; the loser
    # (task 0) is projected onto task 1's normal plane and task 1 is untouched (smooth logic). The pair is
    # then resolved (cosine 0 up to rounding, of either sign): one arbitration, whatever the rounding.
    for g in ulp_variants(torch.tensor([[1.0, 0.0], [-1.0, 0.1]], dtype=dtype)):
        out, state = run_gcond(g)
        h = g.double()
        assert_close_to_norms(out.double(), h[1] + h[0] - (h[0] @ h[1]) / (h[1] @ h[1]) * h[1], g)
        assert state.history == [1]
        out, state = run_gcond(g, use_smooth_logic=False)  # 4-zone logic: the loser is dropped
        assert_close_to_norms(out, g[1], g)
        assert state.history == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gcond_stability_and_dominance_decide_the_winner(dtype):
    prev = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    for g in ulp_variants(torch.tensor([[1.0, 0.0], [-1.0, 0.1]], dtype=dtype)):
        h = g.double()
        keeps_task0 = h[0] + h[1] - (h[0] @ h[1]) / (h[0] @ h[0]) * h[0]
        keeps_task1 = h[1] + h[0] - (h[0] @ h[1]) / (h[1] @ h[1]) * h[1]
        # Last step both tasks pointed along (1, 0): task 0 is stable, task 1 flipped, so task 0 wins.
        state = S.GCondState(norm_ema=[1.0, 1.0], prev=prev.clone(), prev_norms=[1.0, 1.0])
        out, state = run_gcond(g, state)
        assert_close_to_norms(out.double(), keeps_task0, g)
        assert state.history == [0]
        # Same, but task 0 won the last 3 arbitrations: the dominant task yields.
        state = S.GCondState(norm_ema=[1.0, 1.0], history=[0, 0, 0], prev=prev.clone(), prev_norms=[1.0, 1.0])
        out, state = run_gcond(g, state)
        assert_close_to_norms(out.double(), keeps_task1, g)
        assert state.history == [0, 0, 1]


def test_gcond_main_and_weak_zones():
    # Main zone, cos = -0.6: equal norms and EMAs tie the scores (up to rounding: within COSINE_TOL), task 0
    # wins; t = 1/3, angle = pi/2 (1 + 1/9).
    s_w = math.sin(math.pi / 2 * (1 + 1 / 9))
    for g in ulp_variants(torch.tensor([[1.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)):
        out, state = run_gcond(g)
        assert_close_to_norms(out, (g[0] + 0.6 * s_w * g[1]) + (g[1] + 0.6 * g[0]), g)
        assert state.history[0] == 0
    # Weak zone, cos = -0.3: t = 0.4, both move by sin(0.3 pi) of a full projection (one iteration).
    s = math.sin(0.3 * math.pi)
    for g in ulp_variants(torch.tensor([[1.0, 0.0], [-0.3, math.sqrt(0.91)]], dtype=torch.float64)):
        out, _ = run_gcond(g, projection_max_iters=1)
        assert_close_to_norms(out, (g[0] + 0.3 * s * g[1]) + (g[1] + 0.3 * s * g[0]), g)
        out, state = run_gcond(g, use_smooth_logic=False)  # 4-zone: full symmetric projection, conflict gone
        assert_close_to_norms(out, (g[0] + 0.3 * g[1]) + (g[1] + 0.3 * g[0]), g)
        assert state.history == []


def test_gcond_resolved_pair_is_not_rearbitrated():
    """After the loser is projected, the pair's cosine is 0 up to rounding, of either sign: it is not a
    conflict any more, so the arbitration happens once, and the winner history does not depend on rounding."""
    state = S.GCondState()
    gram = [[1.0, -6.9e-18], [-6.9e-18, 1.0]]  # what one machine computed for a resolved pair
    assert GC._gcond_worst_pair(gram, 0.0, 0.0) is None
    gram[0][1] = gram[1][0] = -2e-9  # a real (tiny) conflict is still one
    assert GC._gcond_worst_pair(gram, 0.0, 0.0) == (0, 1, -2e-9)
    for g in ulp_variants(rand_grads(4, 9, 3, dtype=torch.float64), count=4):
        histories = []
        for variant in ulp_variants(g, count=3, seed=1):
            state = S.GCondState()
            run_gcond(variant, state)
            histories.append(state.history)
        assert all(h == histories[0] for h in histories), histories


def test_gcond_norm_cap_and_momentum():
    g = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    out, state = run_gcond(g, norm_cap=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]))
    assert state.norm_ema == pytest.approx([0.95 + 0.05 * 3.0, 1.0])
    # Momentum with bias correction: a constant input returns itself from the first step on.
    state = S.GCondState()
    for _ in range(3):
        torch.testing.assert_close(S.gcond(g, state, momentum_beta=0.85), g.sum(0))


def test_gcond_permutation_invariant():
    seq = gcond_sequence(steps=5, seed=3)
    perm = torch.tensor([3, 1, 0, 2])
    s1, s2 = S.GCondState(), S.GCondState()
    for grads in seq:
        torch.testing.assert_close(S.gcond(grads[perm], s2), S.gcond(grads, s1), rtol=1e-9, atol=1e-9)
    assert [perm.tolist()[h] for h in s2.history] == s1.history


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    "method, options",
    [("sam_gs", {"gamma": 0.7}), ("gcond", {}), ("gcond", {"use_smooth_logic": False}), ("pcgrad", {"seed": 5}),
     ("cagrad", {"c": 0.4}), ("mean", {})],
)
def test_state_round_trip_is_bit_exact(method, options):
    seq = [rand_grads(3, 9, 50 + k) * (40.0 if k % 3 == 1 else 1.0) for k in range(8)]
    straight = S.make_aggregator(method, **options)
    outs, saved = [], None
    for step, grads in enumerate(seq):
        if step == 4:
            buffer = io.BytesIO()
            torch.save(straight.state_dict(), buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=False)
        outs.append(straight(grads, step))
    resumed = S.make_aggregator(method, **options)
    resumed.load_state_dict(saved)
    for step in range(4, len(seq)):
        assert torch.equal(resumed(seq[step], step), outs[step]), step
    assert saved["method"] == method and saved["options"] == straight.options
    assert all(saved["options"][k] == v for k, v in options.items())


def test_state_dict_is_a_copy_and_reset_forgets():
    agg = S.make_aggregator("sam_gs")
    agg(rand_grads(2, 4, 0), 0)
    sd = agg.state_dict()
    m = sd["state"]["m"].clone()
    agg(rand_grads(2, 4, 1), 1)
    assert torch.equal(sd["state"]["m"], m)
    agg.reset()
    assert agg.state_dict()["state"]["step"] == 0


def test_gcond_float32_and_float64_make_the_same_decisions():
    """A task projected (towards) zero again and again ends as rounding noise of the float32 Gramian: the floor
    relative to its own norm takes it out of the arbitration in both dtypes alike."""
    torch.manual_seed(0)
    b, c = torch.randn(200_000), torch.randn(200_000)
    for g in (torch.stack([b, -2 * b, c, -c + 0.3 * b]), torch.stack([b, -b, 3 * b, -0.5 * b])):
        s32, s64 = S.GCondState(), S.GCondState()
        out32 = S.gcond(g, s32, momentum_beta=0.0).double()
        out64 = S.gcond(g.double(), s64, momentum_beta=0.0)
        assert s32.history == s64.history
        assert float((out32 - out64).norm()) <= 1e-4 * float(out64.norm())
