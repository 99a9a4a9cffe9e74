"""Two-stage compressed all-reduce (sign and top-k) on 2 and 4 gloo processes.

Checked against a reference computed by hand from every rank's inputs; error feedback conserves the sum on
both sides (worker and server residuals); the bytes each rank sends and receives do not grow with the
number of ranks; a compressor restored from its state dict continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_optx.compression import Compressor, Sign, TopK
from lightning_optx.compression.two_stage import chunk_numel
from lightning_optx.distributed import Communicator, wire_bytes
from tests.helpers.compare import assert_tree_equal
from tests.helpers.runner import run_distributed

SHAPES = {"fc.weight": (32, 24), "conv.weight": (8, 4, 3, 3), "odd.weight": (7, 13), "bias": (24,)}
STEPS = 3
RESUME_AT = 1


def make(name: str) -> Compressor:
    return {"sign": lambda: Sign(min_numel=16), "topk": lambda: TopK(density=0.1),
            "topk_dgc": lambda: TopK(density=0.1, momentum_correction=0.9)}[name]()


def _inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {k: torch.randn(s, generator=g) * (1 + k.startswith("odd")) + 0.3 * rank for k, s in SHAPES.items()}


def _call(compressor: Compressor, comm: Communicator, rank: int, step: int) -> dict[str, Any]:
    inputs = _inputs(rank, step)
    tensors = {k: v.clone() for k, v in inputs.items()}
    before, wire_before = comm.ledger.total_bytes, comm.ledger.total_wire_bytes
    compressor.reduce_(list(tensors.values()), list(tensors), comm)
    compressor.end_iteration()
    return {"inputs": inputs, "outputs": tensors, "payload": comm.ledger.total_bytes - before,
            "wire": comm.ledger.total_wire_bytes - wire_before,
            "expected_payload": compressor.payload_bytes(list(inputs.values()), comm.world_size),
            "expected_wire": compressor.wire_bytes(list(inputs.values()), comm.world_size)}


def _scenario(name: str) -> dict[str, Any]:
    rank = dist.get_rank()
    compressor, comm = make(name), Communicator()
    calls = [_call(compressor, comm, rank, step) for step in range(RESUME_AT)]
    snapshot = compressor.state_dict()
    calls += [_call(compressor, comm, rank, step) for step in range(RESUME_AT, STEPS)]
    resumed = make(name)
    resumed.load_state_dict(snapshot)
    replay = [_call(resumed, Communicator(), rank, step) for step in range(RESUME_AT, STEPS)]
    return {"calls": calls, "state": compressor.state_dict(), "replay": replay, "replay_state": resumed.state_dict(),
            "kinds": sorted({r.kind for r in comm.ledger.records})}


def _all() -> dict[str, Any]:
    return {name: _scenario(name) for name in ("sign", "topk", "topk_dgc")}


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def ranks(request) -> list[dict[str, Any]]:
    return run_distributed(_all, world_size=request.param, timeout=300.0 * request.param)


NAMES = ["sign", "topk", "topk_dgc"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", NAMES)
def test_identical_on_every_rank_and_bytes_as_announced(ranks, name):
    for result in ranks:
        assert result[name]["kinds"] == ["all_gather", "all_reduce", "all_to_all"]  # all_reduce: the raw bias
        for step, call in enumerate(result[name]["calls"]):
            assert_tree_equal(call["outputs"], ranks[0][name]["calls"][step]["outputs"], f"{name} step {step}")
            assert call["payload"] == call["expected_payload"]
            assert call["wire"] == call["expected_wire"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_state_dict_is_bit_exact(ranks, name):
    for result in ranks:
        straight = [c["outputs"] for c in result[name]["calls"][RESUME_AT:]]
        assert_tree_equal(straight, [c["outputs"] for c in result[name]["replay"]], f"{name} after resume")
        assert_tree_equal(result[name]["state"], result[name]["replay_state"], f"{name} state after resume")


def _server_residual(ranks, name: str, key: str, numel: int) -> torch.Tensor:
    """The server residuals of ``key``: chunk r lives on rank r; concatenated and cut to the tensor's size."""
    parts = [r[name]["state"]["server_residuals"].get(key) for r in ranks]
    if parts[0] is None:
        return torch.zeros(numel)
    return torch.cat(parts)[:numel]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["sign", "topk"])
def test_error_feedback_conserves_the_sum_on_both_sides(ranks, name):
    """sum_t output_t + mean_r worker_residual_r + server_residual == sum_t mean_r input_r,t."""
    world = len(ranks)
    for key, shape in SHAPES.items():
        numel = math.prod(shape)
        sent = sum(c["outputs"][key] for c in ranks[0][name]["calls"])
        worker = torch.stack([r[name]["state"]["residuals"].get(key, torch.zeros(shape)) for r in ranks]).mean(0)
        server = _server_residual(ranks, name, key, numel).view(shape)
        total = sum(torch.stack([r[name]["calls"][s]["inputs"][key] for r in ranks]).mean(0) for s in range(STEPS))
        scale = total.abs().max().item()
        torch.testing.assert_close(sent + worker + server, total, atol=1e-5 * scale * world, rtol=0,
                                   msg=f"{name} {key}")
        if key != "bias":
            assert server.abs().max() > 0, f"{name} {key}: the server side compressed nothing"


def _sign_reference(inputs: list[torch.Tensor], world: int) -> torch.Tensor:
    """Two-stage scaled sign, step 0 (no residuals), by hand."""
    codes = [torch.where(m >= 0, 1.0, -1.0) * m.abs().mean() for m in inputs]
    avg = (sum(c.reshape(-1) for c in codes) / world) if world > 1 else codes[0].reshape(-1)
    numel = avg.numel()
    chunk = chunk_numel(numel, world, multiple=8)
    out = torch.empty(numel)
    for j in range(world):
        part = avg[j * chunk:(j + 1) * chunk]
        if part.numel():
            out[j * chunk:(j + 1) * chunk] = torch.where(part >= 0, 1.0, -1.0) * part.abs().mean()
    return out.view(inputs[0].shape)


def _topk_reference(inputs: list[torch.Tensor], k: int, world: int) -> torch.Tensor:
    """Two-stage top-k, step 0 (no residuals), by hand: per chunk, ceil(k / world) entries on each side."""
    numel = inputs[0].numel()
    chunk = chunk_numel(numel, world)
    per_chunk = min(math.ceil(k / world), chunk)
    out = torch.zeros(numel)
    for j in range(world):
        lo, hi = j * chunk, min((j + 1) * chunk, numel)
        acc = torch.zeros(hi - lo)
        for m in inputs:
            part = m.reshape(-1)[lo:hi]
            keep = part.abs().topk(min(per_chunk, part.numel())).indices
            acc[keep] += part[keep]
        acc /= world
        keep = acc.abs().topk(min(per_chunk, acc.numel())).indices
        out[lo + keep] = acc[keep]
    return out.view(inputs[0].shape)


@pytest.mark.multiprocess
def test_first_step_equals_the_reference_computed_by_hand(ranks):
    world = len(ranks)
    for key in ("fc.weight", "conv.weight", "odd.weight"):
        inputs = [r["sign"]["calls"][0]["inputs"][key] for r in ranks]
        expected = _sign_reference(inputs, world)
        torch.testing.assert_close(ranks[0]["sign"]["calls"][0]["outputs"][key], expected,
                                   atol=1e-6 * expected.abs().max().item(), rtol=0, msg=key)
        k = TopK(density=0.1).k_for(inputs[0].numel())
        expected = _topk_reference([r["topk"]["calls"][0]["inputs"][key] for r in ranks], k, world)
        torch.testing.assert_close(ranks[0]["topk"]["calls"][0]["outputs"][key], expected,
                                   atol=1e-6 * expected.abs().max().item(), rtol=0, msg=key)
    bias = torch.stack([r["sign"]["calls"][0]["inputs"]["bias"] for r in ranks]).mean(0)
    torch.testing.assert_close(ranks[0]["sign"]["calls"][0]["outputs"]["bias"], bias)  # 1-D: raw


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["sign", "topk"])
def test_bytes_per_rank_do_not_grow_with_the_number_of_ranks(ranks, name):
    """Measured bytes sent + received per rank stay under twice each way of one rank's code (a ring's
    bound), where gathering every rank's code would receive (world - 1) codes."""
    world = len(ranks)
    tensors = [torch.empty(s) for s in SHAPES.values() if len(s) > 1]
    compressor = make(name)
    raw_wire = wire_bytes("all_reduce", 4 * 24, world)  # the 1-D bias goes raw
    code = sum(math.ceil(t.numel() / 8) for t in tensors) if name == "sign" else \
        sum(8 * compressor.k_for(t.numel()) for t in tensors)
    overhead = 2 * (world - 1) * 8 * len(tensors) if name == "sign" else 0  # the fp32 scales
    padding = 2 * 2 * len(tensors) * world * (1 if name == "sign" else 8)  # chunks rounded up
    for result in ranks:
        measured = result[name]["calls"][0]["wire"] - raw_wire
        assert measured <= 4 * (world - 1) / world * code + overhead + padding
        assert measured < 2 * (world - 1) * code or world == 2  # what all-gathering the codes costs


@pytest.mark.parametrize("world", [2, 4, 8, 64])
def test_announced_wire_bytes_per_rank_are_bounded_whatever_the_world_size(world):
    big = [torch.empty(1024, 1024)]
    numel = big[0].numel()
    for compressor, code in ((Sign(), numel / 8), (TopK(density=0.01), 8 * TopK(density=0.01).k_for(numel))):
        wire = compressor.wire_bytes(big, world)
        assert wire <= 4 * code + 16 * world + 64 * world  # scales and chunk rounding only
        raw = wire_bytes("all_reduce", 4 * numel, world)
        assert compressor.compression_ratio(big, world) == pytest.approx(raw / wire)
