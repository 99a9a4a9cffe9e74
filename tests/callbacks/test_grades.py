"""GradES in a real Trainer: freezing saves work, grace period, stop, DDP re-wrap, resume, MiniLM."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from torch import nn

from lightning_optx import GradES
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule
from tests.helpers.recorder import StepRecorder, recorded_steps

TRANSFORMER = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1)


def grades(**kwargs):
    return GradES(**{"tau": 0.5, "tau_mode": "relative", "grace_fraction": 0.3, **kwargs})


def grades_facts(trainer, module):
    cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
    return {"targets": cb.target_names, "grace": cb.grace_steps,
            "trainable": {n for n, p in module.named_parameters() if p.requires_grad}}


def job(callbacks, module=TRANSFORMER, epochs=3, inspect=grades_facts, **trainer_kwargs):
    return TrainJob(module=module, callbacks=callbacks, trainer_kwargs={"max_epochs": epochs, **trainer_kwargs},
                    inspect=inspect)


def frozen_of(result, cb):
    return result.callback_states[cb.state_key]["frozen"]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`tau` must be a positive float, got tau=-1"):
        GradES(tau=-1)
    with pytest.raises(ValueError, match=r"`targets` must be 'auto' or a list of regular expressions"):
        GradES(tau=1e-3, targets="fc1")


def test_no_target_found_is_an_error_at_setup():
    mlp = functools.partial(TinyModule, model="mlp")
    with pytest.raises(ValueError, match=r"GradES found no target matrix with targets=\['nothing'\]"):
        run_job(job([GradES(tau=1e-3, targets=["nothing"])], module=mlp))


def test_auto_targets_of_separate_and_fused_projections():
    [sep] = run_job(job([grades()], epochs=1))
    assert len(sep.inspected["targets"]) == 12  # 2 blocks x (q, k, v, o, fc1, fc2)
    [mha] = run_job(job([grades()], module=functools.partial(TinyModule, model="mha_transformer"), epochs=1))
    assert sorted(n.split(".", 4)[-1] for n in mha.inspected["targets"]) == sorted(
        ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"] * 2)


def test_frozen_matrices_get_no_gradient_and_never_move_again():
    cb = grades()
    [r] = run_job(job([cb, StepRecorder()], inspect=lambda t, m: (recorded_steps(t, m), grades_facts(t, m))))
    steps, facts = r.inspected
    frozen = frozen_of(r, cb)
    assert frozen and min(frozen.values()) >= facts["grace"] == 8
    records = {rec["step"]: rec["params"] for rec in steps}
    for name, step in frozen.items():
        # AdamW with weight decay and momentum would keep moving it: a frozen matrix stays bit for bit
        assert all(torch.equal(records[s][name], records[step][name]) for s in records if s >= step), name
    assert facts["trainable"].isdisjoint(frozen)
    assert r.series("grades/frozen_fraction")[-1] == pytest.approx(len(frozen) / 12)


def test_stops_when_every_target_is_frozen():
    cb = GradES(tau=1e3, grace_fraction=0.25)  # absolute tau far above every metric
    [r] = run_job(job([cb]))
    assert set(frozen_of(r, cb).values()) == {6}
    assert r.global_step == 6  # 24 planned steps; stopped right after the grace period


def test_weight_delta_metric_and_remove_from_optimizer():
    cb = grades(metric="weight_delta", tau=0.3, remove_from_optimizer=True)
    [r] = run_job(job([cb]))
    frozen = frozen_of(r, cb)
    assert frozen
    n_params = sum(len(g["params"]) for g in r.optimizer_states[0]["param_groups"])
    assert n_params == len(r.params) - len(frozen)


def test_regex_targets_on_a_plain_mlp():
    cb = GradES(tau=0.9, tau_mode="relative", grace_fraction=0.1, targets=[r"fc\d\.weight$"])
    [r] = run_job(job([cb], module=functools.partial(TinyModule, model="mlp")))
    assert r.inspected["targets"] == ["net.fc1.weight", "net.fc2.weight"]
    assert set(frozen_of(r, cb)) <= {"net.fc1.weight", "net.fc2.weight"}


def test_gradient_accumulation_measures_once_per_optimizer_step():
    cb = grades()
    [r] = run_job(job([cb], accumulate_grad_batches=2))
    assert r.global_step <= 12
    assert len(r.series("grades/frozen_fraction")) == r.global_step


def test_bf16_mixed():
    cb = grades()
    [r] = run_job(job([cb], precision="bf16-mixed"))
    assert frozen_of(r, cb)
    assert all(torch.isfinite(p).all() for p in r.params.values())


@pytest.mark.parametrize("metric", ["grad", "weight_delta"])
def test_resume_is_bit_exact_with_matrices_frozen_before_the_split(tmp_path, metric):
    # every epoch must run in full (no stop when all are frozen); some matrices freeze by the split at 8, some after
    cb = grades(metric=metric, tau=0.5 if metric == "grad" else 0.3, stop_when_all_frozen=False)
    straight, _ = check_resume_equivalence(job([cb]), total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    frozen = frozen_of(straight[0], cb)
    assert min(frozen.values()) <= 8 < max(frozen.values())


@pytest.mark.multiprocess
def test_ddp_freeze_mid_run():
    """Plain find_unused_parameters=False DDP: freezing mid-run must not break the reducer (re-wrap)."""
    cb = grades()
    ranks = run_job(job([cb], strategy="ddp"), world_size=2)
    assert frozen_of(ranks[0], cb) == frozen_of(ranks[1], cb)
    assert len(frozen_of(ranks[0], cb)) >= 2
    assert ranks[0].global_step == ranks[1].global_step
    assert_ranks_identical(ranks)


@pytest.mark.multiprocess
def test_ddp_stop_is_taken_by_every_rank():
    cb = GradES(tau=1e3, grace_fraction=0.25)
    ranks = run_job(job([cb]), world_size=2)
    assert ranks[0].global_step == ranks[1].global_step == 3  # 12 planned steps on 2 ranks
    assert_ranks_identical(ranks)


@pytest.mark.slow  # default run: 2-rank GradES resumes under diloco and ddp_powersgd in test_matrix.py
@pytest.mark.multiprocess
def test_ddp_resume_is_bit_exact(tmp_path):
    cb = grades()
    straight, _ = check_resume_equivalence(job([cb], epochs=4), total_epochs=4, split_epoch=2, tmp_dir=str(tmp_path),
                                           world_size=2)
    assert frozen_of(straight[0], cb)


def test_lightning_cli_builds_grades_with_regex_targets():
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(TinyModule, run=False, save_config_callback=None, trainer_defaults={"logger": False},
                       args=["--trainer.callbacks+=lightning_optx.GradES", "--trainer.callbacks.tau=0.2",
                             "--trainer.callbacks.tau_mode=relative", '--trainer.callbacks.targets=["fc1"]'])
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, GradES)]
    assert (cb.tau, cb.tau_mode, cb.targets) == (0.2, "relative", ["fc1"])


def test_compile_freeze_events_is_validated():
    with pytest.raises(ValueError, match=r"`compile_freeze_events` must be an integer >= 1, got "
                                         r"compile_freeze_events=0"):
        GradES(tau=1e-3, compile_freeze_events=0)


class ConstantGradient(TinyModule):
    """One 256 x 256 matrix whose gradient is exactly 8 everywhere (all-ones inputs, loss = sum of outputs)."""

    def __init__(self, **kwargs):
        super().__init__(model="mlp", optimizer="plain_sgd", lr=1e-6, **kwargs)
        self.net = torch.nn.Sequential()
        self.net.fc1 = torch.nn.Linear(256, 256, bias=False)

    def training_step(self, batch, batch_idx):
        return self.net.fc1(torch.ones(8, 256, dtype=self.net.fc1.weight.dtype)).sum()


def test_16_true_norms_do_not_overflow():
    """fp16 weights and gradients: the L1 norm (524288) is past fp16's range; the metric must stay 8."""
    cb = GradES(tau=1.0, targets=[r"fc1\.weight$"], grace_fraction=0.5)
    [r] = run_job(job([cb], module=ConstantGradient, epochs=1, precision="16-true"))
    state = r.callback_states[cb.state_key]
    assert state["last_metrics"] == {"net.fc1.weight": 8.0}
    assert state["reference"] == {"net.fc1.weight": 8.0}
    assert not state["frozen"] and state["measured_steps"] == r.global_step == 8


def test_64_true_float64_gradients_are_measured():
    cb = GradES(tau=1.0, targets=[r"fc1\.weight$"], grace_fraction=0.5)
    [r] = run_job(job([cb], module=ConstantGradient, epochs=1, precision="64-true"))
    state = r.callback_states[cb.state_key]
    assert all(p.dtype == torch.float64 for p in r.params.values())
    assert state["last_metrics"] == {"net.fc1.weight": 8.0}
    assert state["measured_steps"] == r.global_step == 8


class Projections(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))

    def forward(self, x, scales):
        return sum(layer(x).pow(2).mean() * scales[k] for k, layer in enumerate(self.proj))


class ScaledProjections(pl.LightningModule):
    """Three matrices; matrix k's gradient is scaled down to ~0 from the batch at ``global_step`` SMALL_FROM[k]."""

    SMALL_FROM = (0, 10, 18)  # small gradients measured from rounds 1, 11 and 19

    def __init__(self, compile_how: str, backend) -> None:
        super().__init__()
        self.net = Projections(len(self.SMALL_FROM))
        self.compile_how, self.backend = compile_how, backend

    def configure_model(self) -> None:
        if self.compile_how == "in_place":
            self.net.compile(backend=self.backend)
        else:
            self.net = torch.compile(self.net, backend=self.backend)

    def training_step(self, batch, batch_idx):
        scales = torch.tensor([1e-9 if self.global_step >= s else 1.0 for s in self.SMALL_FROM])
        return self.net(batch[0], scales)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        data = torch.randn(22, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=1)


@pytest.mark.parametrize("compile_how", ["wrapped", "in_place"])
def test_compiled_model_freezes_at_most_compile_freeze_events_times(compile_how):
    """planned 22, grace 6: decisions every ceil(16 / 4) = 4 rounds at 6, 10, 14, 18 (22 would be a fifth).

    Matrix 0 is small from round 1 (frozen at 6), matrix 1 from 11 (frozen at 14), matrix 2 from 19: no
    decision is left for it. ``module.compile()`` (in place) is detected as ``torch.compile(module)`` is.
    """
    pytest.importorskip("torch._dynamo")
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    cb = GradES(tau=1e-6, grace_fraction=0.25, targets=[r"proj\.\d\.weight$"], stop_when_all_frozen=False)
    trainer = pl.Trainer(max_steps=22, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(ScaledProjections(compile_how, counter))
    assert (cb.grace_steps, cb.freeze_interval) == (6, 4)
    assert [r for r in range(1, 23) if cb._may_freeze_at(r)] == [6, 10, 14, 18]
    frozen = {n.replace("_orig_mod.", ""): r for n, r in cb.frozen.items()}
    assert frozen == {"net.proj.0.weight": 6, "net.proj.1.weight": 14}
    assert counter.frame_count <= 1 + 2  # the first compile and one per freeze event



class RestoreAfterSetup(SingleDeviceStrategy):
    """Restores the checkpoint after ``on_fit_start``, as FSDP and DeepSpeed do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


StrategyRegistry.register("restore_after_setup", RestoreAfterSetup, override=True, device=torch.device("cpu"))


def test_resume_under_a_strategy_that_restores_after_setup(tmp_path):
    """FSDP / DeepSpeed restore the callbacks' state after ``on_fit_start``: the frozen matrices must still
    leave the optimizer before its (smaller) saved state is loaded."""
    cb = grades(remove_from_optimizer=True, stop_when_all_frozen=False)
    straight, _ = check_resume_equivalence(job([cb], strategy="restore_after_setup"), total_epochs=3,
                                           split_epoch=1, tmp_dir=str(tmp_path))
    frozen = frozen_of(straight[0], cb)
    assert min(frozen.values()) <= 8 < max(frozen.values())
