"""Every callback x strategy pair of ``lightning_optx.compatibility.TABLE``, on 2 processes.

Supported pair: a 2-rank fit of a tiny model (6 optimizer steps, 3 per epoch, a synchronisation every 2 steps
under the local strategies) checks the pair's documented semantics with one cheap assertion, and resumes bit for
bit from a checkpoint its running fit wrote at step 3, between two synchronisations (the check of
:func:`~tests.helpers.check_resume_equivalence`, its three fits in one 2-process launch). Refused pair (and
refused setting of a supported pair): the fit fails in the callback's ``setup``, before any optimizer is built,
with an error naming the callback, the strategy and the table's reason.

The default run keeps one supported pair per strategy (and every callback at least once) and every refusal
(they fail fast, all in one 2-process launch); the other supported pairs are ``slow``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from lightning_optx import (
    CompressedDDPStrategy,
    DiLoCoStrategy,
    DropoutSchedule,
    GradES,
    GradientSurgery,
    Grokfast,
    LocalSGDStrategy,
)
from lightning_optx.compatibility import CALLBACKS, COMPRESSED, LOCAL, STRATEGIES, TABLE, strategy_key
from lightning_optx.functional import schedules as S
from tests.callbacks.test_differential_privacy import DPModule
from tests.helpers import RankResult, TrainJob, assert_tree_equal, run_distributed
from tests.helpers.compare import tree_differences
from tests.helpers.models import MultiTaskModule, TinyModule
from tests.helpers.resume import StopAfterEpoch
from tests.helpers.runner import _fit

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
    pytest.mark.filterwarnings("ignore:.*DifferentialPrivacy.seed=.*"),
]

# 48 samples, batch 8, 2 ranks: 3 optimizer steps per epoch; 2 epochs; the checkpoint lands at step 3, mid-round
DATA_SIZE, BATCH_SIZE, STEPS_PER_EPOCH, EPOCHS, SPLIT_EPOCH = 48, 8, 3, 2, 1
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
SYNC_EVERY = 2  # local_sgd's period, DiLoCo's inner steps
TIMEOUT_S = 600.0  # the whole launch (three fits); a hang fails the test
DROPOUT_P, DROPOUT_CUTOFF = 0.3, 0.5

STRATEGY_FACTORIES: dict[str, Callable[..., Any]] = {
    "ddp": lambda **kw: "ddp",
    "local_sgd": functools.partial(LocalSGDStrategy, period=SYNC_EVERY),
    "diloco": functools.partial(DiLoCoStrategy, inner_steps=SYNC_EVERY),
    "diloco_x": functools.partial(DiLoCoStrategy, inner_steps=SYNC_EVERY, overlap=True, compressor="powersgd",
                                  compressor_options={"rank": 2}, adaptive_compression=True),
    "ddp_powersgd": functools.partial(CompressedDDPStrategy, "powersgd", compressor_options={"rank": 2}),
    "ddp_topk": functools.partial(CompressedDDPStrategy, "topk", compressor_options={"density": 0.1}),
    "ddp_sign": functools.partial(CompressedDDPStrategy, "sign"),
    "ddp_fp16": functools.partial(CompressedDDPStrategy, "fp16"),
    "ddp_bf16": functools.partial(CompressedDDPStrategy, "bf16"),
}

# the strategy arguments that give each refused setting of the table
SETTING_KWARGS: dict[str, dict[str, Any]] = {
    "warmup_steps > 0": {"warmup_steps": 2},
    "node replicas (replica_size > 1)": {"replica_size": 2},
}
SETTING_IDS = {"warmup_steps > 0": "warmup", "node replicas (replica_size > 1)": "replicas"}

# the supported pair of each strategy in the default run (every callback at least once); the rest are slow
DEFAULT_SUPPORTED = {
    "ddp": "DifferentialPrivacy",
    "local_sgd": "Grokfast",
    "diloco": "GradES",
    "diloco_x": "GradientSurgery",
    "ddp_powersgd": "GradES",
    "ddp_topk": "GradientSurgery",
    "ddp_sign": "Grokfast",
    "ddp_fp16": "DropoutSchedule",
    "ddp_bf16": "DropoutSchedule",
}


# ------------------------------------------------------------------------------------------ the pieces


def make_callback(name: str) -> Callback:
    if name == "Grokfast":
        return Grokfast(filter="ema", alpha=0.9, lamb=2.0)
    if name == "GradES":
        # fc1.weight freezes at the end of the grace period, step 1 of 6: mid-round, before the checkpoint
        return GradES(tau=10.0, grace_fraction=0.1, targets=[r"fc1\.weight$"], stop_when_all_frozen=False)
    if name == "DropoutSchedule":
        return DropoutSchedule("early", p=DROPOUT_P, cutoff=DROPOUT_CUTOFF)
    if name == "GradientSurgery":
        return GradientSurgery("pcgrad")
    if name == "DifferentialPrivacy":
        from lightning_optx import DifferentialPrivacy

        return DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", seed=3)
    raise AssertionError(f"no test configuration for callback {name}")


def make_module(name: str) -> Callable[[], pl.LightningModule]:
    sizes = {"data_size": DATA_SIZE, "batch_size": BATCH_SIZE}
    if name == "GradientSurgery":
        return functools.partial(MultiTaskModule, **sizes)
    if name == "DifferentialPrivacy":
        return functools.partial(DPModule, model="mlp", lr=0.1, **sizes)
    if name == "DropoutSchedule":
        return functools.partial(TinyModule, model="dropout_mlp", **sizes)
    return functools.partial(TinyModule, model="mlp", **sizes)


class Probe(Callback):
    """This rank's parameters after every optimizer step (after the callbacks' and the strategy's work on that
    step); no state, so not part of the resume comparison."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, Tensor]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.steps.append((trainer.global_step, {n: p.detach().clone() for n, p in pl_module.named_parameters()}))


def inspect(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    probe = next(cb for cb in trainer.callbacks if isinstance(cb, Probe))
    return {"strategy_key": strategy_key(trainer.strategy), "steps": probe.steps}


def pair_job(callback: str, strategy: str) -> TrainJob:
    return TrainJob(module=make_module(callback), callbacks=[make_callback(callback), Probe()],
                    strategy=STRATEGY_FACTORIES[strategy](), trainer_kwargs={"max_epochs": EPOCHS},
                    inspect=inspect)


# ------------------------------------------------------------------------------------------ the semantics


def callback_state(result: RankResult, callback: str) -> dict[str, Any]:
    states = [s for k, s in result.callback_states.items() if k.startswith(callback)]
    assert len(states) == 1, f"expected one {callback} state, got {list(result.callback_states)}"
    return states[0]


def params_at(result: RankResult) -> dict[int, dict[str, Tensor]]:
    """This rank's parameters after each optimizer step, by step."""
    return dict(result.inspected["steps"])


def assert_identical_every_step(ranks: list[RankResult]) -> None:
    a, b = params_at(ranks[0]), params_at(ranks[1])
    assert a.keys() == b.keys() and len(a) == TOTAL_STEPS
    for step in a:
        assert_tree_equal(a[step], b[step], f"parameters of rank 0 vs rank 1 after step {step}")


def assert_apart_after_step_1(ranks: list[RankResult]) -> None:
    """Between syncs each rank moves on its own: after step 1, before the first sync, the ranks differ."""
    assert tree_differences(params_at(ranks[0])[1], params_at(ranks[1])[1]), \
        "the ranks' parameters agree after step 1: something synchronised (or broadcast) what should stay local"


def assert_local_then_consensus(ranks: list[RankResult]) -> None:
    assert_apart_after_step_1(ranks)
    assert_tree_equal(ranks[0].params, ranks[1].params, "parameters of rank 0 vs rank 1 at the end of fit")


def check_grokfast(strategy: str, ranks: list[RankResult]) -> None:
    s0, s1 = callback_state(ranks[0], "Grokfast"), callback_state(ranks[1], "Grokfast")
    assert s0["filtered_steps"] == s1["filtered_steps"] == TOTAL_STEPS
    if strategy in LOCAL:  # filter on each rank's local gradient: the filters differ
        assert tree_differences(s0["ema"], s1["ema"]), "the ranks' Grokfast filters agree under a local strategy"
    else:  # filter on the averaged gradient: the same on every rank
        assert_tree_equal(s0, s1, "Grokfast state of rank 0 vs rank 1")


def check_grades(strategy: str, ranks: list[RankResult]) -> None:
    """Every rank freezes the same matrix at the same step. Under the shared strategies a frozen matrix never
    moves again. Under the local ones each rank froze its own local value, so the matrix is averaged one last
    time (at the next sync; with DiLoCoX's one-round delay, the sync after) and then never moves again on any
    rank (not in an average, an outer step or the end-of-fit sync), the same value on both; freezing broadcasts
    nothing (the ranks still differ after the freeze at step 1)."""
    f0, f1 = (callback_state(r, "GradES")["frozen"] for r in ranks)
    assert f0 == f1 == {"net.fc1.weight": 1}, f"the ranks froze {f0} and {f1}"
    settled = 1 if strategy not in LOCAL else 2 * SYNC_EVERY  # the step after which it may not move
    for r in ranks:
        steps = params_at(r)
        frozen_value = steps[settled]["net.fc1.weight"]
        for step in range(settled + 1, TOTAL_STEPS + 1):
            assert torch.equal(steps[step]["net.fc1.weight"], frozen_value), f"rank {r.rank}: moved at {step}"
        assert torch.equal(r.params["net.fc1.weight"], frozen_value), f"rank {r.rank}: moved at the end of fit"
    last = [params_at(r)[settled]["net.fc1.weight"] for r in ranks]
    assert torch.equal(last[0], last[1]), "the frozen matrix differs between the ranks once it has settled"
    if strategy in LOCAL:
        assert_apart_after_step_1(ranks)
    else:
        assert_identical_every_step(ranks)


def check_dropout(strategy: str, ranks: list[RankResult]) -> None:
    total = TOTAL_STEPS
    cutoff = S.resolve_cutoff(DROPOUT_CUTOFF, total)
    expected = [S.dropout_rate(step, total, "early", DROPOUT_P, cutoff, "linear") for step in range(total)]
    for r in ranks:
        # logged as float32
        assert r.series("dropout/p") == pytest.approx(expected, rel=1e-6), f"rank {r.rank}'s rates"


def check_surgery(strategy: str, ranks: list[RankResult]) -> None:
    if strategy in LOCAL:  # per-task gradients stay local between syncs
        assert_local_then_consensus(ranks)
    else:  # per-task gradients averaged (compressed or not): the same update on every rank
        assert_identical_every_step(ranks)


def check_privacy(strategy: str, ranks: list[RankResult]) -> None:
    if strategy in LOCAL:  # each replica runs DP-SGD on its own shard, with its own noise
        assert_local_then_consensus(ranks)
    else:
        assert_identical_every_step(ranks)
    for r in ranks:
        assert r.series("dp/epsilon"), f"rank {r.rank} logged no epsilon"


SEMANTICS: dict[str, Callable[[str, list[RankResult]], None]] = {
    "Grokfast": check_grokfast,
    "GradES": check_grades,
    "DropoutSchedule": check_dropout,
    "GradientSurgery": check_surgery,
    "DifferentialPrivacy": check_privacy,
}


# ------------------------------------------------------------------------------------------ supported pairs


def _supported_params() -> list[Any]:
    params = []
    for callback in CALLBACKS:
        for strategy in STRATEGIES:
            if TABLE[callback, strategy].supported:
                marks = () if DEFAULT_SUPPORTED[strategy] == callback else (pytest.mark.slow,)
                params.append(pytest.param(callback, strategy, marks=marks, id=f"{callback}-{strategy}"))
    return params


def _fits_in_one_launch(jobs: list[TrainJob]) -> list[RankResult]:
    """On each rank of an initialised 2-process group: the jobs one after the other, each a fresh Trainer."""
    env = dict(os.environ)
    results = []
    for job in jobs:
        results.append(_fit(copy.deepcopy(job), world_size=2))
        os.environ.clear()  # Lightning's teardown removes WORLD_SIZE and friends
        os.environ.update(env)
    return results


def check_resume_in_one_launch(job: TrainJob, tmp_dir: str) -> list[RankResult]:
    """:func:`tests.helpers.check_resume_equivalence` (crash mode), its three fits in one 2-process launch.

    The straight run, the run a ``ModelCheckpoint`` interrupts after ``SPLIT_EPOCH`` epochs (at step 3, between
    two synchronisations) and the run resumed from that checkpoint by a fresh Trainer; each fit gets fresh
    deep copies of the module factory and callbacks and is seeded the same way. One launch instead of three
    (each launch imports torch and Lightning in both processes). Returns the straight run.
    """
    kwargs = {**job.trainer_kwargs, "max_epochs": EPOCHS}
    ckpt = os.path.join(tmp_dir, "split.ckpt")
    writer = ModelCheckpoint(dirpath=tmp_dir, filename="split", every_n_train_steps=STEPS_PER_EPOCH * SPLIT_EPOCH,
                             save_top_k=1)
    jobs = [
        dataclasses.replace(job, trainer_kwargs=kwargs),
        dataclasses.replace(job, trainer_kwargs={**kwargs, "enable_checkpointing": True},
                            callbacks=[*job.callbacks, writer, StopAfterEpoch(SPLIT_EPOCH)]),
        dataclasses.replace(job, trainer_kwargs=kwargs, ckpt_path=ckpt),
    ]
    by_rank = run_distributed(_fits_in_one_launch, jobs, world_size=2, timeout=TIMEOUT_S)
    straight, first, resumed = ([by_rank[rank][i] for rank in range(2)] for i in range(3))
    assert os.path.exists(ckpt), "the interrupted run wrote no checkpoint"
    assert straight[0].global_step == TOTAL_STEPS and first[0].global_step == STEPS_PER_EPOCH * SPLIT_EPOCH
    for s, r in zip(straight, resumed):
        assert s.global_step == r.global_step
        assert_tree_equal(s.params, r.params, f"rank {s.rank} parameters after resume")
        assert_tree_equal(s.buffers, r.buffers, f"rank {s.rank} buffers after resume")
        assert_tree_equal(s.optimizer_states, r.optimizer_states, f"rank {s.rank} optimizer state after resume")
        assert_tree_equal(s.callback_states, r.callback_states, f"rank {s.rank} callback state after resume")
    return straight


@pytest.mark.parametrize(("callback", "strategy"), _supported_params())
def test_supported_pair_trains_with_its_semantics_and_resumes_bit_for_bit(callback, strategy, tmp_path):
    straight = check_resume_in_one_launch(pair_job(callback, strategy), str(tmp_path))
    assert [r.inspected["strategy_key"] for r in straight] == [strategy, strategy]
    SEMANTICS[callback](strategy, straight)


# ------------------------------------------------------------------------------------------ refusals


def _refusal_cases() -> list[tuple[str, str, str | None]]:
    """(callback, strategy, refused setting or None for a refused pair), for every refusal in the table."""
    cases: list[tuple[str, str, str | None]] = []
    for (callback, strategy), entry in TABLE.items():
        if not entry.supported:
            cases.append((callback, strategy, None))
        cases += [(callback, strategy, refused.setting) for refused in entry.refused_settings]
    return cases


class StepCounter(Callback):
    def __init__(self) -> None:
        self.optimizer_steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.optimizer_steps += 1


def _try_refused_fits(cases: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
    """On each rank of an initialised 2-process group: one fit per case; what each raised and how far it got."""
    import lightning_optx  # noqa: F401  (registers the strategy names)
    from tests.helpers.runner import InMemoryLogger

    outcomes = []
    env = dict(os.environ)
    for callback, strategy, setting in cases:
        pl.seed_everything(7, verbose=False)
        kwargs = SETTING_KWARGS[setting] if setting is not None else {}
        counter = StepCounter()
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy=STRATEGY_FACTORIES[strategy](**kwargs), max_epochs=EPOCHS,
            callbacks=[make_callback(callback), counter], logger=InMemoryLogger(), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True,
        )
        error: str | None = None
        try:
            trainer.fit(make_module(callback)())
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        os.environ.clear()  # Lightning's teardown removes WORLD_SIZE and friends
        os.environ.update(env)
        outcomes.append({"error": error, "optimizers": len(trainer.optimizers), "steps": counter.optimizer_steps,
                         "global_step": trainer.global_step, "key": strategy_key(trainer.strategy)})
    return outcomes


@pytest.fixture(scope="module")
def refusal_outcomes() -> dict[tuple[str, str, str | None], list[dict[str, Any]]]:
    cases = _refusal_cases()
    by_rank = run_distributed(_try_refused_fits, cases, world_size=2, timeout=TIMEOUT_S)
    return {case: [by_rank[0][i], by_rank[1][i]] for i, case in enumerate(cases)}


@pytest.mark.parametrize(("callback", "strategy", "setting"),
                         [pytest.param(*case, id="-".join([*case[:2], *([SETTING_IDS[case[2]]] if case[2] else [])]))
                          for case in _refusal_cases()])
def test_refused_pair_fails_at_setup_naming_callback_strategy_and_reason(callback, strategy, setting,
                                                                         refusal_outcomes):
    entry = TABLE[callback, strategy]
    reason = entry.text if setting is None else next(r.reason for r in entry.refused_settings if r.setting == setting)
    for rank, outcome in enumerate(refusal_outcomes[callback, strategy, setting]):
        assert outcome["key"] == strategy
        assert outcome["error"] is not None, f"rank {rank}: {callback} x {strategy} ({setting}) trained"
        assert outcome["error"].startswith(f"ValueError: {callback} cannot be combined with strategy {strategy!r}")
        assert reason in outcome["error"]
        if setting is not None:
            assert setting in outcome["error"]
        # failed in the callback's setup: before configure_optimizers, so before any step
        assert outcome["optimizers"] == 0 and outcome["steps"] == 0 and outcome["global_step"] == 0


def test_every_strategy_and_refused_setting_has_a_test_configuration():
    assert set(STRATEGY_FACTORIES) == set(STRATEGIES) == set(DEFAULT_SUPPORTED)
    assert all(TABLE[DEFAULT_SUPPORTED[s], s].supported for s in STRATEGIES)
    assert {DEFAULT_SUPPORTED[s] for s in STRATEGIES} == set(CALLBACKS)
    assert {setting for _, _, setting in _refusal_cases() if setting} <= set(SETTING_KWARGS) == set(SETTING_IDS)
    assert set(COMPRESSED) <= set(STRATEGIES)
