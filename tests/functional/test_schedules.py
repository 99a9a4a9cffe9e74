"""Dropout schedules against their definitions."""

from __future__ import annotations

import pytest

from lightning_optx.functional import schedules as S


def rates(mode, shape, total=10, p=0.5, cutoff=4):
    return [S.dropout_rate(s, total, mode, p, cutoff, shape) for s in range(total)]


def test_early_constant_and_linear():
    assert rates("early", "constant") == [0.5] * 4 + [0.0] * 6
    assert rates("early", "linear") == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0] + [0.0] * 6)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.123])
@pytest.mark.parametrize("cutoff", [1, 2, 7, 50])
def test_early_linear_is_the_authors_linspace_bit_for_bit(p, cutoff):
    """The authors' drop_scheduler: early linear rates are np.linspace(p, 0, cutoff), then zeros."""
    np = pytest.importorskip("numpy")
    total = cutoff + 5
    expected = np.concatenate([np.linspace(p, 0, cutoff), np.zeros(total - cutoff)]).tolist()
    assert rates("early", "linear", total=total, p=p, cutoff=cutoff) == expected


def test_depth_profile_scales_the_built_rates():
    built = [0.0, 0.1 / 3, 0.2 / 3, 0.1]  # timm: linspace(0, drop_path_rate=0.1, depth=4)
    assert S.depth_profile(built, 0.3) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert S.depth_profile(built, 0.0) == [0.0] * 4
    assert S.depth_profile([0.0, 0.0], 0.2) == [0.2, 0.2]  # no profile to keep: uniform


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
