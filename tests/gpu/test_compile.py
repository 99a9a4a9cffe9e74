"""Grokfast, GradES, DropoutSchedule and GradientSurgery on one GPU under torch.compile (inductor): the checks of
test_callbacks.py, in their own file so that pytest-xdist (``--dist loadfile``) runs these five compiling
fits on another worker than the fp16 / bf16 ones."""

from __future__ import annotations

import pytest

from tests.gpu.device import pytestmark  # noqa: F401  (marker, skip)
from tests.gpu.test_callbacks import (
    check_dropout_rates,
    check_grades_freezing,
    check_gradient_surgery,
    check_grokfast_filter,
)


@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_grokfast_filter_equals_the_reference_compiled(filter_name):
    check_grokfast_filter(filter_name, "compile")


def test_grades_freezes_and_frozen_matrices_never_move_compiled():
    check_grades_freezing("compile")


def test_dropout_rates_follow_the_schedule_compiled():
    check_dropout_rates("compile")


# GradientSurgery switches AOTAutograd's donated buffers off for the fit (its T autograd.grad calls retain the
# graph), so it runs under inductor; this checks it on the GPU.
def test_gradient_surgery_sum_equals_plain_training_and_pcgrad_sees_the_conflict_compiled():
    check_gradient_surgery("compile")
