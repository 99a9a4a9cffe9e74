"""Every compressor on 2 gloo processes, and PowerSGD against PyTorch's own DDP ``powerSGD_hook``.

Starting two processes costs ~20 s on 2 cores (each imports Lightning through the runner), so all
2-process scenarios run in ONE spawn (module-scoped fixture); every scenario catches its own exception so
one failure is reported by its test only.
"""

from __future__ import annotations

import copy
import io
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_optx.compression import Cast, Compressor, PowerSGD, Sign, TopK
from lightning_optx.distributed import Communicator
from tests.helpers.compare import assert_tree_equal
from tests.helpers.runner import run_distributed

pytestmark = pytest.mark.multiprocess

STEPS = 4
RESUME_AT = 2
SHAPES = {
    "fc.weight": (32, 24),
    "fc.bias": (24,),
    "tiny.weight": (3, 2),
    "conv.weight": (8, 4, 3, 3),
    "head.weight": (10, 40),
}

COMPRESSORS: dict[str, Callable[[], Compressor]] = {
    "powersgd": lambda: PowerSGD(rank=2),
    "powersgd_qr_cold": lambda: PowerSGD(rank=3, warm_start=False, seed=3),
    "powersgd_full_rank": lambda: PowerSGD(rank=64, min_compression_rate=0.1),
    "powersgd_start_iter": lambda: PowerSGD(rank=2, start_iter=2),
    "topk": lambda: TopK(density=0.1),
    "topk_dense": lambda: TopK(density=1.0),
    "topk_dgc": lambda: TopK(density=0.1, momentum_correction=0.9),
    "sign": lambda: Sign(),
    "fp16": lambda: Cast(torch.float16, error_feedback=True),
    "bf16": lambda: Cast(torch.bfloat16),
}


def _inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {k: torch.randn(shape, generator=g) + 0.5 * rank for k, shape in SHAPES.items()}


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint round trip, loaded as Lightning would (``weights_only=True``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _steps(compressor: Compressor, comm: Communicator, rank: int, steps: range) -> list[dict[str, Any]]:
    records = []
    for step in steps:
        comm.step = step
        inputs = _inputs(rank, step)
        tensors = {k: v.clone() for k, v in inputs.items()}
        expected = compressor.payload_bytes(list(tensors.values()), comm.world_size)
        before = comm.ledger.total_bytes
        compressor.reduce_(list(tensors.values()), list(tensors), comm, tag="grad")
        compressor.end_iteration()
        records.append({"inputs": inputs, "outputs": tensors, "payload": expected,
                        "ledger": comm.ledger.total_bytes - before})
    return records


def _generic(name: str) -> dict[str, Any]:
    rank = dist.get_rank()
    compressor, comm = COMPRESSORS[name](), Communicator()
    first = _steps(compressor, comm, rank, range(RESUME_AT))
    snapshot = _snapshot(compressor.state_dict())
    rest = _steps(compressor, comm, rank, range(RESUME_AT, STEPS))
    resumed = COMPRESSORS[name]()
    resumed.load_state_dict(snapshot)
    replay = _steps(resumed, Communicator(), rank, range(RESUME_AT, STEPS))
    return {
        "records": first + rest,
        "residuals": compressor.state_dict()["residuals"],
        "server_residuals": compressor.state_dict().get("server_residuals", {}),
        "tags": {r.tag for r in comm.ledger.records},
        "kinds": [r.kind for r in comm.ledger.records],
        "replay_outputs": [r["outputs"] for r in replay],
        "replay_residuals": resumed.state_dict()["residuals"],
    }


def _cast_large() -> dict[str, Any]:
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.full((4, 3), 6e4)
        Cast(dtype).reduce_([t], ["w"], Communicator())
        out[str(dtype)] = t
    return out


def _mlp(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 16, bias=bias))


def _ddp_vs_ours(rank_r: int, warm_start: bool, bias: bool, steps: int = 6) -> dict[str, Any]:
    """Train copy A under DDP + torch's hook and copy B with our reduce_ on the same per-rank data."""
    rank = dist.get_rank()
    model_a = _mlp(bias)
    model_b = copy.deepcopy(model_a)
    names = {id(p): n for n, p in model_a.named_parameters()}
    ddp = DistributedDataParallel(model_a)
    state = PowerSGDState(process_group=None, matrix_approximation_rank=rank_r, start_powerSGD_iter=2,
                          min_compression_rate=2, use_error_feedback=True, warm_start=warm_start, random_seed=0)
    orders: list[list[str]] = []

    def recording_hook(hook_state, bucket):  # unannotated: DDP rejects the string annotations of `annotations`
        orders.append([names[id(p)] for p in bucket.parameters()])
        return powerSGD_hook(hook_state, bucket)

    ddp.register_comm_hook(state, recording_hook)
    ours = PowerSGD(rank=rank_r, start_iter=2, min_compression_rate=2.0, warm_start=warm_start, seed=0)
    comm = Communicator()
    opt_a = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    params_b = dict(model_b.named_parameters())
    data = torch.Generator().manual_seed(100 + rank)
    grads_a, grads_b = [], []
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=data), torch.randn(8, 16, generator=data)
        opt_a.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt_b.zero_grad()
        nn.functional.mse_loss(model_b(x), y).backward()
        order = orders[-1]  # DDP's bucket order of this step (one bucket for this model)
        ours.reduce_([params_b[n].grad for n in order], order, comm)
        ours.end_iteration()
        grads_a.append({n: p.grad.clone() for n, p in model_a.named_parameters()})
        grads_b.append({n: p.grad.clone() for n, p in model_b.named_parameters()})
        opt_a.step()
        opt_b.step()
    return {"orders": orders, "grads_a": grads_a, "grads_b": grads_b, "torch_iter": state.iter}


SCENARIOS: dict[str, Callable[[], Any]] = {
    **{f"generic/{name}": (lambda name=name: _generic(name)) for name in COMPRESSORS},
    "cast_large": _cast_large,
    "ddp/rank2_warm_nobias": lambda: _ddp_vs_ours(2, True, bias=False),
    "ddp/rank2_warm": lambda: _ddp_vs_ours(2, True, bias=True),
    "ddp/rank4_warm": lambda: _ddp_vs_ours(4, True, bias=True),
    "ddp/rank1_cold": lambda: _ddp_vs_ours(1, False, bias=True),
    "ddp/rank3_cold_nobias": lambda: _ddp_vs_ours(3, False, bias=False),
}


def _run_all(names: tuple[str, ...]) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = SCENARIOS[name]()
        except Exception:
            out[name] = {"__error__": traceback.format_exc()}
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_distributed(_run_all, tuple(SCENARIOS), world_size=2)


def _scenario(ranks: list[dict[str, Any]], name: str) -> list[Any]:
    results = [r[name] for r in ranks]
    for rank, res in enumerate(results):
        if isinstance(res, dict) and "__error__" in res:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{res['__error__']}")
    return results


def _mean_inputs(results: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r["records"][step]["inputs"][k] for r in results]).mean(0) for k in SHAPES}


# ---------------------------------------------------------------------------------------------- generic


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_identical_on_every_rank(ranks: list[dict[str, Any]], name: str) -> None:
    r0, r1 = _scenario(ranks, f"generic/{name}")
    for step in range(STEPS):
        assert_tree_equal(r0["records"][step]["outputs"], r1["records"][step]["outputs"], f"{name} step {step}")


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_payload_bytes_equal_ledger(ranks: list[dict[str, Any]], name: str) -> None:
    for result in _scenario(ranks, f"generic/{name}"):
        assert result["tags"] == {"grad"}
        for step, record in enumerate(result["records"]):
            assert record["ledger"] > 0
            assert record["ledger"] == record["payload"], f"{name} step {step}"


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_resume_from_state_dict_is_bit_identical(ranks: list[dict[str, Any]], name: str) -> None:
    for result in _scenario(ranks, f"generic/{name}"):
        straight = [r["outputs"] for r in result["records"][RESUME_AT:]]
        assert_tree_equal(straight, result["replay_outputs"], f"{name} outputs after resume")
        assert_tree_equal(result["residuals"], result["replay_residuals"], f"{name} residuals after resume")


@pytest.mark.parametrize("name", ["powersgd", "powersgd_qr_cold", "powersgd_full_rank", "powersgd_start_iter",
                                  "topk", "sign", "fp16"])
def test_error_feedback_conserves_the_mean(ranks: list[dict[str, Any]], name: str) -> None:
    """sum_t output_t + mean_r residual_r (+ the server residuals of a two-stage compressor, chunk r kept by
    rank r) == sum_t mean_r input_r,t: nothing is lost, only delayed."""
    results = _scenario(ranks, f"generic/{name}")
    atol = 2e-3 if name == "fp16" else 1e-5  # fp16: the half-precision *sum* over ranks rounds
    for key, shape in SHAPES.items():
        sent = sum(r["outputs"][key] for r in results[0]["records"])
        kept = torch.stack([r["residuals"].get(key, torch.zeros(shape)) for r in results]).mean(0)
        if key in results[0]["server_residuals"]:
            server = torch.cat([r["server_residuals"][key] for r in results])
            kept = kept + server[:kept.numel()].view(shape)
        total = sum(_mean_inputs(results, step)[key] for step in range(STEPS))
        torch.testing.assert_close(sent + kept, total, atol=atol, rtol=0, msg=f"{name} {key}")


def test_compressed_path_actually_compresses(ranks: list[dict[str, Any]]) -> None:
    """Sanity: the lossy compressors do change the matrices at step 0 (not an accidental exact mean)."""
    for name in ("powersgd", "topk", "sign"):
        results = _scenario(ranks, f"generic/{name}")
        mean = _mean_inputs(results, 0)
        out = results[0]["records"][0]["outputs"]
        assert (out["fc.weight"] - mean["fc.weight"]).abs().max() > 0.1, name
        assert torch.equal(out["fc.bias"], mean["fc.bias"]), name  # 1-D: raw, exact


# ---------------------------------------------------------------------------------------------- per compressor


def test_powersgd_full_rank_is_the_exact_mean(ranks: list[dict[str, Any]]) -> None:
    results = _scenario(ranks, "generic/powersgd_full_rank")
    for step in range(STEPS):
        mean = _mean_inputs(results, step)
        torch.testing.assert_close(results[0]["records"][step]["outputs"], mean, atol=1e-5, rtol=1e-5)


def test_powersgd_start_iter_is_vanilla_then_compressed(ranks: list[dict[str, Any]]) -> None:
    results = _scenario(ranks, "generic/powersgd_start_iter")
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    for step, record in enumerate(results[0]["records"]):
        mean = _mean_inputs(results, step)
        if step < 2:
            assert record["ledger"] == 4 * numel
            torch.testing.assert_close(record["outputs"], mean, atol=1e-6, rtol=0)
        else:
            assert record["ledger"] < 4 * numel
    assert results[0]["kinds"][:2] == ["all_reduce", "all_reduce"]  # one flat all-reduce per vanilla step


def test_powersgd_collectives_are_raw_p_q(ranks: list[dict[str, Any]]) -> None:
    """(d) Per call: one raw flat all-reduce, one for all Ps, one for all Qs, in bytes 4 * (raw + P + Q)."""
    result = _scenario(ranks, "generic/powersgd")[0]
    assert result["kinds"] == ["all_reduce"] * 3 * STEPS
    # rank 2: fc (32x24) P 64 Q 48, conv (8x36) P 16 Q 72, head (10x40) P 20 Q 80; raw: bias 24 + tiny 6
    assert result["records"][0]["ledger"] == 4 * ((64 + 16 + 20) + (48 + 72 + 80) + (24 + 6))


def test_topk_dense_is_the_exact_mean(ranks: list[dict[str, Any]]) -> None:
    results = _scenario(ranks, "generic/topk_dense")
    for step in range(STEPS):
        assert_tree_equal(results[0]["records"][step]["outputs"], _mean_inputs(results, step), f"step {step}")


# Sign and top-k against a reference computed by hand (two-stage): tests/compression/test_two_stage.py


@pytest.mark.parametrize("name, atol", [("fp16", 2e-3), ("bf16", 2e-2)])
def test_cast_is_close_to_the_mean(ranks: list[dict[str, Any]], name: str, atol: float) -> None:
    results = _scenario(ranks, f"generic/{name}")
    for step in range(STEPS):
        torch.testing.assert_close(results[0]["records"][step]["outputs"], _mean_inputs(results, step),
                                   atol=atol, rtol=atol)


def test_cast_large_values_do_not_overflow(ranks: list[dict[str, Any]]) -> None:
    """6e4 on each of 2 ranks: the fp16 *sum* would overflow (max 65504); dividing first keeps it finite."""
    for result in _scenario(ranks, "cast_large"):
        torch.testing.assert_close(result["torch.float16"], torch.full((4, 3), 6e4), atol=0, rtol=1e-3)
        torch.testing.assert_close(result["torch.bfloat16"], torch.full((4, 3), 6e4), atol=0, rtol=1e-2)


# ---------------------------------------------------------------------------------------------- torch's hook


@pytest.mark.parametrize("name", ["ddp/rank2_warm_nobias", "ddp/rank3_cold_nobias"])
def test_powersgd_bit_identical_to_torch_hook_without_biases(ranks: list[dict[str, Any]], name: str) -> None:
    """Every tensor compressed: our reduce_ reproduces torch's powerSGD_hook bit for bit, step after step."""
    for result in _scenario(ranks, name):
        assert result["torch_iter"] == 6
        assert_tree_equal(result["grads_a"], result["grads_b"], name)


@pytest.mark.parametrize("name", ["ddp/rank2_warm", "ddp/rank4_warm", "ddp/rank1_cold"])
def test_powersgd_matches_torch_hook(ranks: list[dict[str, Any]], name: str) -> None:
    """With biases (sent raw): weights bit-identical until the biases' paths differ by rounding, then 1e-5.

    Torch adds error feedback to the whole bucket, so a raw bias carries ``m_i - mean(m)`` into the next
    step; that term averages to zero over ranks and changes the mean by rounding only (~1e-9), and our
    raw tensors skip it (see PowerSGD's docstring).
    """
    for result in _scenario(ranks, name):
        orders = result["orders"]
        # DDP's first bucket follows registration order; after its rebuild, gradient-ready (reverse) order.
        assert orders[0] == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert all(o == ["2.bias", "2.weight", "0.bias", "0.weight"] for o in orders[1:])
        for step, (a, b) in enumerate(zip(result["grads_a"], result["grads_b"])):
            for key in a:
                torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=f"step {step} {key}")
        # the first compressed step (iteration 2): the weights, where torch's and our math coincide exactly
        assert torch.equal(result["grads_a"][2]["0.weight"], result["grads_b"][2]["0.weight"])
        assert torch.equal(result["grads_a"][2]["2.weight"], result["grads_b"][2]["2.weight"])
