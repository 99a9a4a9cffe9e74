"""The Grokfast filters against hand-computed values and the authors' reference implementation."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from lightning_optx.functional import grokfast as F


def reference_gradfilter_ema(grads_seq, alpha, lamb):
    """The authors' ``gradfilter_ema`` (per-parameter Python loop), on a sequence of gradient lists."""
    state = None
    out = []
    for grads in grads_seq:
        if state is None:
            state = [g.detach().clone() for g in grads]
        new = []
        for i, g in enumerate(grads):
            state[i] = state[i] * alpha + g.detach() * (1 - alpha)
            new.append(g + state[i] * lamb)
        out.append(new)
    return out


def reference_gradfilter_ma(grads_seq, window_size, lamb, warmup):
    """The authors' ``gradfilter_ma`` with ``filter_type='mean'`` (a deque of tensors per parameter)."""
    queues = None
    out = []
    for grads in grads_seq:
        if queues is None:
            queues = [deque(maxlen=window_size) for _ in grads]
        new = []
        for q, g in zip(queues, grads):
            q.append(g.detach().clone())
            if not warmup or len(q) == window_size:
                new.append(g + sum(q) / len(q) * lamb)
            else:
                new.append(g.clone())
        out.append(new)
    return out


def random_grad_sequence(steps, shapes=((3, 4), (5,), (2, 2, 2)), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


def run_ema(seq, alpha, lamb):
    ema = None
    out = []
    for grads in seq:
        grads = [g.clone() for g in grads]
        if ema is None:
            ema = F.init_ema(grads)
        F.ema_filter_(grads, ema, alpha, lamb)
        out.append(grads)
    return out, ema


def run_ma(seq, window_size, lamb, warmup):
    state = None
    out, flags = [], []
    for grads in seq:
        grads = [g.clone() for g in grads]
        if state is None:
            state = F.init_moving_average(grads, window_size)
        flags.append(F.moving_average_filter_(grads, state, lamb, warmup))
        out.append(grads)
    return out, state, flags


def test_ema_by_hand():
    # alpha=0.5, lamb=1: h1 = g1 = 1 -> 2; h2 = 0.5*1 + 0.5*3 = 2 -> 3 + 2 = 5; h3 = 0.5*2 + 0.5*(-2) = 0 -> -2
    out, ema = run_ema([[torch.tensor([1.0])], [torch.tensor([3.0])], [torch.tensor([-2.0])]], 0.5, 1.0)
    assert [o[0].item() for o in out] == [2.0, 5.0, -2.0]
    assert ema[0].item() == 0.0


@pytest.mark.parametrize(("alpha", "lamb"), [(0.98, 2.0), (0.8, 0.5), (0.0, 1.0)])
def test_ema_matches_reference(alpha, lamb):
    seq = random_grad_sequence(25)
    ours, _ = run_ema(seq, alpha, lamb)
    ref = reference_gradfilter_ema(seq, alpha, lamb)
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_ma_by_hand():
    # window 2, lamb 1, warmup: step 1 untouched; then g + mean of the last two gradients
    seq = [[torch.tensor([1.0])], [torch.tensor([3.0])], [torch.tensor([5.0])], [torch.tensor([-1.0])]]
    out, state, flags = run_ma(seq, window_size=2, lamb=1.0, warmup=True)
    assert [o[0].item() for o in out] == [1.0, 5.0, 9.0, 1.0]
    assert flags == [False, True, True, True]
    assert state.count == 2


def test_ma_without_warmup_uses_partial_window():
    seq = [[torch.tensor([2.0])], [torch.tensor([4.0])]]
    out, _, flags = run_ma(seq, window_size=5, lamb=1.0, warmup=False)
    assert [o[0].item() for o in out] == [4.0, 7.0]
    assert flags == [True, True]


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("window_size", [1, 3, 7])
def test_ma_matches_reference(window_size, warmup):
    seq = random_grad_sequence(23, seed=window_size)
    ours, _, _ = run_ma(seq, window_size, 5.0, warmup)
    ref = reference_gradfilter_ma(seq, window_size, 5.0, warmup)
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_ma_running_sum_is_exact_over_many_laps():
    # integer-valued gradients: every partial sum is exact in float32, so any drift would show exactly
    gen = torch.Generator().manual_seed(3)
    state = F.init_moving_average([torch.zeros(10)], 4)
    for _ in range(103):
        grads = [torch.randint(-1000, 1000, (10,), generator=gen).float()]
        F.moving_average_filter_(grads, state, 1.0, True)
        assert torch.equal(state.total[0], state.ring[0].sum(0))


def test_ma_work_per_step_does_not_grow_with_window():
    """The ring is written at one slot per step: the other slots are untouched (no O(window) work)."""
    state = F.init_moving_average([torch.zeros(4)], 50)
    F.moving_average_filter_([torch.ones(4)], state, 1.0, True)
    before = state.ring[0].clone()
    F.moving_average_filter_([torch.full((4,), 2.0)], state, 1.0, True)
    changed_rows = (state.ring[0] != before).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [1]


def test_low_precision_gradients_keep_float32_state():
    seq = random_grad_sequence(5, dtype=torch.bfloat16)
    out, ema = run_ema(seq, 0.9, 2.0)
    assert all(e.dtype == torch.float32 for e in ema)
    assert all(o.dtype == torch.bfloat16 for o in out[-1])
    _, state, _ = run_ma(seq, 3, 2.0, True)
    assert all(r.dtype == torch.float32 for r in state.ring)
    ref = reference_gradfilter_ema([[g.float() for g in s] for s in seq], 0.9, 2.0)
    for x, y in zip(out[-1], ref[-1]):
        torch.testing.assert_close(x.float(), y, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 1.0, "lamb": 2.0}, "alpha"),
        ({"alpha": -0.1, "lamb": 2.0}, "alpha"),
        ({"alpha": 0.9, "lamb": -1.0}, "lamb"),
        ({"alpha": 0.9, "lamb": float("nan")}, "lamb"),
    ],
)
def test_ema_argument_errors(kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}`.*{name}="):
        F.check_ema_args(**kwargs)


@pytest.mark.parametrize("window_size", [0, -3, 2.5, True])
def test_ma_argument_errors(window_size):
    with pytest.raises(ValueError, match=r"`window_size` must be an integer >= 1, got window_size="):
        F.check_ma_args(window_size, 1.0)
