"""Callback state that differs per rank (Grokfast's filter under local strategies, dropout's RNG streams) is saved
and restored per rank through the strategy's per-rank checkpoint files; state shared by all ranks stays shared."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lightning_optx import CompressedDDPStrategy, DiLoCoStrategy, EarlyDropout, Grokfast, LocalSGDStrategy
from lightning_optx.callbacks._per_rank import per_rank_key
from lightning_optx.checkpointing import per_rank_state, rank_file
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule

TRANSFORMER = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2)
DROPOUT_MLP = functools.partial(TinyModule, model="dropout_mlp", optimizer="adamw", lr=1e-2)

# 64 samples, batch 8, 2 ranks: 4 optimizer steps per epoch. The resume helper checkpoints after epoch 1 (step 4),
# mid-round for a period / inner_steps of 3 (the ranks' replicas and filters differ there).
PERIOD = 3


def filter_state(states: dict[str, Any]) -> dict[str, Any]:
    """The Grokfast callback's state among a run's (or a checkpoint's) callback states."""
    [state] = [v for k, v in states.items() if k.startswith("Grokfast{")]
    return state


def filters_differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return any(not torch.equal(a[kind][n], b[kind][n]) for kind in ("ema", "ring") for n in a[kind])


def saved_states(ckpt: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What a 2-rank checkpoint holds: the callback's own (rank 0's) state, rank 0's and rank 1's per-rank parts."""
    checkpoint = torch.load(ckpt, weights_only=False)
    rank1 = torch.load(rank_file(ckpt, 1), weights_only=False)["states"]
    return checkpoint["callbacks"], checkpoint["lightning_optx"]["rank0"], rank1


# ---------------------------------------------------------------------------- Grokfast


def check_grokfast_resumes_per_rank(strategy: Any, filter_name: str, tmp_path: Any) -> None:
    cb = Grokfast(filter_name, window_size=3)
    job = TrainJob(module=TRANSFORMER, callbacks=[cb], strategy=strategy, trainer_kwargs={"max_epochs": 2})
    # bit-exact per rank: parameters, optimizer state and each rank's own filter vs the uninterrupted run
    straight, _ = check_resume_equivalence(job, total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)

    in_checkpoint, rank0_part, rank1_part = saved_states(str(tmp_path / "split.ckpt"))
    key = per_rank_key(cb)
    rank0_filter, rank1_filter = filter_state(in_checkpoint), rank1_part[key]
    assert rank0_part[key] == {}, "rank 0's filter is the checkpoint's own callback state, not a second copy"
    assert rank0_filter["filtered_steps"] == rank1_filter["filtered_steps"] == 4
    assert filters_differ(rank0_filter, rank1_filter), "the ranks' filters must differ at the checkpoint"
    assert filters_differ(filter_state(straight[0].callback_states), filter_state(straight[1].callback_states))


@pytest.mark.slow  # the default run covers it through the matrix's Grokfast x local_sgd pair
@pytest.mark.multiprocess
def test_grokfast_filter_is_saved_and_restored_per_rank_under_local_sgd(tmp_path):
    check_grokfast_resumes_per_rank(LocalSGDStrategy(period=PERIOD), "ema", tmp_path)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "filter_name"), [
    pytest.param(DiLoCoStrategy(inner_steps=PERIOD), "ema", id="diloco-ema"),
    pytest.param(LocalSGDStrategy(period=PERIOD, warmup_steps=2), "ma", id="local_sgd-warmup-ma"),
    pytest.param(DiLoCoStrategy(inner_steps=PERIOD, overlap=True, compressor="powersgd",
                                compressor_options={"rank": 2}), "ema", id="diloco_x-ema"),
])
def test_grokfast_filter_is_saved_and_restored_per_rank(strategy, filter_name, tmp_path):
    check_grokfast_resumes_per_rank(strategy, filter_name, tmp_path)


def registered_keys(trainer: pl.Trainer, module: pl.LightningModule) -> list[str]:
    store = per_rank_state(trainer)
    return store.keys if store is not None else []


@pytest.mark.multiprocess
def test_grokfast_filter_is_the_same_on_every_rank_under_compressed_ddp():
    """PowerSGD's decompressed average is the same on every rank, and so is the filter built from it."""
    job = TrainJob(module=TRANSFORMER, callbacks=[Grokfast("ema")], strategy=CompressedDDPStrategy("powersgd"),
                   trainer_kwargs={"max_steps": 6}, inspect=registered_keys)
    ranks = run_job(job, world_size=2)
    assert ranks[0].global_step == 6
    assert filter_state(ranks[0].callback_states)["filtered_steps"] == 6
    assert any(filter_state(ranks[0].callback_states)["ema"][n].abs().sum() > 0
               for n in filter_state(ranks[0].callback_states)["ema"])
    assert_ranks_identical(ranks, "callback_states")
    assert_ranks_identical(ranks, "params")
    assert not any(k.startswith("callback:Grokfast") for r in ranks for k in r.inspected), \
        "a filter shared by all ranks needs no per-rank copies"


# ---------------------------------------------------------------------------- DropoutSchedule


class SeedPerRank(Callback):
    """Gives each rank its own RNG stream (seed_everything gives them all the same one) before any restore."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.manual_seed(1234 + trainer.global_rank)


class MaskRecorder(Callback):
    """The dropout masks' random draws: a sample of this rank's torch RNG at the start of every batch."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = torch.get_rng_state()
        self.draws.append(float(torch.rand(())))
        torch.set_rng_state(state)  # a peek: leaves the stream as it was

    def state_dict(self):
        return {}


def draws(trainer: pl.Trainer, module: pl.LightningModule) -> list[float]:
    return next(cb for cb in trainer.callbacks if isinstance(cb, MaskRecorder)).draws


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "_broadcast_coalesced",
               "all_reduce_coalesced")


class CollectiveCounter(Callback):
    """Fails the fit if it calls a ``torch.distributed`` collective that the strategy's ledger does not record.

    Counts, from the start of training to teardown, every call into a collective that does not come from
    Lightning itself (its checkpoint-path broadcast, its SIGTERM flag), and compares with the ledger.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.ledger_before = 0
        self._saved: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.ledger_before = trainer.strategy.comm.ledger.total_collectives
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                caller = sys._getframe(1).f_code.co_filename
                if f"{os.sep}lightning{os.sep}" not in caller:  # Lightning's own (checkpoint path, SIGTERM flag)
                    self.calls.append(f"{_name} from {os.path.basename(caller)}")
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}
        recorded = trainer.strategy.comm.ledger.total_collectives - self.ledger_before
        assert recorded > 0
        assert len(self.calls) == recorded, f"rank {trainer.global_rank}: {recorded} in the ledger, {self.calls}"


@pytest.mark.multiprocess
def test_dropout_rng_streams_resume_per_rank_under_local_sgd(tmp_path):
    """Bit-exact per rank, with no collective outside the ledger (the run that checkpoints included)."""
    cb = EarlyDropout(p=0.4, cutoff=10)
    job = TrainJob(module=DROPOUT_MLP, callbacks=[SeedPerRank(), cb, MaskRecorder(), CollectiveCounter()],
                   strategy=LocalSGDStrategy(period=PERIOD), trainer_kwargs={"max_epochs": 3}, inspect=draws)
    straight, resumed = check_resume_equivalence(job, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path),
                                                 world_size=2)
    # each rank draws its own masks, and after the resume exactly the draws of the uninterrupted run
    assert straight[0].inspected != straight[1].inspected
    for s, r in zip(straight, resumed):
        assert r.inspected == s.inspected[-len(r.inspected):]

    in_checkpoint, rank0_part, rank1_part = saved_states(str(tmp_path / "split.ckpt"))
    assert "rng_states" not in in_checkpoint[cb.state_key], "nothing gathered into rank 0's callback state"
    key = per_rank_key(cb, "rng")
    assert not torch.equal(rank0_part[key]["torch"], rank1_part[key]["torch"])
