"""Properties every compressor shares, on one process; and the ``get_compressor`` factory."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import lightning_optx.compression as compression
from lightning_optx.compression import Cast, Compressor, PowerSGD, Sign, TopK, get_compressor
from lightning_optx.distributed import Communicator
from tests.helpers.compare import assert_tree_equal

SHAPES = {"fc.weight": (32, 24), "fc.bias": (24,), "conv.weight": (8, 4, 3, 3), "tiny.weight": (3, 2)}

FACTORIES: dict[str, Callable[[], Compressor]] = {
    "powersgd": lambda: PowerSGD(rank=2),
    "powersgd_cold_qr": lambda: PowerSGD(rank=3, warm_start=False),
    "powersgd_start_iter": lambda: PowerSGD(rank=1, start_iter=2),
    "topk": lambda: TopK(density=0.1),
    "topk_dgc": lambda: TopK(density=0.1, momentum_correction=0.9),
    "sign": lambda: Sign(),
    "fp16_ef": lambda: Cast(torch.float16, error_feedback=True),
    "bf16": lambda: Cast(torch.bfloat16),
}


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _run(compressor: Compressor, steps: range) -> list[dict[str, torch.Tensor]]:
    outs = []
    for step in steps:
        tensors = _grads(step)
        compressor.reduce_(list(tensors.values()), list(tensors), Communicator())
        compressor.end_iteration()
        outs.append(tensors)
    return outs


def _checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip_is_bit_exact(name: str) -> None:
    straight = FACTORIES[name]()
    _run(straight, range(3))
    resumed = FACTORIES[name]()
    resumed.load_state_dict(_checkpoint(straight.state_dict()))
    assert_tree_equal(resumed.state_dict(), straight.state_dict(), f"{name} state")
    assert_tree_equal(_run(resumed, range(3, 6)), _run(straight, range(3, 6)), f"{name} outputs")
    assert resumed.iteration == straight.iteration == 6


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_is_a_snapshot(name: str) -> None:
    compressor = FACTORIES[name]()
    _run(compressor, range(2))
    state = compressor.state_dict()
    saved = _checkpoint(state)
    _run(compressor, range(2, 4))
    assert_tree_equal(state, saved, f"{name} state after further steps")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_single_process_sends_nothing(name: str) -> None:
    compressor, comm = FACTORIES[name](), Communicator()
    tensors = list(_grads(0).values())
    compressor.reduce_(tensors, list(SHAPES), comm)
    assert comm.ledger.total_bytes == 0 and comm.ledger.records == []
    assert compressor.payload_bytes(tensors, 1) == 0
    assert compressor.compression_ratio(tensors, 1) >= 1.0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_reduces_in_place(name: str) -> None:
    tensors = list(_grads(0).values())
    pointers = [t.data_ptr() for t in tensors]
    FACTORIES[name]().reduce_(tensors, list(SHAPES), Communicator())
    assert [t.data_ptr() for t in tensors] == pointers
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in tensors)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_keys_must_match_tensors(name: str) -> None:
    compressor = FACTORIES[name]()
    tensors = list(_grads(0).values())
    with pytest.raises(ValueError, match="one key per tensor"):
        compressor.reduce_(tensors, list(SHAPES)[:-1], Communicator())
    with pytest.raises(ValueError, match="`keys` must be distinct"):
        compressor.reduce_(tensors, ["a", "b", "c", "a"], Communicator())
    compressor.reduce_([], [], Communicator())  # nothing to do is fine


@pytest.mark.parametrize("name", list(FACTORIES))
def test_grad_views_of_a_flat_buffer(name: str) -> None:
    """DDP-style gradients: views into one flat buffer, reduced like standalone tensors."""
    grads = _grads(0)
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    views, offset = [], 0
    for g in grads.values():
        views.append(flat[offset:offset + g.numel()].view(g.shape))
        offset += g.numel()
    standalone = [g.clone() for g in grads.values()]
    FACTORIES[name]().reduce_(views, list(SHAPES), Communicator())
    FACTORIES[name]().reduce_(standalone, list(SHAPES), Communicator())
    assert_tree_equal(views, standalone, name)


@pytest.mark.parametrize(
    "name, options, cls, level",
    [
        ("powersgd", {"rank": 2}, PowerSGD, 2.0),
        ("PowerSGD", {}, PowerSGD, 4.0),
        ("topk", {"density": 0.05}, TopK, 0.05),
        ("sign", {}, Sign, 1 / 32),
        ("fp16", {}, Cast, 0.5),
        ("bf16", {"error_feedback": True}, Cast, 0.5),
    ],
)
def test_get_compressor(name: str, options: dict, cls: type, level: float) -> None:
    compressor = get_compressor(name, **options)
    assert type(compressor) is cls and compressor.level == level


def test_get_compressor_dtypes() -> None:
    assert get_compressor("fp16").dtype == torch.float16  # type: ignore[attr-defined]
    assert get_compressor("bf16").dtype == torch.bfloat16  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["qsgd", "", "fp32"])
def test_get_compressor_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match=r"`name` must be one of \['bf16', 'fp16', 'powersgd', 'sign', 'topk'\]"):
        get_compressor(name)


def test_get_compressor_passes_options_through() -> None:
    with pytest.raises(ValueError, match="`density`"):
        get_compressor("topk", density=2.0)


def test_exports() -> None:
    for name in ("Compressor", "PowerSGD", "TopK", "Sign", "Cast", "get_compressor"):
        assert name in compression.__all__ and hasattr(compression, name)
