"""Dropout schedules against their definitions."""

from __future__ import annotations

import pytest

from lightning_optx.functional import schedules as S


def rates(mode, shape, total=10, p=0.5, cutoff=4):
    return [S.dropout_rate(s, total, mode, p, cutoff, shape) for s in range(total)]


def test_early_constant_and_linear():
    assert rates("early", "constant") == [0.5] * 4 + [0.0] * 6
    assert rates("early", "linear") == [0.5, 0.375, 0.25, 0.125] + [0.0] * 6


def test_late_constant_and_linear():
    assert rates("late", "constant") == [0.0] * 4 + [0.5] * 6
    late = rates("late", "linear")
    assert late[:4] == [0.0] * 4
    assert late[4:] == pytest.approx([0.5 * k / 6 for k in range(1, 7)])


def test_standard_is_constant():
    assert rates("standard", "linear") == [0.5] * 10


def test_cutoff_as_fraction_or_steps():
    assert S.resolve_cutoff(0.25, 100) == 25
    assert S.resolve_cutoff(30, 100) == 30


def test_quantize():
    assert S.quantize(0.37, 1.0, 5) == pytest.approx(0.25)
    assert S.quantize(0.4, 1.0, 5) == pytest.approx(0.5)
    assert S.quantize(0.37, 1.0, 0) == 0.37
    assert len({S.quantize(r, 0.5, 4) for r in rates("early", "linear", total=100, cutoff=90)}) <= 4


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"mode": "middle"}, r"`mode` must be 'early', 'late' or 'standard', got mode='middle'"),
    ({"p": 1.0}, r"`p` must be in \[0, 1\), got p=1.0"),
    ({"shape": "cosine"}, r"`shape` must be 'linear' or 'constant', got shape='cosine'"),
    ({"cutoff": -1}, r"`cutoff` as a number of steps must be >= 0, got cutoff=-1"),
    ({"cutoff": 1.5}, r"`cutoff` as a fraction of training must be in \(0, 1\), got cutoff=1.5"),
    ({"cutoff": "10"}, r"`cutoff` must be a number of steps"),
])
def test_argument_errors(kwargs, pattern):
    args = {"mode": "early", "p": 0.1, "cutoff": 10, "shape": "linear", **kwargs}
    with pytest.raises(ValueError, match=pattern):
        S.check_schedule_args(**args)
