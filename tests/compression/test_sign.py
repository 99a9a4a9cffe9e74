"""Sign (1-bit) compression on one process: the code, bit packing, error feedback, bytes, errors.

The 2-process checks (mean of the ranks' scaled signs, identical on both ranks, ledger bytes, resume) are
in ``test_distributed.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_optx.compression import Sign
from lightning_optx.compression.sign import pack_bits, unpack_bits
from lightning_optx.distributed import Communicator

SHAPES = {"w": (16, 12), "conv": (4, 2, 3, 3), "bias": (12,), "small": (7, 9)}


def _grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _reduce(sign: Sign, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {k: v.clone() for k, v in grads.items()}
    sign.reduce_(list(tensors.values()), list(tensors), Communicator())
    sign.end_iteration()
    return tensors


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_pack_unpack_round_trip(numel: int) -> None:
    bits = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
    assert torch.equal(unpack_bits(packed, numel), bits)


def test_single_rank_decodes_to_scaled_sign() -> None:
    grads = _grads(0)
    sign = Sign()
    out = _reduce(sign, grads)
    for key in ("w", "conv"):
        g = grads[key]
        assert torch.equal(out[key], torch.sign(g) * g.abs().mean())     # exactly, no zero entries here
        assert torch.equal(sign.residuals[key], g - out[key])
    for key in ("bias", "small"):  # 1-D, and 63 < min_numel entries: raw
        assert torch.equal(out[key], grads[key]) and key not in sign.residuals


def test_zero_is_sent_as_plus() -> None:
    t = torch.tensor([[0.0, -2.0, 2.0, 4.0]] * 16)
    Sign().reduce_([t], ["w"], Communicator())
    assert torch.equal(t[0], torch.tensor([2.0, -2.0, 2.0, 2.0]))


def test_error_feedback_conservation_single_process() -> None:
    sign = Sign()
    sent = {k: torch.zeros(s) for k, s in SHAPES.items()}
    total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for step in range(6):
        grads = _grads(step)
        out = _reduce(sign, grads)
        for k in SHAPES:
            sent[k] += out[k]
            total[k] += grads[k]
    for k in SHAPES:
        torch.testing.assert_close(sent[k] + sign.residuals.get(k, 0), total[k], atol=1e-5, rtol=0)


def test_error_feedback_recovers_a_constant_gradient() -> None:
    """A fixed gradient: with EF the running average of the 1-bit outputs approaches it, without EF it cannot."""
    g = torch.linspace(-1.0, 2.0, 128).view(8, 16)
    errors = {}
    for ef in (True, False):
        sign, acc = Sign(error_feedback=ef), torch.zeros(8, 16)
        for _ in range(400):
            t = g.clone()
            sign.reduce_([t], ["w"], Communicator())
            acc += t
        errors[ef] = (acc / 400 - g).abs().max().item()
    assert errors[True] < 0.1 < 0.9 < errors[False]


def test_payload_bytes_and_ratio() -> None:
    grads = _grads(0)
    sign = Sign()
    # w: 192 entries -> 2 chunks of 96 bits (12 bytes); conv: 72 entries -> 2 chunks of 40 bits (5 bytes);
    # all-to-all 2 x 17 bytes, worker scales 2 x 4, server scales and chunk 2 x 4 + 17; raw 1-D and small
    assert sign.payload_bytes(list(grads.values()), 2) == 2 * 17 + 8 + 8 + 17 + 4 * 12 + 4 * 63
    assert sign.payload_bytes(list(grads.values()), 1) == 0
    big = [torch.zeros(1024, 1024)]
    assert 31.9 < sign.compression_ratio(big, 2) <= 32.0
    assert sign.level == 1 / 32


def test_min_numel() -> None:
    grads = _grads(0)
    out = _reduce(Sign(min_numel=1), grads)
    assert not torch.equal(out["small"], grads["small"])  # now compressed
    assert torch.equal(out["bias"], grads["bias"])        # 1-D stays raw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype: torch.dtype) -> None:
    g = torch.randn(16, 12).to(dtype)
    t = g.clone()
    sign = Sign()
    sign.reduce_([t], ["w"], Communicator())
    assert t.dtype == dtype and sign.residuals["w"].dtype == torch.float32
    expected = (torch.sign(g.float()) * g.float().abs().mean()).to(dtype)
    assert torch.equal(t, expected)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_min_numel(value: object) -> None:
    with pytest.raises(ValueError, match="`min_numel` must be an integer >= 1"):
        Sign(min_numel=value)  # type: ignore[arg-type]
