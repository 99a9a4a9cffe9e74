"""GradientSurgery under lightning_optx's strategies: local surgery between syncs, per-task compression, resume."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_optx import GradientSurgery
from lightning_optx.strategies import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job
from tests.helpers.models import MultiTaskModule
from tests.helpers.recorder import StepRecorder

TASKS = 2
PERIOD = 3


def trace(trainer, module):
    """Every step's parameters (as one vector), the strategy's ledger and the compressor's state."""
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    strategy = trainer.strategy
    compressor = getattr(strategy, "compressor", None)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    return {
        "params": {r["step"]: torch.cat([p.reshape(-1) for p in r["params"].values()]) for r in recorder.records},
        "records": strategy.comm.ledger.as_dicts(),
        "sync_steps": list(getattr(strategy, "sync_steps", [])),
        "final_sync_step": getattr(strategy, "final_sync_step", None),
        "shapes": shapes,
        "compressor": compressor,
    }


def job(strategy, method="pcgrad", epochs=2, callbacks=(), **module_kwargs):
    return TrainJob(module=functools.partial(MultiTaskModule, **module_kwargs),
                    callbacks=[GradientSurgery(method), *callbacks], strategy=strategy,
                    trainer_kwargs={"max_epochs": epochs}, inspect=trace)


class Shard(MultiTaskModule):
    """MultiTaskModule on one process, trained on the shard rank ``rank`` of 2 gets under ``shard_in_order``."""

    def __init__(self, rank: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank = rank

    def train_dataloader(self):
        from torch.utils.data import DataLoader, Subset

        full = super().train_dataloader().dataset
        return DataLoader(Subset(full, list(range(self.rank, len(full), 2))), batch_size=self.hparams.batch_size)


# ---------------------------------------------------------------- local strategies


def assert_local_between_syncs(r0, r1):
    """No task-gradient traffic: ranks' parameters differ between the strategy's syncs and agree after each."""
    t0, t1 = r0.inspected, r1.inspected
    steps = sorted(t0["params"])
    syncs = set(t0["sync_steps"])
    assert syncs == {s for s in steps if s % PERIOD == 0}
    # the ledger holds the strategy's parameter averages (and the one at the end of fit) and nothing else: no
    # task gradient, no agreement on what the tasks reached
    assert {r["tag"] for r in t0["records"]} == {"params"}
    assert t0["final_sync_step"] == steps[-1]
    assert sorted({r["step"] for r in t0["records"]}) == sorted([s - 1 for s in syncs] + [steps[-1] - 1])
    n_params = sum(torch.Size(s).numel() for s in t0["shapes"].values())
    assert all(r["payload_bytes"] == 4 * n_params for r in t0["records"])
    for s in steps:
        gap = (t0["params"][s] - t1["params"][s]).norm() / t0["params"][s].norm()
        if s in syncs:
            assert torch.equal(t0["params"][s], t1["params"][s]), f"ranks differ right after the sync at step {s}"
        else:
            assert gap > 1e-4, f"ranks agree at step {s}, between syncs: were task gradients averaged?"
    assert r0.series("surgery/bytes_per_step") and set(r0.series("surgery/bytes_per_step")) == {0.0}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_sgd_rank_equals_single_process_surgery_on_its_shard_until_the_first_sync():
    """Between syncs each rank runs exactly the single-process method on its own data."""
    sharded = {"shard_in_order": True, "batch_size": 8}
    local = TrainJob(module=functools.partial(MultiTaskModule, **sharded),
                     callbacks=[GradientSurgery("cagrad"), StepRecorder()], strategy=LocalSGDStrategy(period=100),
                     trainer_kwargs={"max_steps": 2, "use_distributed_sampler": False}, inspect=trace)
    ranks = run_job(local, world_size=2)
    assert not torch.equal(ranks[0].inspected["params"][2], ranks[1].inspected["params"][2])
    for rank in ranks:  # (fit ends with an average: compare the parameters recorded at step 2, before it)
        single = run_job(TrainJob(module=functools.partial(Shard, rank=rank.rank, **sharded),
                                  callbacks=[GradientSurgery("cagrad")], trainer_kwargs={"max_steps": 2}))[0]
        expected = torch.cat([p.reshape(-1) for p in single.params.values()])
        torch.testing.assert_close(rank.inspected["params"][2], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_sgd_warmup_averages_task_gradients_over_the_world():
    [r0, r1] = run_job(job(LocalSGDStrategy(period=PERIOD, warmup_steps=2), callbacks=[StepRecorder()]),
                       world_size=2)
    t0, t1 = r0.inspected, r1.inspected
    task_steps = sorted({r["step"] for r in t0["records"] if r["tag"] == "task_grads"})
    assert task_steps == [0, 1]
    for s in (1, 2):
        assert torch.equal(t0["params"][s], t1["params"][s])
    assert not torch.equal(t0["params"][3], t1["params"][3])


@pytest.mark.multiprocess
def test_local_sgd_surgery_is_local_between_syncs_and_resumes_mid_round_bit_exact(tmp_path):
    """4 steps per epoch, period 3: the checkpoint after epoch 1 falls mid-round; SAM-GS state is per rank."""
    module = functools.partial(MultiTaskModule, optimizer="adamw", lr=1e-2)
    straight, _ = check_resume_equivalence(
        TrainJob(module=module, callbacks=[GradientSurgery("sam_gs"), StepRecorder()],
                 strategy=LocalSGDStrategy(period=PERIOD), inspect=trace),
        total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert_local_between_syncs(*straight)
    key = next(iter(straight[0].callback_states))
    m0 = straight[0].callback_states[key]["aggregator"]["state"]["m"]
    m1 = straight[1].callback_states[key]["aggregator"]["state"]["m"]
    # per-rank state: different on the two ranks, and each rank's resumed bit for bit (above)
    assert (m0 - m1).norm() > 1e-3 * m0.norm(), "SAM-GS's momentum should differ per rank under local gradients"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    pytest.param(lambda: DiLoCoStrategy(inner_steps=3), id="diloco"),
    pytest.param(lambda: DiLoCoStrategy(inner_steps=3, overlap=True, compressor="powersgd",
                                        compressor_options={"rank": 1}), id="diloco_x"),
])
def test_diloco_resume_mid_round_is_bit_exact(tmp_path, strategy):
    module = functools.partial(MultiTaskModule, optimizer="adamw", lr=1e-2)
    straight, _ = check_resume_equivalence(
        TrainJob(module=module, callbacks=[GradientSurgery("sam_gs"), StepRecorder()], strategy=strategy(),
                 inspect=trace),
        total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert "task_grads" not in {r["tag"] for r in straight[0].inspected["records"]}


# ---------------------------------------------------------------- compressed DDP


def powersgd():
    return CompressedDDPStrategy("powersgd", compressor_options={"rank": 1})


def expected_payload(inspected, tasks=TASKS):
    """The compressor's payload for T copies of the trunk's gradients plus each head's own."""
    shapes = inspected["shapes"]
    trunk = [torch.empty(s) for n, s in shapes.items() if n.startswith("trunk.")]
    heads = [torch.empty(s) for n, s in shapes.items() if n.startswith("heads.")]
    return inspected["compressor"].payload_bytes(trunk * tasks + heads, world_size=2)


def assert_per_task_compression(r0, r1):
    """T x the compressor's payload per step, per-task residuals, the same parameters on every rank each step."""
    t0 = r0.inspected
    n_params = len(t0["shapes"])
    payload = expected_payload(t0)
    one_copy = t0["compressor"].payload_bytes([torch.empty(s) for s in t0["shapes"].values()], world_size=2)
    assert payload < 4 * sum(torch.Size(s).numel() for s in t0["shapes"].values()) * TASKS  # it does compress
    steps = sorted(t0["params"])
    for s in steps:
        records = [r for r in t0["records"] if r["step"] == s - 1]
        assert sum(r["payload_bytes"] for r in records if r["tag"] == "task_grads") == payload
        assert {r["tag"] for r in records} == {"task_grads", "reached"}
        assert sum(r["payload_bytes"] for r in records if r["tag"] == "reached") == 4 * TASKS * n_params
        assert torch.equal(t0["params"][s], r1.inspected["params"][s]), f"ranks differ at step {s}"
    assert payload > one_copy  # T x the shared part
    assert r0.series("surgery/bytes_per_step")[-1] == payload
    assert r0.series("comm/bytes_per_step")[-1] == payload + 4 * TASKS * n_params  # the strategy's own metric
    residuals = t0["compressor"].residuals
    for task in ("task0", "task1"):
        assert f"{task}/trunk.0.weight" in residuals and f"{task}/trunk.2.weight" in residuals
    assert not torch.equal(residuals["task0/trunk.2.weight"], residuals["task1/trunk.2.weight"])
    assert "trunk.0.weight" not in residuals  # no un-prefixed copy: only the per-task keys
    assert_ranks_identical([r0, r1])


@pytest.mark.multiprocess
def test_powersgd_compresses_each_task_gradient_with_its_own_error_feedback_and_resumes_bit_exact(tmp_path):
    module = functools.partial(MultiTaskModule, optimizer="adamw", lr=1e-2)
    straight, _ = check_resume_equivalence(
        TrainJob(module=module, callbacks=[GradientSurgery("sam_gs"), StepRecorder()], strategy=powersgd(),
                 inspect=trace),
        total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert_per_task_compression(*straight)
    assert_ranks_identical(straight)
    assert_ranks_identical(straight, "callback_states")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16"])
def test_other_compressors_keep_ranks_identical_and_resume(tmp_path, name):
    module = functools.partial(MultiTaskModule, optimizer="adamw", lr=1e-2)
    straight, _ = check_resume_equivalence(
        TrainJob(module=module, callbacks=[GradientSurgery("pcgrad")], strategy=name),
        total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert_ranks_identical(straight)


# ---------------------------------------------------------------- refusal


class OtherDDP(DDPStrategy):
    """A DDP subclass that is neither Lightning's own nor one of ours."""


def test_unknown_ddp_subclass_is_refused():
    with pytest.raises(ValueError, match="GradientSurgery supports single-device training, Lightning's DDPStrategy "
                                         "and lightning_optx's strategies, got OtherDDP"):
        run_job(TrainJob(module=MultiTaskModule, callbacks=[GradientSurgery("pcgrad")], strategy=OtherDDP(),
                         trainer_kwargs={"max_steps": 1}))


class InfOnRank0AtStep1(MultiTaskModule):
    """Task 0's loss is inf on rank 0 only, at step 1: every rank must skip that step together."""

    def task_losses(self, x, y):
        losses = super().task_losses(x, y)
        if self.trainer.global_step == 1 and self.trainer.global_rank == 0:
            losses["task0"] = losses["task0"] * float("inf")
        return losses


def compressor_iteration(trainer, module):
    return {"iteration": trainer.strategy.compressor.iteration,
            "skipped_syncs": trainer.strategy.skipped_nonfinite_syncs,
            "scale": trainer.precision_plugin.scaler.get_scale()}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fp16_non_finite_step_on_one_rank_is_averaged_uncompressed_and_skipped_everywhere():
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    ranks = run_job(TrainJob(module=InfOnRank0AtStep1, callbacks=[GradientSurgery("sam_gs")], strategy=powersgd(),
                             trainer_kwargs={"max_steps": 4, "plugins": [plugin]}, inspect=compressor_iteration),
                    world_size=2)
    assert_ranks_identical(ranks)
    for r in ranks:
        state = next(iter(r.callback_states.values()))
        assert state["skipped_nonfinite_steps"] == 1  # both ranks saw the inf of rank 0
        assert state["aggregator"]["state"]["step"] == 3  # the method's state skipped it too
        assert r.inspected["skipped_syncs"] == 1
        assert r.inspected["iteration"] == 3  # the compressor's state was left untouched at that step
        assert all(torch.isfinite(p).all() for p in r.params.values())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_sgd_node_replicas_average_task_gradients_inside_the_replica_only():
    """4 processes, replicas of 2: task gradients averaged inside a replica every step, never across replicas."""
    ranks = run_job(job(LocalSGDStrategy(period=PERIOD, replica_size=2), callbacks=[StepRecorder()]),
                    world_size=4)
    traces = [r.inspected for r in ranks]
    task_records = [r for r in traces[0]["records"] if r["tag"] in ("task_grads", "reached")]
    assert task_records and all(r["world_size"] == 2 for r in task_records)
    syncs = set(traces[0]["sync_steps"])
    for s in sorted(traces[0]["params"]):
        assert torch.equal(traces[0]["params"][s], traces[1]["params"][s]), f"replica 0 split at step {s}"
        assert torch.equal(traces[2]["params"][s], traces[3]["params"][s]), f"replica 1 split at step {s}"
        assert torch.equal(traces[0]["params"][s], traces[2]["params"][s]) == (s in syncs), s


def compressor_keys(trainer, module):
    return sorted(trainer.strategy.compressor.residuals), trainer.strategy.compressor.iteration


def test_one_process_compressed_ddp_still_compresses_each_task():
    """As the strategy itself: on one process the compression (and its error feedback) applies, with no traffic."""
    [r] = run_job(TrainJob(module=MultiTaskModule, callbacks=[GradientSurgery("pcgrad")], strategy=powersgd(),
                           trainer_kwargs={"max_steps": 3}, inspect=compressor_keys))
    keys, iteration = r.inspected
    assert keys == [f"{t}/trunk.{i}.weight" for t in ("task0", "task1") for i in (0, 2)]
    assert iteration == 3


def per_rank_surgery_parts(trainer, module):
    return {k: v for k, v in trainer.strategy.per_rank_state.collect().items() if k.startswith("GradientSurgery")}


def test_rank_zero_does_not_write_the_surgery_state_twice():
    """Under a local strategy the method's state is per-rank state, but rank 0's already is the checkpoint's own
    callback state: its per-rank part stays empty (no second copy in the checkpoint)."""
    [r] = run_job(TrainJob(module=MultiTaskModule, callbacks=[GradientSurgery("sam_gs")],
                           strategy=LocalSGDStrategy(period=2), trainer_kwargs={"max_steps": 2},
                           inspect=per_rank_surgery_parts))
    assert list(r.inspected.values()) == [{}], r.inspected


def test_frozen_parameters_lose_their_per_task_error_feedback():
    """GradES + surgery under compressed DDP: residuals are keyed "<task>/<name>"; a frozen name drops them all."""
    from lightning_optx.compression import TopK
    from lightning_optx.strategies._ddp_base import drop_error_feedback

    compressor = TopK(density=0.5)
    compressor.residuals.update({k: torch.ones(2) for k in ("task0/fc.weight", "task1/fc.weight", "fc.weight",
                                                          "task0/fc.bias", "head.weight")})
    drop_error_feedback(compressor, ["fc.weight"])
    assert sorted(compressor.residuals) == ["head.weight", "task0/fc.bias"]
