"""PowerSGD on one process: torch's math reproduced bit for bit, full rank, error feedback, state, errors.

The 2-process checks (equality with torch's DDP hook, ledger bytes, resume) are in ``test_distributed.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize

from lightning_optx.compression import PowerSGD
from lightning_optx.compression.powersgd import orthogonalize_, should_compress
from lightning_optx.distributed import Communicator


def _grads(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


SHAPES = {"a.weight": (32, 24), "a.bias": (24,), "b.weight": (16, 4, 3), "c.weight": (3, 2)}


@pytest.mark.parametrize("cols", [1, 2, 3, 5])
@pytest.mark.parametrize("epsilon", [0.0, 1e-8])
def test_orthogonalize_is_torchs(cols: int, epsilon: float) -> None:
    g = torch.Generator().manual_seed(cols)
    m = torch.randn(1, 20, cols, generator=g)
    ours, theirs = m.clone(), m.clone()
    orthogonalize_(ours, epsilon)
    _orthogonalize(theirs, epsilon)
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(ours[0].T @ ours[0], torch.eye(cols), atol=1e-5, rtol=0)


def test_orthogonalize_zero_column_stays_zero() -> None:
    """Torch would give NaN (0 / 0); a frozen layer's zero gradient must not poison the step."""
    m = torch.zeros(1, 6, 2)
    orthogonalize_(m)
    assert torch.equal(m, torch.zeros(1, 6, 2))


def _torch_reference(mats: list[torch.Tensor], rank: int, seed: int) -> list[torch.Tensor]:
    """powerSGD_hook's first compressed step on one process, written with torch's own calls."""
    rng = np.random.RandomState(seed)
    ranks = [min(*m.shape, rank) for m in mats]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.randint(1_000_000_000))
        qs = []
        for m, r in zip(mats, ranks):
            q = torch.randn(1, m.shape[1], r)
            _orthogonalize(q, 0)
            qs.append(q)
    out = []
    for m, q in zip(mats, qs):
        p = torch.bmm(m.unsqueeze(0), q)
        _orthogonalize(p, 0)
        q = torch.bmm(m.unsqueeze(0).transpose(1, 2), p)
        out.append(torch.bmm(p, q.transpose(1, 2))[0])
    return out


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_first_step_is_torchs_math_bit_for_bit(rank: int) -> None:
    grads = _grads(0, SHAPES)
    tensors = {k: v.clone() for k, v in grads.items()}
    PowerSGD(rank=rank, seed=7).reduce_(list(tensors.values()), list(tensors), Communicator())
    mats = {k: g.reshape(g.shape[0], -1) for k, g in grads.items()}
    compressed = [k for k, m in mats.items() if grads[k].dim() > 1 and should_compress(*m.shape, rank, 2.0)]
    assert "a.weight" in compressed and "c.weight" not in compressed
    expected = _torch_reference([mats[k] for k in compressed], rank, seed=7)
    for key, exp in zip(compressed, expected):
        assert torch.equal(tensors[key], exp.view(SHAPES[key])), key
    for key in set(SHAPES) - set(compressed):  # raw: biases, and matrices too small to pay
        assert torch.equal(tensors[key], grads[key]), key


def test_full_rank_reproduces_the_input() -> None:
    grads = _grads(1, {"w": (12, 5), "v": (4, 9)})
    tensors = {k: v.clone() for k, v in grads.items()}
    psgd = PowerSGD(rank=16, min_compression_rate=0.1)
    psgd.reduce_(list(tensors.values()), list(tensors), Communicator())
    assert psgd.payload_bytes(list(grads.values()), 2) == 4 * ((12 + 5) * 5 + (4 + 9) * 4)
    torch.testing.assert_close(tensors, grads, atol=1e-5, rtol=1e-5)


def test_error_feedback_conservation_single_process() -> None:
    psgd = PowerSGD(rank=1)
    sent = {k: torch.zeros(s) for k, s in SHAPES.items()}
    total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for step in range(6):
        grads = _grads(10 + step, SHAPES)
        tensors = {k: v.clone() for k, v in grads.items()}
        psgd.reduce_(list(tensors.values()), list(tensors), Communicator())
        psgd.end_iteration()
        for k in SHAPES:
            sent[k] += tensors[k]
            total[k] += grads[k]
    for k in SHAPES:
        kept = psgd.residuals.get(k, torch.zeros(SHAPES[k]))
        torch.testing.assert_close(sent[k] + kept, total[k], atol=1e-5, rtol=0, msg=k)
    assert set(psgd.residuals) == {"a.weight", "b.weight"}  # raw tensors keep no residual


def test_without_error_feedback_keeps_no_residual() -> None:
    psgd = PowerSGD(rank=1, error_feedback=False)
    t = torch.randn(32, 24)
    psgd.reduce_([t], ["w"], Communicator())
    assert psgd.residuals == {}


def test_start_iter_runs_plain_mean_first() -> None:
    psgd = PowerSGD(rank=1, start_iter=2)
    g = torch.randn(32, 24)
    rng_before = psgd.state_dict()["rng"]["pos"]
    for _ in range(2):
        t = g.clone()
        assert psgd.payload_bytes([t], 2) == 4 * g.numel()
        psgd.reduce_([t], ["w"], Communicator())
        psgd.end_iteration()
        assert torch.equal(t, g)
        assert psgd.residuals == {} and psgd.q_memories == {}
    assert psgd.state_dict()["rng"]["pos"] == rng_before  # no seed drawn in the vanilla phase
    assert psgd.payload_bytes([g], 2) == 4 * (32 + 24)
    t = g.clone()
    psgd.reduce_([t], ["w"], Communicator())
    assert not torch.equal(t, g)


def test_warm_start_reuses_q_and_draws_one_seed() -> None:
    warm, cold = PowerSGD(rank=2), PowerSGD(rank=2, warm_start=False)
    positions = {"warm": [], "cold": []}
    for _ in range(3):
        for name, psgd in (("warm", warm), ("cold", cold)):
            tensors = [torch.randn(32, 24), torch.randn(16, 12)]
            psgd.reduce_(tensors, ["a", "b"], Communicator())
            positions[name].append(psgd.state_dict()["rng"]["pos"])
    assert positions["warm"] == [1, 1, 1]   # one draw on the first call only, for both tensors
    assert positions["cold"] == [1, 2, 3]   # one draw per call
    assert set(warm.q_memories) == {"a", "b"} and warm.q_memories["a"].shape == (24, 2)
    assert cold.q_memories == {}


def test_rank_change_redraws_q() -> None:
    psgd = PowerSGD(rank=2)
    psgd.reduce_([torch.randn(32, 24)], ["w"], Communicator())
    psgd.rank = 3
    assert psgd.level == 3.0
    t = torch.randn(32, 24)
    psgd.reduce_([t], ["w"], Communicator())
    assert psgd.q_memories["w"].shape == (24, 3)
    assert torch.linalg.matrix_rank(t).item() == 3


def test_zero_gradient_gives_zero_not_nan() -> None:
    t = torch.zeros(32, 24)
    PowerSGD(rank=2).reduce_([t], ["w"], Communicator())
    assert torch.equal(t, torch.zeros(32, 24))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_computes_in_fp32(dtype: torch.dtype) -> None:
    g = torch.randn(32, 24)
    full, half = g.clone(), g.to(dtype)
    PowerSGD(rank=2).reduce_([full], ["w"], Communicator())
    psgd = PowerSGD(rank=2)
    psgd.reduce_([half], ["w"], Communicator())
    assert half.dtype == dtype
    assert psgd.residuals["w"].dtype == torch.float32 and psgd.q_memories["w"].dtype == torch.float32
    torch.testing.assert_close(half.float(), full, atol=3e-2, rtol=3e-2)


def test_non_contiguous_input() -> None:
    g = torch.randn(24, 32)
    t = g.t()  # a non-contiguous (32, 24) view
    ref = g.t().contiguous()
    PowerSGD(rank=2).reduce_([t], ["w"], Communicator())
    PowerSGD(rank=2).reduce_([ref], ["w"], Communicator())
    assert torch.equal(t, ref)


def test_should_compress_rule() -> None:
    assert should_compress(32, 16, 2, 2.0)            # 96 * 2 < 512
    assert not should_compress(8, 8, 2, 2.0)          # 32 * 2 >= 64
    assert should_compress(8, 8, 2, 0.9)              # 32 * 0.9 < 64
    assert not should_compress(0, 0, 2, 2.0)


def test_compression_ratio() -> None:
    psgd = PowerSGD(rank=4)
    t = torch.zeros(1024, 1024)
    assert psgd.compression_ratio([t], 2) == pytest.approx(1024 * 1024 / (2048 * 4))
    assert psgd.compression_ratio([t], 1) == psgd.compression_ratio([t], 2)  # a property of the encoding
    assert psgd.payload_bytes([t], 1) == 0  # one process sends nothing


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "`rank` must be an integer >= 1, got rank=0"),
        ({"rank": 1.5}, "`rank`"),
        ({"min_compression_rate": 0}, "`min_compression_rate` must be > 0, got min_compression_rate=0"),
        ({"min_compression_rate": -1.0}, "`min_compression_rate`"),
        ({"start_iter": -1}, "`start_iter` must be an integer >= 0, got start_iter=-1"),
        ({"orthogonalization_epsilon": -1e-8}, "`orthogonalization_epsilon`"),
        ({"seed": -1}, "`seed`"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        PowerSGD(**kwargs)


def test_rank_setter_validates() -> None:
    psgd = PowerSGD()
    with pytest.raises(ValueError, match="`rank`"):
        psgd.rank = 0
