"""Cast (fp16 / bf16 all-reduce) on one process: rounding, overflow, error feedback, bytes, errors.

The 2-process checks (close to the mean, 6e4 on each rank without overflow, ledger bytes) are in
``test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_optx.compression import Cast
from lightning_optx.distributed import Communicator


def _reduce(cast: Cast, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [t.clone() for t in tensors]
    cast.reduce_(out, [f"t{i}" for i in range(len(out))], Communicator())
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_single_process_is_the_rounded_input(dtype: torch.dtype) -> None:
    g = [torch.randn(8, 5), torch.randn(5)]
    out = _reduce(Cast(dtype), g)
    for o, t in zip(out, g):
        assert o.dtype == torch.float32
        assert torch.equal(o, t.to(dtype).float())


def test_overflow_is_inf_in_fp16_but_not_in_bf16() -> None:
    """A mean beyond fp16's range (65504) is inf, which an AMP grad scaler detects; bf16 has fp32's range."""
    g = [torch.full((3,), 1e5)]
    assert torch.isinf(_reduce(Cast(torch.float16), g)[0]).all()
    torch.testing.assert_close(_reduce(Cast(torch.bfloat16), g)[0], g[0], rtol=1e-2, atol=0)


def test_error_feedback_conservation_single_process() -> None:
    cast = Cast(torch.bfloat16, error_feedback=True)
    sent, total = torch.zeros(6, 4), torch.zeros(6, 4)
    for step in range(8):
        g = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        t = g.clone()
        cast.reduce_([t], ["w"], Communicator())
        sent += t
        total += g
    torch.testing.assert_close(sent + cast.residuals["w"], total, atol=1e-6, rtol=0)


def test_without_error_feedback_keeps_nothing() -> None:
    cast = Cast(torch.float16)
    _reduce(cast, [torch.randn(4, 4)])
    assert cast.residuals == {} and not cast.error_feedback


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_keeps_its_dtype(dtype: torch.dtype) -> None:
    t = torch.randn(4, 4).to(dtype)
    out = _reduce(Cast(torch.float16), [t])[0]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), t.float(), atol=1e-2, rtol=1e-2)


def test_payload_bytes() -> None:
    tensors = [torch.zeros(8, 5), torch.zeros(5), torch.zeros(0)]
    assert Cast(torch.float16).payload_bytes(tensors, 2) == 2 * 45
    assert Cast(torch.bfloat16).payload_bytes(tensors, 1) == 0
    assert Cast(torch.float16).compression_ratio(tensors, 2) == 2.0
    assert Cast().level == 0.5


def test_empty_input() -> None:
    Cast().reduce_([], [], Communicator())
    t = torch.zeros(0)
    Cast().reduce_([t], ["t"], Communicator())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, torch.int32, "float16"])
def test_bad_dtype(dtype: object) -> None:
    with pytest.raises(ValueError, match=r"`dtype` must be torch.float16 or torch.bfloat16, got dtype="):
        Cast(dtype)  # type: ignore[arg-type]
