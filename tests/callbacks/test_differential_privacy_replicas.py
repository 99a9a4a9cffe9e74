"""DifferentialPrivacy under Local SGD and DiLoCo: one DP-SGD per replica on its own Poisson shard, full noise per
replica drawn independently, no gradient all-reduce, the logged epsilon one replica's, refusals at set-up, resume."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

pytest.importorskip("opacus")

from lightning_optx.callbacks.differential_privacy import DifferentialPrivacy, checks
from lightning_optx.strategies import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy
from tests.callbacks.test_differential_privacy import DP_KEY, DPModule, clipped_sum, per_sample_gradients
from tests.helpers import TrainJob, assert_tree_equal, check_resume_equivalence, run_job

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
    pytest.mark.filterwarnings("ignore:.*DifferentialPrivacy.seed=.*"),
]

LR, CLIP, SIGMA, BATCH, DATA = 0.1, 0.05, 1.0, 4, 64


class MomentumDPModule(DPModule):
    """SGD with momentum: optimizer state that differs per replica between syncs (saved per rank on resume)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class StepRecorder(Callback):
    """Per optimizer step: the batch, the parameters before, the gradient the optimizer applied (after the DP step),
    the parameters after; at the end, the strategy's ledger and the DP optimizer's class."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._current = {"batch": [t.detach().clone() for t in batch],
                         "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()}}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._current["applied"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        self._current["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self._current["step"] = trainer.global_step
        self.records.append(self._current)


def recorded(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    dp = next(cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy))
    return {"records": recorder.records, "ledger": trainer.strategy.comm.ledger.as_dicts(),
            "optimizer": [c.__name__ for c in type(trainer.optimizers[0]).__mro__], "sample_rate": dp.sample_rate,
            "expected": dp.expected_batch_size, "state": dp.state_dict(), "epsilon": dp.epsilon}


def replica_job(cb: DifferentialPrivacy, strategy: Any, **trainer_kwargs: Any) -> TrainJob:
    return TrainJob(module=functools.partial(DPModule, model="mlp", lr=LR, batch_size=BATCH, data_size=DATA),
                    callbacks=[cb, StepRecorder()], strategy=strategy, inspect=recorded,
                    trainer_kwargs={"max_epochs": 1, **trainer_kwargs})


def replica_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """One replica's epsilon, computed here with Opacus' RDP accountant: Poisson rate = the replica's expected batch
    over its shard's size (2 replicas, disjoint halves of the data)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, BATCH / (DATA / 2), steps)]
    return float(accountant.get_epsilon(delta=delta))


def own_noise(record: dict[str, Any], expected_per_replica: float) -> Tensor:
    """The noise this replica added at one step: its applied gradient x its expected batch minus the clipped sum of
    its own batch's per-sample gradients (flattened over every parameter)."""
    grads = per_sample_gradients(record["before"], *record["batch"])
    reference = clipped_sum(grads, CLIP) if grads else {n: torch.zeros_like(t) for n, t in record["before"].items()}
    noise = [(record["applied"][n] * expected_per_replica - reference[n]).flatten() for n in sorted(reference)]
    return torch.cat(noise)


# ---------------------------------------------------------------- refusals (single process, or no Trainer)


class NoStep(Callback):
    def on_train_batch_start(self, *args: Any) -> None:
        raise AssertionError("a training step started")


def fit_single(strategy: Any) -> None:
    trainer = pl.Trainer(callbacks=[DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), NoStep()],
                         strategy=strategy, accelerator="cpu", devices=1, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DPModule(model="mlp"))


@pytest.mark.parametrize(("strategy", "name", "reason"), [
    (lambda: LocalSGDStrategy(period=2, warmup_steps=1), "local_sgd",
     "Local SGD's warm-up is plain DDP"),
    *[(functools.partial(CompressedDDPStrategy, c), f"ddp_{c}", "a compressed, error-fed per-rank message is not a "
       "post-processing of the noised sum") for c in ("powersgd", "topk", "sign")],
    *[(functools.partial(CompressedDDPStrategy, c), f"ddp_{c}", "a per-rank message rounded before the sum is not a "
       "post-processing of the noised sum") for c in ("fp16", "bf16")],
], ids=["local_sgd-warmup", "ddp_powersgd", "ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16"])
def test_refused_strategies_raise_at_setup_naming_the_callback_the_strategy_and_why(strategy, name, reason):
    # the compatibility table refuses first (lightning_optx.compatibility); the callback's own check is a second line
    with pytest.raises(ValueError, match=rf"^DifferentialPrivacy cannot be combined with strategy '{name}'") as err:
        fit_single(strategy())
    assert reason in str(err.value)
    assert any(frame.name == "setup" for frame in err.traceback)


@pytest.mark.parametrize("strategy", [lambda: LocalSGDStrategy(period=2, warmup_steps=1),
                                      *[functools.partial(CompressedDDPStrategy, c) for c in ("powersgd", "fp16")]])
def test_the_callbacks_own_check_refuses_too(strategy):
    with pytest.raises(ValueError, match=r"^DifferentialPrivacy cannot run under strategy '\w+' \(\w+\): "):
        checks.data_parallel_mode(strategy())


def test_node_replicas_are_refused():
    strategy = LocalSGDStrategy(period=2, replica_size=2)
    strategy.replica_size = 2  # what the strategy resolves when it builds its groups (2 processes per replica)
    with pytest.raises(ValueError, match=r"strategy 'local_sgd' \(LocalSGDStrategy\): replica_size=2: a replica of 2 "
                                         r"processes keeps its processes identical"):
        checks.data_parallel_mode(strategy)
    diloco = DiLoCoStrategy(inner_steps=2, replica_size=2)
    diloco.replica_size = 2
    with pytest.raises(ValueError, match=r"strategy 'diloco' \(DiLoCoStrategy\): replica_size=2"):
        checks.data_parallel_mode(diloco)


def test_strategy_names_and_modes():
    assert checks.data_parallel_mode(LocalSGDStrategy(period=2)) == "replicas"
    assert checks.data_parallel_mode(DiLoCoStrategy(inner_steps=2)) == "replicas"
    overlapped = DiLoCoStrategy(inner_steps=2, overlap=True, compressor="powersgd")
    assert checks.strategy_name(overlapped) == "diloco_x" and checks.data_parallel_mode(overlapped) == "replicas"
    assert checks.strategy_name(CompressedDDPStrategy("bf16")) == "ddp_bf16"


# ---------------------------------------------------------------- 2 replicas


@pytest.mark.multiprocess
def test_each_replica_applies_its_own_clipped_mean_and_no_gradient_is_all_reduced():
    """noise 0, Local SGD with period 3 over 8 steps: at every step each rank applies the clipped sum of its OWN
    Poisson batch over its expected batch (nothing of the other rank's), the two batches are disjoint, the DP optimizer
    is Opacus' single-process one, and the only collectives are the parameter averages at the syncs."""
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=CLIP, accountant="rdp", seed=5)
    ranks = run_job(replica_job(cb, LocalSGDStrategy(period=3)), world_size=2)
    rec0, rec1 = ranks[0].inspected["records"], ranks[1].inspected["records"]
    assert len(rec0) == len(rec1) == 8
    for r in ranks:
        assert "DPOptimizer" in r.inspected["optimizer"] and "DistributedDPOptimizer" not in r.inspected["optimizer"]
        assert r.inspected["expected"] / 2 == BATCH and r.inspected["sample_rate"] == BATCH / (DATA / 2)
        syncs = {rec["step"] for rec in r.inspected["ledger"] if rec["tag"] == "params"}
        assert {rec["tag"] for rec in r.inspected["ledger"]} <= {"params", "buffers"}
        assert syncs == {2, 5, 7}  # the ledger counts steps from 0: after the 3rd and 6th step, and at the end of fit
    seen: set[tuple[float, ...]] = set()
    for a, b in zip(rec0, rec1):
        rows = [{tuple(x.tolist()) for x in rec["batch"][0]} for rec in (a, b)]
        assert not rows[0] & rows[1]  # disjoint shards
        seen |= rows[0] | rows[1]
        for rec in (a, b):
            grads = per_sample_gradients(rec["before"], *rec["batch"])
            if grads:
                expected = {n: t / BATCH for n, t in clipped_sum(grads, CLIP).items()}
                for n in expected:
                    torch.testing.assert_close(rec["applied"][n], expected[n], atol=1e-6, rtol=1e-5, msg=n)
        in_step = a["step"] % 3 == 0
        same = all(torch.equal(a["after"][n], b["after"][n]) for n in a["after"])
        assert same == in_step, f"step {a['step']}: ranks identical={same}, expected {in_step}"
    assert len(seen) > DATA / 2  # both shards were sampled


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", [3, pytest.param(None, marks=pytest.mark.slow)], ids=["reproducible", "secret"])
def test_replicas_draw_independent_full_noise_and_log_one_replicas_epsilon(seed):
    """DiLoCo, noise 1: every replica adds N(0, (sigma C)^2) per coordinate to its own clipped sum, independently of
    the other replica (also with a seed); the logged epsilon is one replica's, from its sample rate, noise and
    steps; the DP state is the same on both ranks (rank 0's copy in the checkpoint is right)."""
    delta = 1e-5
    cb = DifferentialPrivacy(noise_multiplier=SIGMA, max_grad_norm=CLIP, accountant="rdp", target_delta=delta,
                             seed=seed)
    ranks = run_job(replica_job(cb, DiLoCoStrategy(inner_steps=4)), world_size=2)
    noises = [torch.stack([own_noise(rec, BATCH) for rec in r.inspected["records"]]) for r in ranks]
    assert noises[0].shape == (8, sum(t.numel() for t in ranks[0].params.values()))
    for noise in noises:  # full noise on each replica: std sigma C per coordinate (8 x 484 draws)
        assert 0.9 < float(noise.std() / (SIGMA * CLIP)) < 1.1
    correlation = torch.corrcoef(torch.stack([noises[0].flatten(), noises[1].flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.1  # independent draws (identical ones would give 1)
    assert not torch.equal(noises[0][0], noises[1][0])
    expected = replica_epsilon(SIGMA, 8, delta)
    for r in ranks:
        assert r.inspected["epsilon"] == pytest.approx(expected, rel=1e-12)
        assert r.series("dp/epsilon")[-1] == pytest.approx(expected, rel=1e-6)  # logged as float32
        assert r.inspected["state"]["history"] == [(SIGMA, BATCH / (DATA / 2), 8)]
    assert_tree_equal(ranks[0].inspected["state"], ranks[1].inspected["state"], "DP state of rank 0 vs rank 1")


@pytest.mark.slow  # the matrix covers DP x local strategies too (tests/integration/test_matrix.py, slow)
@pytest.mark.multiprocess
@pytest.mark.timeout(600)  # three 2-process fits; each has the runner's own timeout, so a hang still fails
def test_local_sgd_resume_mid_round_is_bit_exact(tmp_path):
    """Period 3, 32 examples, 4 steps per epoch: the checkpoint after epoch 1 falls mid-round (last sync at step 3)."""
    cb = DifferentialPrivacy(noise_multiplier=SIGMA, accountant="rdp", seed=3)
    job = TrainJob(module=functools.partial(MomentumDPModule, model="mlp", batch_size=BATCH, data_size=32),
                   callbacks=[cb], strategy=LocalSGDStrategy(period=3))
    _, resumed = check_resume_equivalence(job, total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert resumed[0].callback_states[DP_KEY]["history"] == [(SIGMA, 0.25, 8)]
    assert resumed[1].optimizer_states[0]["state"]  # momentum buffers were restored per rank


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", [
    lambda: DiLoCoStrategy(inner_steps=3),
    lambda: DiLoCoStrategy(inner_steps=3, overlap=True, compressor="powersgd", compressor_options={"rank": 2}),
], ids=["diloco", "diloco_x"])
def test_diloco_resume_mid_round_is_bit_exact(tmp_path, strategy):
    cb = DifferentialPrivacy(noise_multiplier=SIGMA, accountant="rdp", seed=3)
    job = TrainJob(module=functools.partial(MomentumDPModule, model="mlp", batch_size=BATCH), callbacks=[cb],
                   strategy=strategy())
    _, resumed = check_resume_equivalence(job, total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert resumed[1].callback_states[DP_KEY]["history"] == [(SIGMA, 0.125, 16)]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secret_mode_resume_draws_fresh_randomness_and_continues_the_accountant(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers.resume import StopAfterEpoch

    def job(**kwargs: Any) -> TrainJob:
        cb = DifferentialPrivacy(noise_multiplier=SIGMA, accountant="rdp")
        return TrainJob(module=functools.partial(DPModule, model="mlp", batch_size=BATCH), callbacks=[cb],
                        strategy=LocalSGDStrategy(period=3), trainer_kwargs={"max_epochs": 2}, **kwargs)

    first = job()
    first.callbacks = [*first.callbacks, ModelCheckpoint(dirpath=str(tmp_path), filename="split",
                                                         every_n_train_steps=8), StopAfterEpoch(1)]
    first.trainer_kwargs = {**first.trainer_kwargs, "enable_checkpointing": True}
    run_job(first, world_size=2)
    ckpt = str(tmp_path / "split.ckpt")
    a = run_job(job(ckpt_path=ckpt), world_size=2)
    b = run_job(job(ckpt_path=ckpt), world_size=2)
    for run in (a, b):
        assert [r.callback_states[DP_KEY]["history"] for r in run] == [[(SIGMA, 0.125, 16)]] * 2
        assert_tree_equal(run[0].params, run[1].params, "consensus after the final sync")
    assert not torch.equal(a[0].params["net.fc1.weight"], b[0].params["net.fc1.weight"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_node_replicas_are_refused_end_to_end():
    cb = DifferentialPrivacy(noise_multiplier=SIGMA, accountant="rdp")
    job = TrainJob(module=functools.partial(DPModule, model="mlp", batch_size=BATCH), callbacks=[cb, NoStep()],
                   strategy=LocalSGDStrategy(period=3, replica_size=2), trainer_kwargs={"max_steps": 2})
    with pytest.raises(RuntimeError, match=r"DifferentialPrivacy cannot run under strategy 'local_sgd' "
                                           r"\(LocalSGDStrategy\): replica_size=2"):
        run_job(job, world_size=2)


def test_subclasses_of_our_strategies_are_judged_as_the_compatibility_table_judges_them():
    from lightning_optx.compatibility import refusal

    class MyLocal(LocalSGDStrategy):
        strategy_name = "my_local"

    class MySign(CompressedDDPStrategy):
        strategy_name = "my_sign"

    assert refusal("DifferentialPrivacy", MyLocal(period=2)) is None
    assert checks.data_parallel_mode(MyLocal(period=2)) == "replicas"
    assert refusal("DifferentialPrivacy", MySign("sign")) is not None
    with pytest.raises(ValueError, match=r"strategy 'ddp_sign' \(MySign\): a compressed, error-fed"):
        checks.data_parallel_mode(MySign("sign"))
