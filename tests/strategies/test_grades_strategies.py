"""GradES with our strategies: a freeze keeps every rank's local progress, frozen matrices leave the payload
(bytes per sync against the analytic count), DiLoCo stops moving them, and a mid-round resume is bit-exact."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_optx import CompressedDDPStrategy, DiLoCoStrategy, GradES, LocalSGDStrategy
from tests.helpers import TrainJob, assert_ranks_identical, assert_tree_equal, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule
from tests.helpers.resume import StopAfterEpoch

TRANSFORMER = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1)
EPOCHS = 4  # 64 samples, batch 8, 2 ranks: 4 steps per epoch, 16 planned; grace 0.3 -> first freezes at 5..7


def grades() -> GradES:
    return GradES(tau=0.5, tau_mode="relative", grace_fraction=0.3, stop_when_all_frozen=False)


class Snapshot(Callback):
    """This rank's parameters at every ``on_train_batch_end``; placed before and after GradES in the list."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.params[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def facts(trainer, module):
    """What the tests check, gathered on every rank after fit (module-level: sent to spawned processes)."""
    cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
    before, after = [c for c in trainer.callbacks if isinstance(c, Snapshot)]
    strategy = trainer.strategy
    records = [(r.step, r.tag, r.payload_bytes) for r in strategy.comm.ledger.records]
    out = {
        "frozen": dict(cb.frozen),
        "shapes": {n: tuple(p.shape) for n, p in module.named_parameters()},
        "records": records,
        "before": before.params,
        "after": after.params,
        "residual_names": sorted(str(k) for k in getattr(getattr(strategy, "compressor", None), "residuals", {})),
    }
    if isinstance(strategy, DiLoCoStrategy):
        out["momentum_names"] = sorted(n for frag in strategy._fragments for n, g in zip(frag.names, frag.global_params)
                                       if frag.outer.state.get(g))
        out["global"] = {n: g.clone() for n, g in strategy.global_state_dict().items()}
    if isinstance(strategy, LocalSGDStrategy):
        out["sync_steps"] = list(strategy.sync_steps)
    return out


def job(strategy, epochs: int = EPOCHS) -> TrainJob:
    return TrainJob(module=TRANSFORMER, strategy=strategy, callbacks=[Snapshot(), grades(), Snapshot()],
                    trainer_kwargs={"max_epochs": epochs}, inspect=facts)


def payload_numel(shapes: dict[str, tuple[int, ...]], frozen: dict[str, int], since: int) -> int:
    """Elements a sync sends: every parameter not frozen before the previous sync at step ``since``.

    A matrix frozen at step ``f`` (after that step's sync, if any) is sent by every sync up to the first one
    after ``f``, its last (``f >= since``).
    """
    return sum(math.prod(s) for n, s in shapes.items() if frozen.get(n, math.inf) >= since)


def sync_bytes(records, tag: str) -> dict[int, int]:
    """Payload bytes per optimizer step (1-based, the step whose end issued them) for one tag."""
    out: dict[int, int] = {}
    for step, t, nbytes in records:
        if t == tag:
            out[step + 1] = out.get(step + 1, 0) + nbytes
    return out


def check_freezes_keep_local_progress(ranks) -> None:
    """A freeze (DDP re-wrap) changes no rank's parameters, and it happened while the ranks differed."""
    frozen = ranks[0].inspected["frozen"]
    assert frozen and all(r.inspected["frozen"] == frozen for r in ranks)  # the same decision on every rank
    freeze_steps = sorted(set(frozen.values()))
    diverged = 0
    for step in freeze_steps:
        for r in ranks:
            before, after = r.inspected["before"][step], r.inspected["after"][step]
            for name in before:
                assert torch.equal(before[name], after[name]), (r.rank, step, name)
        diverged += any(not torch.equal(ranks[0].inspected["after"][step][n], ranks[1].inspected["after"][step][n])
                        for n in frozen)
    assert diverged, "no freeze happened between two syncs: the test would not see a broadcast"


def check_frozen_never_move_after_their_last_sync(result, last_sync_of) -> None:
    snapshots = result.inspected["after"]
    for name, step in result.inspected["frozen"].items():
        settled = last_sync_of(step)
        if settled >= max(snapshots):
            continue  # settled by the final synchronisation, after the last snapshot
        values = [snapshots[s][name] for s in sorted(snapshots) if s >= settled]
        assert all(torch.equal(v, values[0]) for v in values), name
        assert torch.equal(result.params[name], values[0]), name


@pytest.mark.multiprocess
def test_local_sgd_freeze_keeps_local_progress_leaves_the_average_and_resumes_bit_exact(tmp_path):
    """period 3: syncs at 3, 6, 9, ...; GradES freezes at steps 5..7, between syncs; checkpoint at step 8."""
    straight, _ = check_resume_equivalence(job(LocalSGDStrategy(period=3)), total_epochs=EPOCHS, split_epoch=2,
                                           tmp_dir=str(tmp_path), world_size=2)
    check_freezes_keep_local_progress(straight)
    facts0 = straight[0].inspected
    frozen, shapes, syncs = facts0["frozen"], facts0["shapes"], facts0["sync_steps"]
    assert any(f % 3 for f in frozen.values())
    sent = sync_bytes(facts0["records"], "params")
    previous = [0, *syncs]
    expected = {s: 4 * payload_numel(shapes, frozen, prev) for s, prev in zip(syncs, previous)}
    assert {s: sent[s] for s in syncs} == expected
    assert expected[syncs[-1]] < expected[syncs[0]]  # the bytes per sync fall as matrices freeze
    check_frozen_never_move_after_their_last_sync(straight[0], lambda f: min(s for s in [*syncs, 16] if s > f))
    assert_ranks_identical(straight)  # the final sync leaves every rank on the consensus


@pytest.mark.multiprocess
def test_diloco_frozen_matrices_leave_the_outer_step_and_resume_bit_exact(tmp_path):
    """inner_steps 3: a matrix frozen mid-round takes a plain average at its last sync, then never moves."""
    straight, _ = check_resume_equivalence(job(DiLoCoStrategy(inner_steps=3)), total_epochs=EPOCHS, split_epoch=2,
                                           tmp_dir=str(tmp_path), world_size=2)
    check_freezes_keep_local_progress(straight)
    facts0 = straight[0].inspected
    frozen, shapes = facts0["frozen"], facts0["shapes"]
    syncs = [3, 6, 9, 12, 15]
    sent = sync_bytes(facts0["records"], "pseudo_grad")
    expected = {s: 4 * payload_numel(shapes, frozen, prev) for s, prev in zip(syncs, [0, *syncs])}
    expected[17] = 4 * payload_numel(shapes, frozen, 15)  # the final synchronisation (recorded at step 16)
    assert sent == expected
    assert expected[15] < expected[3]
    check_frozen_never_move_after_their_last_sync(straight[0], lambda f: min(s for s in [*syncs, 16] if s > f))
    # no outer momentum is left on a frozen matrix, and its global copy is its value
    assert not set(facts0["momentum_names"]) & set(frozen)
    for name in frozen:
        assert torch.equal(facts0["global"][name], straight[0].params[name]), name
    assert_ranks_identical(straight)


@pytest.mark.multiprocess
def test_powersgd_sends_only_trainable_matrices_and_drops_their_residuals():
    strategy = CompressedDDPStrategy("powersgd", compressor_options={"rank": 2})
    ranks = run_job(job(strategy, epochs=3), world_size=2)
    facts0 = ranks[0].inspected
    frozen, shapes = facts0["frozen"], facts0["shapes"]
    assert frozen
    compressor = strategy.compressor
    sent = sync_bytes(facts0["records"], "grad")
    for step, nbytes in sent.items():
        # a matrix frozen at step f (after that step) is not sent from step f + 1 on
        live = [torch.empty(s) for n, s in shapes.items() if frozen.get(n, math.inf) >= step]
        assert nbytes == compressor.payload_bytes(live, 2), step
    assert sent[max(sent)] < sent[1]
    for r in ranks:
        assert not set(r.inspected["residual_names"]) & set(frozen)
    assert_ranks_identical(ranks)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"overlap": True, "compressor": "powersgd", "compressor_options": {"rank": 2}},
    {"fragments": 3, "compressor": "topk", "compressor_options": {"density": 0.25}},
    {"overlap": True, "adaptive_compression": True, "compressor": "topk", "compressor_options": {"density": 0.25}},
], ids=["overlap_powersgd", "fragments_topk", "overlap_adaptive_topk"])
def test_diloco_x_variants_resume_bit_exact_and_forget_frozen_residuals(tmp_path, options):
    straight, _ = check_resume_equivalence(job(DiLoCoStrategy(inner_steps=3, **options)), total_epochs=EPOCHS,
                                           split_epoch=2, tmp_dir=str(tmp_path), world_size=2)
    check_freezes_keep_local_progress(straight)
    frozen = straight[0].inspected["frozen"]
    for r in straight:
        assert not set(r.inspected["momentum_names"]) & set(frozen)
        assert not set(r.inspected["residual_names"]) & set(frozen)
        for name in frozen:
            assert torch.equal(r.inspected["global"][name], r.params[name]), name
    assert_ranks_identical(straight)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_sgd_with_optimizer_state_averaging_resumes_bit_exact(tmp_path):
    strategy = LocalSGDStrategy(period=3, average_optimizer_state=True)
    straight, _ = check_resume_equivalence(job(strategy), total_epochs=EPOCHS, split_epoch=2, tmp_dir=str(tmp_path),
                                           world_size=2)
    check_freezes_keep_local_progress(straight)
    assert_ranks_identical(straight)


class PreFrozen(TinyModule):
    """The module of a script that fits, then resumes with the same object: GradES's matrices already frozen."""

    FROZEN: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__(model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1)
        for name, p in self.named_parameters():
            p.requires_grad_(name not in self.FROZEN)


def test_diloco_resumes_into_a_module_whose_matrices_are_already_frozen(tmp_path):
    """The global copies are matched to the checkpoint's parameter names, not to the trainable ones at set-up
    (which once failed with "The size of tensor a (64) must match the size of tensor b (16)")."""
    single = TrainJob(module=TRANSFORMER, strategy=DiLoCoStrategy(inner_steps=3), callbacks=[grades()],
                      trainer_kwargs={"max_epochs": 3})  # 8 steps per epoch; checkpoint at 16, mid-round
    writer = ModelCheckpoint(dirpath=str(tmp_path), filename="mid", every_n_train_steps=16, save_top_k=1)
    [first] = run_job(dataclasses.replace(single, callbacks=[grades(), writer, StopAfterEpoch(2)],
                                          trainer_kwargs={"max_epochs": 3, "enable_checkpointing": True}))
    frozen = first.callback_states[next(iter(first.callback_states))]["frozen"]
    assert frozen and max(frozen.values()) <= 16
    [straight] = run_job(single)
    PreFrozen.FROZEN = tuple(frozen)
    try:
        [resumed] = run_job(dataclasses.replace(single, module=PreFrozen, ckpt_path=str(tmp_path / "mid.ckpt")))
    finally:
        PreFrozen.FROZEN = ()
    assert_tree_equal(straight.params, resumed.params, "parameters after resume")


class OwnUpdate(Callback):
    """Per step: each watched matrix's mean |change| made by ``optimizer.step`` alone, the change seen at the
    batch end (sync included), and GradES's recorded metric. Placed after GradES in the callback list."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, dict[str, float]]] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._after: dict[str, torch.Tensor] = {}
        self._handle = None

    def _watched(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
        params = dict(pl_module.named_parameters())
        return {n: params[n] for n in cb.target_names}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        watched = self._watched(trainer, pl_module)
        self._before = {n: p.detach().clone() for n, p in watched.items()}

        def after_step(*_):
            self._after = {n: p.detach().clone() for n, p in watched.items()}

        self._handle = optimizer.register_step_post_hook(after_step)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._handle.remove()
        cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
        now = self._watched(trainer, pl_module)
        self.steps[trainer.global_step] = {
            "own": {n: float((self._after[n] - b).abs().double().mean()) for n, b in self._before.items()},
            "batch_end": {n: float((now[n].detach() - b).abs().double().mean()) for n, b in self._before.items()},
            "metric": dict(cb.last_metrics),
        }


def own_update_facts(trainer, module):
    cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
    assert cb.component_names == cb.target_names  # no LoRA pair: a component is one matrix
    return next(c for c in trainer.callbacks if isinstance(c, OwnUpdate)).steps


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", [lambda: DiLoCoStrategy(inner_steps=4, outer_lr=0.7),
                                      lambda: LocalSGDStrategy(period=4)], ids=["diloco", "local_sgd"])
def test_weight_delta_is_the_optimizer_update_not_the_sync_jump(strategy):
    """weight_delta at a sync step is what ``optimizer.step`` moved the matrix (mean over ranks), not the jump to
    the average or the outer step that the strategy applies before the batch ends."""
    cb = GradES(tau=1e-12, metric="weight_delta", grace_fraction=0.99, stop_when_all_frozen=False)
    job = TrainJob(module=TRANSFORMER, strategy=strategy(), callbacks=[cb, OwnUpdate()],
                   trainer_kwargs={"max_epochs": 2}, inspect=own_update_facts)
    r0, r1 = run_job(job, world_size=2)
    assert sorted(r0.inspected) == list(range(1, 9))  # 8 steps; syncs after steps 4 and 8
    for step in r0.inspected:
        a, b = r0.inspected[step], r1.inspected[step]
        assert a["metric"] == b["metric"]  # one all-reduced value: the same decision on both ranks
        for name, metric in a["metric"].items():
            own = (a["own"][name] + b["own"][name]) / 2
            assert metric == pytest.approx(own, rel=1e-5, abs=0), (step, name)
        jump = sum(abs(a["batch_end"][n] - a["own"][n]) / a["own"][n] for n in a["own"]) / len(a["own"])
        # the test is only sensitive if the sync moves the weights: the batch-end change differs at syncs only
        assert (jump > 0.1) if step % 4 == 0 else (jump < 1e-6), (step, jump)
