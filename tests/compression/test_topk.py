"""TopK (DGC) on one process: selection, error feedback, momentum correction, bytes, errors.

The 2-process checks (mean of sparsified inputs, ledger bytes, resume, density 1) are in
``test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_optx.compression import TopK
from lightning_optx.distributed import Communicator

SHAPES = {"w": (20, 10), "bias": (10,), "tiny": (2, 2)}


def _grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _reduce(topk: TopK, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {k: v.clone() for k, v in grads.items()}
    topk.reduce_(list(tensors.values()), list(tensors), Communicator())
    topk.end_iteration()
    return tensors


@pytest.mark.parametrize("density, numel, k", [(0.01, 100, 1), (0.07, 100, 7), (0.1, 200, 20), (0.001, 10, 1),
                                               (0.5, 3, 2), (1.0, 50, 50)])
def test_k(density: float, numel: int, k: int) -> None:
    assert TopK(density=density).k_for(numel) == k


def test_selection_and_residual() -> None:
    grads = _grads(0)
    topk = TopK(density=0.05)  # k = 10 of 200 for w; tiny: k = 1 of 4 (8 < 16 bytes), bias raw
    out = _reduce(topk, grads)
    for key, k in (("w", 10), ("tiny", 1)):
        g, o, r = grads[key], out[key], topk.residuals[key]
        assert (o != 0).sum() == k
        kept = g.abs().flatten().topk(k).values.min()
        assert torch.equal(o[o != 0], g[g.abs() >= kept])   # the k largest |g|, sent as they are
        assert torch.equal(o + r, g)                          # the residual keeps exactly the rest
    assert torch.equal(out["bias"], grads["bias"]) and "bias" not in topk.residuals


def test_error_feedback_conservation_single_process() -> None:
    topk = TopK(density=0.05)
    sent = {k: torch.zeros(s) for k, s in SHAPES.items()}
    total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for step in range(5):
        grads = _grads(step)
        out = _reduce(topk, grads)
        for k in SHAPES:
            sent[k] += out[k]
            total[k] += grads[k]
    for k in SHAPES:
        torch.testing.assert_close(sent[k] + topk.residuals.get(k, 0), total[k], atol=1e-6, rtol=0)


def test_without_error_feedback_drops_the_rest() -> None:
    topk = TopK(density=0.05, error_feedback=False)
    out = _reduce(topk, _grads(0))
    assert topk.residuals == {} and (out["w"] != 0).sum() == 10


def test_raw_rule() -> None:
    topk = TopK(density=0.5)  # 8 k >= 4 numel: the sparse payload would not be smaller
    grads = _grads(1)
    out = _reduce(topk, grads)
    assert all(torch.equal(out[k], grads[k]) for k in SHAPES)
    assert topk.payload_bytes(list(grads.values()), 2) == 4 * (200 + 10 + 4)
    # k = 98 pairs of 8 bytes, two-stage on 2 ranks: each rank sends its ceil(98 / 2) pairs per chunk of both chunks
    # (all-to-all) and gathers its server chunk's 49 pairs: 8 x (2 + 1) x 49
    assert TopK(density=0.49).payload_bytes([grads["w"]], 2) == 8 * 3 * 49


def test_payload_bytes() -> None:
    grads = _grads(0)
    topk = TopK(density=0.05)
    # two-stage, 2 ranks: 8 (n + 1) ceil(k / n) per compressed tensor (k = 10 and 1), fp32 for the bias
    assert topk.payload_bytes(list(grads.values()), 2) == 8 * 3 * 5 + 8 * 3 * 1 + 4 * 10
    assert topk.payload_bytes(list(grads.values()), 1) == 0
    assert TopK(density=0.001).compression_ratio([torch.zeros(1000, 1000)], 2) == pytest.approx(500.0)


def _dgc_reference(steps: list[dict[str, torch.Tensor]], mu: float, density: float) -> list[dict[str, torch.Tensor]]:
    """DGC written from the paper: u <- mu u + g; v <- v + u; send top-k(v); mask u and v where sent."""
    u = {k: torch.zeros(s) for k, s in SHAPES.items()}
    v = {k: torch.zeros(s) for k, s in SHAPES.items()}
    outs = []
    for grads in steps:
        out = {}
        for key, g in grads.items():
            u[key] = mu * u[key] + g
            if key == "bias":  # raw: plain momentum, nothing masked
                out[key] = u[key].clone()
                continue
            v[key] = v[key] + u[key]
            k = TopK(density=density).k_for(g.numel())
            idx = v[key].abs().flatten().topk(k).indices
            mask = torch.zeros(g.numel(), dtype=torch.bool)
            mask[idx] = True
            mask = mask.view_as(g)
            out[key] = torch.where(mask, v[key], 0.0)
            v[key] = torch.where(mask, 0.0, v[key])
            u[key] = torch.where(mask, 0.0, u[key])
        outs.append(out)
    return outs


def test_momentum_correction_is_dgc() -> None:
    steps = [_grads(10 + s) for s in range(4)]
    topk = TopK(density=0.05, momentum_correction=0.9)
    outs = [_reduce(topk, grads) for grads in steps]
    for step, (ours, ref) in enumerate(zip(outs, _dgc_reference(steps, 0.9, 0.05))):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0, msg=f"step {step}")
    assert set(topk.velocities) == set(SHAPES)
    state = topk.state_dict()
    assert set(state["velocities"]) == set(SHAPES)


def test_momentum_correction_state_round_trip() -> None:
    a = TopK(density=0.05, momentum_correction=0.5)
    for s in range(2):
        _reduce(a, _grads(s))
    b = TopK(density=0.05, momentum_correction=0.5)
    b.load_state_dict(a.state_dict())
    for s in range(2, 4):
        oa, ob = _reduce(a, _grads(s)), _reduce(b, _grads(s))
        assert all(torch.equal(oa[k], ob[k]) for k in SHAPES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype: torch.dtype) -> None:
    g = torch.randn(20, 10)
    t = g.to(dtype)
    topk = TopK(density=0.05)
    topk.reduce_([t], ["w"], Communicator())
    assert t.dtype == dtype and topk.residuals["w"].dtype == torch.float32
    assert (t != 0).sum() == 10


def test_density_is_the_level_and_can_change() -> None:
    topk = TopK(density=0.1)
    assert topk.level == 0.1
    topk.density = 0.2
    assert topk.payload_bytes([torch.zeros(10, 10)], 2) == 8 * 3 * 10  # k = 20, two-stage on 2 ranks
    with pytest.raises(ValueError, match="`density`"):
        topk.density = 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density": 0}, r"`density` must be in \(0, 1\], got density=0"),
        ({"density": -0.1}, "`density`"),
        ({"density": 1.5}, r"got density=1.5"),
        ({"momentum_correction": 1.0}, r"`momentum_correction` must be None or in \[0, 1\)"),
        ({"momentum_correction": 0.9, "error_feedback": False}, "needs `error_feedback=True`"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TopK(**kwargs)
