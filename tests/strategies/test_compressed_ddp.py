"""CompressedDDPStrategy on 2 CPU processes: every flag, exactness at full rank, accounting, resume."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_optx import CompressedDDPStrategy
from lightning_optx.compression import PowerSGD
from tests.callbacks.test_grokfast import SkipNonFiniteSGD
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule

pytestmark = pytest.mark.multiprocess

FLAGS = ["ddp_powersgd", "ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16"]


def strategy_facts(trainer, module):
    s = trainer.strategy
    if not isinstance(s, CompressedDDPStrategy):
        return None
    shapes = [torch.empty(p.shape) for _, p in s._named_trainable_params()]
    return {"payload": s.compressor.payload_bytes(shapes, trainer.world_size),
            "ratio": s.compressor.compression_ratio(shapes, trainer.world_size),
            "iteration": s.compressor.iteration, "skipped": s.skipped_nonfinite_syncs,
            "residuals_finite": all(torch.isfinite(r).all() for r in s.compressor.residuals.values())}


def job(strategy, module=None, epochs=2, **trainer_kwargs):
    return TrainJob(module=module or functools.partial(TinyModule, model="wide_mlp", optimizer="sgd"),
                    strategy=strategy, trainer_kwargs={"max_epochs": epochs, **trainer_kwargs},
                    inspect=strategy_facts)


def test_unknown_compressor_is_refused():
    allowed = r"\['bf16', 'fp16', 'powersgd', 'sign', 'topk'\]"
    message = rf"`compressor` must be a Compressor or one of {allowed}, got compressor='zip'"
    with pytest.raises(ValueError, match=message):
        CompressedDDPStrategy("zip")
    with pytest.raises(ValueError, match="`compressor_options` is only used with a compressor name"):
        CompressedDDPStrategy(PowerSGD(rank=2), compressor_options={"rank": 4})


@pytest.mark.parametrize("flag", FLAGS)
def test_every_flag_trains_with_identical_ranks_and_exact_byte_accounting(flag):
    ranks = run_job(job(flag), world_size=2)
    assert_ranks_identical(ranks)
    r = ranks[0]
    assert r.global_step == 8
    per_step = r.series("comm/bytes_per_step")
    assert per_step == [r.inspected["payload"]] * 8
    # bytes on the wire (sent + received) of an fp32 ring all-reduce over the compressor's
    assert r.series("comm/compression_ratio")[-1] == pytest.approx(r.inspected["ratio"])
    assert r.series("comm/compression_ratio")[-1] > 1.9
    assert r.inspected["iteration"] == 8


def test_powersgd_at_full_rank_equals_ddp():
    full = CompressedDDPStrategy("powersgd", compressor_options={"rank": 128, "min_compression_rate": 0.01})
    compressed = run_job(job(full), world_size=2)
    ddp = run_job(job("ddp"), world_size=2)
    for name, p in ddp[0].params.items():
        torch.testing.assert_close(compressed[0].params[name], p, rtol=1e-4, atol=1e-5)


def test_low_rank_powersgd_changes_training():
    """Guard against a silent pass-through: rank 1 PowerSGD must not train exactly like DDP."""
    low = run_job(job(CompressedDDPStrategy("powersgd", compressor_options={"rank": 1})), world_size=2)
    ddp = run_job(job("ddp"), world_size=2)
    assert not torch.allclose(low[0].params["net.fc2.weight"], ddp[0].params["net.fc2.weight"], atol=1e-4)


def test_compression_runs_once_per_optimizer_step_with_accumulation():
    ranks = run_job(job("ddp_topk", accumulate_grad_batches=2), world_size=2)
    assert ranks[0].global_step == 4
    assert ranks[0].inspected["iteration"] == 4
    assert ranks[0].series("comm/bytes_per_step") == [ranks[0].inspected["payload"]] * 4
    assert_ranks_identical(ranks)


class InfOnRankOne(TinyModule):
    def on_after_backward(self):
        if self.global_rank == 1 and self.global_step == 2:
            self.net.fc1.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return SkipNonFiniteSGD(self.parameters(), lr=0.05)


def test_nonfinite_gradients_leave_compressor_state_untouched():
    strategy = CompressedDDPStrategy("powersgd", compressor_options={"rank": 2}, check_finite=True)
    ranks = run_job(job(strategy, module=functools.partial(InfOnRankOne, model="wide_mlp")), world_size=2)
    for r in ranks:
        assert r.inspected["skipped"] == 1
        assert r.inspected["iteration"] == 7
        assert r.inspected["residuals_finite"]
        assert all(torch.isfinite(p).all() for p in r.params.values())
    assert_ranks_identical(ranks)


def test_bf16_mixed_precision():
    ranks = run_job(job("ddp_sign", precision="bf16-mixed"), world_size=2)
    assert_ranks_identical(ranks)
    assert all(torch.isfinite(p).all() for p in ranks[0].params.values())


@pytest.mark.slow  # default run: 2-rank resume with powersgd residuals (GradES-ddp_powersgd, matrix)
@pytest.mark.parametrize("flag", ["ddp_powersgd", "ddp_topk"])
def test_resume_is_bit_exact_with_per_rank_residuals(tmp_path, flag):
    straight, resumed = check_resume_equivalence(job(flag), total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path),
                                                 world_size=2)
    assert straight[0].inspected["iteration"] == resumed[0].inspected["iteration"] == 12
    assert resumed[0].series("comm/bytes_total")[-1] == straight[0].series("comm/bytes_total")[-1]
