"""Norm helpers shared by several methods: accumulation dtype per input dtype."""

from __future__ import annotations

import pytest
import torch

from lightning_optx.functional.common import all_finite, foreach_norms, global_norm
from lightning_optx.functional.grades import group_mean_abs

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_of_every_float_dtype(dtype):
    tensors = [torch.full((4,), 3.0, dtype=dtype), torch.full((9,), -2.0, dtype=dtype)]
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    norms = foreach_norms(tensors)
    assert norms.dtype == expected_dtype
    torch.testing.assert_close(norms, torch.tensor([6.0, 6.0], dtype=expected_dtype))
    assert global_norm(tensors).item() == pytest.approx(72 ** 0.5, rel=1e-6)
    assert all_finite(tensors)
    torch.testing.assert_close(group_mean_abs(tensors, [2]), torch.tensor([30.0 / 13]))
    assert not all_finite([*tensors, torch.tensor([float("inf")], dtype=dtype)])


def test_mixed_dtypes_are_accumulated_in_the_widest():
    tensors = [torch.tensor([3.0], dtype=torch.float16), torch.tensor([4.0], dtype=torch.float64),
               torch.tensor([12.0], dtype=torch.bfloat16)]
    norms = foreach_norms(tensors, ord=1)
    assert norms.dtype == torch.float64
    assert norms.tolist() == [3.0, 4.0, 12.0]
    assert global_norm(tensors).item() == 13.0


def test_float64_keeps_precision_float32_would_lose():
    t = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    assert foreach_norms([t], ord=1).item() == 1.0 + 1e-9


def test_fp16_beyond_its_range_is_finite():
    big = torch.full((4096,), 60000.0, dtype=torch.float16)  # the fp16 sum of squares overflows
    assert all_finite([big])
    assert global_norm([big]).item() == pytest.approx(60000.0 * 64, rel=1e-3)
