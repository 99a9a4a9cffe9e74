"""Local strategies at the edges of training: evaluation, the end of fit, checkpoints, hidden traffic.

Every 2-process run here goes through the harness, which turns on strict collectives (a tensor on a device
the group's backend could not take under NCCL fails the run).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from torch import nn
from torch.utils.data import DataLoader

from lightning_optx import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy
from lightning_optx.compression import PowerSGD
from tests.helpers import TrainJob, assert_ranks_identical, assert_tree_equal, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule, random_dataset

pytestmark = pytest.mark.multiprocess

FLAGS = ["local_sgd", "diloco", "diloco_x", "ddp_powersgd", "ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16"]


class BNModule(TinyModule):
    """The tiny MLP behind a BatchNorm (buffers that differ per rank), with validation, test and predict data."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(model="mlp", **kwargs)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.bn(x))

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("test_loss", loss)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def _eval_loader(self) -> DataLoader:
        return DataLoader(random_dataset("mlp", n=16, seed=99), batch_size=16)

    val_dataloader = test_dataloader = predict_dataloader = _eval_loader


# ---------------------------------------------------------------------------- evaluation on a fresh Trainer


@pytest.mark.parametrize("flag", FLAGS)
def test_fresh_trainer_validates_tests_and_predicts(flag):
    """No optimizer exists outside fit: every flag must evaluate the module as it is."""
    module = BNModule()
    module.eval()
    x, y = random_dataset("mlp", n=16, seed=99).tensors
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(module(x), y))
    trainer = pl.Trainer(strategy=flag, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert trainer.validate(module, verbose=False)[0]["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert trainer.test(module, verbose=False)[0]["test_loss"] == pytest.approx(expected, rel=1e-6)
    (prediction,) = trainer.predict(module)
    torch.testing.assert_close(prediction, module(x).detach())


def test_buffer_broadcast_is_refused_under_local_strategies():
    for cls in (LocalSGDStrategy, DiLoCoStrategy):
        with pytest.raises(ValueError, match=r"got broadcast_buffers=True, allowed: False"):
            cls(broadcast_buffers=True)
        kwargs = cls(broadcast_buffers=False)._ddp_kwargs
        assert kwargs.get("forward_sync_buffers", kwargs.get("broadcast_buffers")) is False
    with pytest.raises(ValueError, match=r"`validate_on` must be one of \('local', 'consensus'\), got validate_on='x'"):
        LocalSGDStrategy(validate_on="x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the end of fit


class StopAt(Callback):
    """A callback's stop after optimizer step ``step``, as a user's rule (or an interruption) would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def end_facts(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    s = trainer.strategy
    facts: dict[str, Any] = {"total_bytes": s.comm.ledger.total_bytes, "steps": s.optimizer_steps}
    if isinstance(s, DiLoCoStrategy):
        facts["global"] = {n: g.clone() for n, g in s.global_state_dict().items()}
    if isinstance(s, LocalSGDStrategy):
        facts["sync_steps"] = list(s.sync_steps)
        facts["final_sync_step"] = s.final_sync_step
    return facts


STOPS = {
    "callback": ({}, lambda: [StopAt(5)]),
    "max_steps": ({"max_steps": 5}, list),
    "early_stopping": ({}, lambda: [EarlyStopping("train_loss", stopping_threshold=1e9,
                                                  check_on_train_epoch_end=True)]),
    "max_time": ({}, lambda: [TimeUpAfterFirstStep({"seconds": 0})]),
}


class TimeUpAfterFirstStep(Timer):
    """The Timer behind ``Trainer(max_time=...)`` (its stop decision at a step's end, broadcast from rank 0),
    with the time already up; the check at fit start is skipped so that the stop lands after step 1, mid-round."""

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        pass


def stopped_job(strategy: Any, how: str) -> TrainJob:
    kwargs, callbacks = STOPS[how]
    return TrainJob(module=functools.partial(BNModule, optimizer="adamw", lr=1e-2), strategy=strategy,
                    callbacks=callbacks(), trainer_kwargs={"max_epochs": 3, **kwargs}, inspect=end_facts)


@pytest.mark.parametrize("how", ["callback", *(pytest.param(h, marks=pytest.mark.slow)
                                               for h in ("max_steps", "early_stopping", "max_time"))])
def test_local_sgd_fit_ends_with_the_consensus_when_stopped_mid_round(how):
    ranks = run_job(stopped_job(LocalSGDStrategy(period=3), how), world_size=2)
    steps = ranks[0].global_step
    assert steps % 3, f"the stop at step {steps} must fall mid-round for this test to mean anything"
    assert_ranks_identical(ranks, "params")
    assert_ranks_identical(ranks, "buffers")
    facts = ranks[0].inspected
    assert facts["final_sync_step"] == steps
    param_bytes = sum(p.numel() * 4 for p in BNModule().parameters())
    buffer_bytes = sum(b.numel() * 4 for b in BNModule().buffers() if b.is_floating_point())
    assert facts["total_bytes"] == (len(facts["sync_steps"]) + 1) * (param_bytes + buffer_bytes)


@pytest.mark.parametrize("how", ["max_steps", pytest.param("callback", marks=pytest.mark.slow)])
def test_diloco_x_fit_ends_with_the_consensus_when_stopped_mid_round(how):
    strategy = DiLoCoStrategy(inner_steps=2, overlap=True, compressor="powersgd", compressor_options={"rank": 2},
                              adaptive_compression=True)
    ranks = run_job(stopped_job(strategy, how), world_size=2)
    assert ranks[0].global_step == 5
    assert_ranks_identical(ranks, "params")
    assert_ranks_identical(ranks, "buffers")
    for r in ranks:
        for name, g in r.inspected["global"].items():
            assert torch.equal(r.params[name], g.to(r.params[name].dtype)), name


@pytest.mark.slow
def test_diloco_fit_ends_with_the_consensus_with_fragments():
    ranks = run_job(stopped_job(DiLoCoStrategy(inner_steps=4, fragments=2), "max_steps"), world_size=2)
    assert_ranks_identical(ranks, "params")
    assert_ranks_identical(ranks, "buffers")


# ---------------------------------------------------------------------------- validation on the consensus


class EvalWatcher(Callback):
    """Records the parameters seen by each validation batch and at the start of the next training batch."""

    def __init__(self) -> None:
        self.validated: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.resumed: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.trained: list[tuple[int, dict[str, torch.Tensor]]] = []

    @staticmethod
    def _params(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_validation_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.state.fn == "fit":
            self.validated.append((trainer.global_step, self._params(module)))

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.resumed.append((trainer.global_step, self._params(module)))

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.trained.append((trainer.global_step, self._params(module)))


def watched(trainer: pl.Trainer, module: pl.LightningModule) -> Any:
    w = next(cb for cb in trainer.callbacks if isinstance(cb, EvalWatcher))
    return {"validated": w.validated, "resumed": w.resumed, "trained": w.trained}


@pytest.mark.parametrize("strategy", [
    LocalSGDStrategy(period=3, validate_on="consensus"),
    pytest.param(DiLoCoStrategy(inner_steps=3, validate_on="consensus"), marks=pytest.mark.slow),
])
def test_validation_on_the_consensus_then_back_to_the_local_replica(strategy):
    job = TrainJob(module=functools.partial(BNModule, optimizer="sgd"), strategy=strategy, callbacks=[EvalWatcher()],
                   trainer_kwargs={"max_epochs": 1, "val_check_interval": 2}, inspect=watched)
    r0, r1 = (r.inspected for r in run_job(job, world_size=2))
    (step, seen0), (_, seen1) = r0["validated"][0], r1["validated"][0]
    assert step == 2  # mid-round: the local replicas differ here
    local0, local1 = dict(r0["trained"])[2], dict(r1["trained"])[2]
    assert any(not torch.equal(local0[n], local1[n]) for n in local0)
    assert_tree_equal(seen0, seen1, "the consensus both ranks validate")
    if isinstance(strategy, LocalSGDStrategy):
        for n in seen0:
            torch.testing.assert_close(seen0[n], (local0[n] + local1[n]) / 2, rtol=1e-6, atol=1e-7)
    # training continues from each rank's own replica, bit for bit
    assert_tree_equal(dict(r0["resumed"])[2], local0, "rank 0 local replica after validation")
    assert_tree_equal(dict(r1["resumed"])[2], local1, "rank 1 local replica after validation")


# ---------------------------------------------------------------------------- no hidden traffic

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "_broadcast_coalesced",
               "all_reduce_coalesced")


class CollectiveCounter(Callback):
    """Counts every call into ``torch.distributed``'s collectives from the start of training to teardown.

    Calls made by Lightning's own loops are kept apart (``lightning_calls``, by calling function): Lightning 2.6
    broadcasts a SIGTERM flag from rank 0 at every training step, whatever the strategy.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lightning_calls: list[str] = []
        self.ledger_before = 0
        self.ledger_after = 0
        self._saved: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.ledger_before = trainer.strategy.comm.ledger.total_collectives
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                caller = sys._getframe(1).f_code
                if f"lightning{os.sep}pytorch{os.sep}" in caller.co_filename:
                    self.lightning_calls.append(f"{_name} in {caller.co_name}")
                else:
                    self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}
        self.ledger_after = trainer.strategy.comm.ledger.total_collectives


def counted(trainer: pl.Trainer, module: pl.LightningModule) -> Any:
    c = next(cb for cb in trainer.callbacks if isinstance(cb, CollectiveCounter))
    return {"calls": list(c.calls), "ledger": c.ledger_after - c.ledger_before, "lightning": list(c.lightning_calls)}


@pytest.mark.parametrize("strategy", [
    pytest.param(LocalSGDStrategy(period=2, warmup_steps=1), id="local_sgd"),
    pytest.param(DiLoCoStrategy(inner_steps=3, overlap=True, compressor="topk"), id="diloco_x",
                 marks=pytest.mark.slow),
    pytest.param(CompressedDDPStrategy("sign", check_finite=True), id="ddp_sign", marks=pytest.mark.slow),
])
def test_every_collective_during_fit_is_in_the_ledger(strategy):
    job = TrainJob(module=functools.partial(BNModule, optimizer="sgd"), strategy=strategy,
                   callbacks=[CollectiveCounter()], trainer_kwargs={"max_steps": 5}, inspect=counted)
    for r in run_job(job, world_size=2):
        facts = r.inspected
        assert facts["ledger"] > 0
        assert len(facts["calls"]) == facts["ledger"], f"rank {r.rank}: {facts['calls']}"
        assert facts["lightning"] == ["broadcast in _broadcast_sigterm_tensor"] * r.global_step


# ---------------------------------------------------------------------------- consistent checkpoints


class SlowPowerSGD(PowerSGD):
    """PowerSGD that takes its time, so a checkpoint lands while an overlapped round is still in flight."""

    def reduce_(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        super().reduce_(*args, **kwargs)


def test_checkpoint_with_a_round_in_flight_resumes_bit_exact(tmp_path):
    """The round started at step 4 is still compressing when ModelCheckpoint saves at step 4."""
    strategy = DiLoCoStrategy(inner_steps=4, overlap=True, compressor=SlowPowerSGD(rank=2, error_feedback=True),
                              adaptive_compression=True)
    job = TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="adamw", lr=1e-2),
                   strategy=strategy, trainer_kwargs={"max_epochs": 3})
    straight, resumed = check_resume_equivalence(job, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path),
                                                 world_size=2)
    assert resumed[0].series("comm/bytes_total")[-1] == straight[0].series("comm/bytes_total")[-1]
