"""LocalSGDStrategy on 2 CPU processes: equivalence with DDP, sync points, QSR, accounting, resume."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry

import lightning_optx
from lightning_optx import DiLoCoStrategy, LocalSGDStrategy
from lightning_optx.functional.local_sgd import qsr_period
from tests.helpers import TrainJob, assert_ranks_identical, assert_tree_equal, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule, TwoOptimizerModule
from tests.helpers.recorder import StepRecorder

pytestmark = pytest.mark.multiprocess

PARAM_BYTES = sum(p.numel() * 4 for p in TinyModule(model="mlp").parameters())


def steps_and_syncs(trainer, module):
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    return {"records": recorder.records, "sync_steps": list(trainer.strategy.sync_steps),
            "period": trainer.strategy.current_period}


def job(strategy, epochs=2, module=None, record=False, **trainer_kwargs):
    return TrainJob(
        module=module or functools.partial(TinyModule, model="mlp", optimizer="sgd"),
        strategy=strategy,
        callbacks=[StepRecorder()] if record else [],
        trainer_kwargs={"max_epochs": epochs, **trainer_kwargs},
        inspect=steps_and_syncs if record else None,
    )


def test_flag_is_registered_at_import():
    assert "local_sgd" in StrategyRegistry
    assert StrategyRegistry["local_sgd"]["strategy"] is lightning_optx.LocalSGDStrategy


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"period": 0}, r"`period` must be an integer >= 1, got period=0"),
        ({"warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0, got warmup_steps=-1"),
        ({"min_period": 0}, r"`min_period` must be an integer >= 1, got min_period=0"),
        ({"qsr_alpha": -0.1}, r"`qsr_alpha` must be a positive float or None, got qsr_alpha=-0.1"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LocalSGDStrategy(**kwargs)


def test_period_one_equals_ddp():
    """Averaging parameters after every SGD(momentum) step is DDP: both are linear in the gradients."""
    local = run_job(job(LocalSGDStrategy(period=1)), world_size=2)
    ddp = run_job(job("ddp"), world_size=2)
    assert_ranks_identical(local)
    for name, p in ddp[0].params.items():
        torch.testing.assert_close(local[0].params[name], p, rtol=1e-5, atol=1e-6)


def test_ranks_differ_between_syncs_and_agree_right_after():
    ranks = run_job(job(LocalSGDStrategy(period=3), record=True), world_size=2)
    rec0, rec1 = ranks[0].inspected["records"], ranks[1].inspected["records"]
    assert ranks[0].inspected["sync_steps"] == ranks[1].inspected["sync_steps"] == [3, 6]
    for a, b in zip(rec0, rec1):
        identical = all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert identical == (a["step"] % 3 == 0), f"step {a['step']}: identical={identical}"


def test_no_per_step_allreduce_after_warmup_and_bytes_match_analytic():
    ranks = run_job(job(LocalSGDStrategy(period=4, warmup_steps=2), record=True), world_size=2)
    r = ranks[0]
    per_step = dict(zip(range(1, r.global_step + 1), r.series("comm/bytes_per_step")))
    # warm-up: one fp32 gradient all-reduce per step (through DDP's hook); then only parameter averaging
    assert per_step[1] == per_step[2] == PARAM_BYTES
    syncs = r.inspected["sync_steps"]
    assert syncs == [6]
    for step, nbytes in per_step.items():
        if step > 2:
            assert nbytes == (PARAM_BYTES if step in syncs else 0), step
    total = r.series("comm/bytes_total")[-1]
    assert total == PARAM_BYTES * (2 + len(syncs))
    assert r.series("comm/compression_ratio")[-1] == pytest.approx(8 / 3)
    # during warm-up the ranks stay identical at every step (plain DDP)
    for a, b in zip(ranks[0].inspected["records"][:2], ranks[1].inspected["records"][:2]):
        assert_tree_equal(a["params"], b["params"])


class ScheduledModule(TinyModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def expected_qsr_syncs(total_steps, base_lr, gamma, step_size, alpha, first_period, min_period):
    """Simulate the schedule: the lr at a sync after step s is the lr used for step s."""
    syncs, period, last = [], first_period, 0
    for s in range(1, total_steps + 1):
        lr = base_lr * gamma ** ((s - 1) // step_size)
        if s - last >= period:
            syncs.append(s)
            last = s
            period = qsr_period(lr, alpha, min_period)
    return syncs


def test_qsr_period_follows_the_formula():
    strategy = LocalSGDStrategy(period=2, qsr_alpha=0.16, min_period=2)
    ranks = run_job(job(strategy, epochs=4, module=functools.partial(ScheduledModule, model="mlp"), record=True),
                    world_size=2)
    expected = expected_qsr_syncs(16, 0.1, 0.5, 3, 0.16, 2, 2)
    assert ranks[0].inspected["sync_steps"] == ranks[1].inspected["sync_steps"] == expected
    # by hand: sync at 2 (lr 0.1 -> H = floor(2.56) = 2), at 4 (lr 0.05 -> H = floor(10.24) = 10),
    # at 14 (lr 0.00625 -> H = floor(655.36) = 655)
    assert expected == [2, 4, 14]
    assert ranks[0].series("local_sgd/period")[-1] == 655


class SkipStepOnRankOne(TinyModule):
    """Rank 1 skips its update at step 2 (what an fp16 GradScaler does on inf), rank 0 does not."""

    def configure_optimizers(self):
        module = self

        class Skipping(torch.optim.SGD):
            @torch.no_grad()
            def step(self, closure=None):
                loss = closure() if closure is not None else None
                if not (module.global_rank == 1 and module.global_step == 2):
                    super().step()
                return loss

        return Skipping(self.parameters(), lr=0.05)


def test_skipped_step_on_one_rank_keeps_the_schedule():
    ranks = run_job(job(LocalSGDStrategy(period=3), module=functools.partial(SkipStepOnRankOne, model="mlp"),
                        record=True), world_size=2)
    assert ranks[0].inspected["sync_steps"] == ranks[1].inspected["sync_steps"] == [3, 6]
    after_sync = [(a, b) for a, b in zip(ranks[0].inspected["records"], ranks[1].inspected["records"])
                  if a["step"] in (3, 6)]
    assert len(after_sync) == 2
    for a, b in after_sync:
        assert_tree_equal(a["params"], b["params"], f"after sync at step {a['step']}")


def test_average_optimizer_state_and_buffers():
    strategy = LocalSGDStrategy(period=4, average_optimizer_state=True)
    ranks = run_job(job(strategy, module=functools.partial(TinyModule, model="transformer", optimizer="adamw",
                                                           lr=1e-2)), world_size=2)
    assert ranks[0].global_step == 8
    assert_ranks_identical(ranks, "params")
    assert_ranks_identical(ranks, "optimizer_states")


def test_several_optimizers_are_refused():
    with pytest.raises(RuntimeError, match="LocalSGDStrategy supports exactly one optimizer, got 2"):
        run_job(job(LocalSGDStrategy(period=2), module=functools.partial(TwoOptimizerModule)), world_size=2)


def test_string_flag_runs_with_defaults():
    ranks = run_job(job("local_sgd"), world_size=2)
    assert ranks[0].global_step == 8
    assert_ranks_identical(ranks)  # default period 8: the last step is a sync


@pytest.mark.slow  # default run: mid-round 2-rank local_sgd resumes in test_matrix.py and the fp16 test
@pytest.mark.parametrize("average_optimizer_state", [False, True])
def test_resume_between_syncs_is_bit_exact(tmp_path, average_optimizer_state):
    """The split (step 4) falls between syncs (period 3): every rank's own params and moments must come back."""
    strategy = LocalSGDStrategy(period=3, average_optimizer_state=average_optimizer_state)
    module = functools.partial(TinyModule, model="mlp", optimizer="adamw", lr=1e-2)
    straight, resumed = check_resume_equivalence(job(strategy, module=module), total_epochs=3, split_epoch=1,
                                                 tmp_dir=str(tmp_path), world_size=2)
    assert straight[0].global_step == 12
    assert resumed[0].series("comm/bytes_total")[-1] == straight[0].series("comm/bytes_total")[-1]


class OverflowOnRankOne(TinyModule):
    """Rank 1's fp16 loss overflows at step 1: its GradScaler skips the step and halves, rank 0's does not."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e38 if self.global_rank == 1 and self.trainer.global_step == 1 else loss


def grad_scale(trainer, module):
    return float(trainer.precision_plugin.scaler.get_scale())


@pytest.mark.parametrize("strategy", [
    lambda: LocalSGDStrategy(period=3),
    pytest.param(lambda: DiLoCoStrategy(inner_steps=3), marks=pytest.mark.slow, id="diloco"),
], ids=["local_sgd", "diloco"])
def test_resume_restores_each_ranks_own_fp16_grad_scale(tmp_path, strategy):
    """Lightning writes rank 0's GradScaler only; each rank must get its own scale back (split between syncs)."""
    fp16 = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    module = functools.partial(OverflowOnRankOne, model="mlp", optimizer="adamw", lr=1e-2)
    resume_job = dataclasses.replace(job(strategy(), module=module, **fp16), inspect=grad_scale)
    straight, resumed = check_resume_equivalence(resume_job, total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path),
                                                 world_size=2)
    scales = [r.inspected for r in straight]
    assert scales[1] == scales[0] / 2, f"rank 1 should have halved its scale once, got {scales}"
    assert [r.inspected for r in resumed] == scales
