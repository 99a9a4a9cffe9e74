"""GradientSurgery in a real Trainer: contract errors, equivalences, accumulation, DDP, resume."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_optx import GradientSurgery
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job
from tests.helpers.models import MultiTaskModule

N_SHARED = 8 * 16 + 16 + 16 * 16 + 16
N_HEAD = 16 + 1


class FirstStepGrads(Callback):
    """Keeps the gradients the optimizer is about to apply at the first step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_grads(trainer, module):
    return next(c for c in trainer.callbacks if isinstance(c, FirstStepGrads)).grads


def job(callbacks, module=None, epochs=2, **trainer_kwargs):
    return TrainJob(module=module or functools.partial(MultiTaskModule), callbacks=callbacks,
                    trainer_kwargs={"max_epochs": epochs, **trainer_kwargs})


# ---------------------------------------------------------------- contract errors


def test_unknown_method():
    with pytest.raises(ValueError, match=r"`method` must be one of .*got method='magic'"):
        GradientSurgery("magic")


class NoTaskLosses(MultiTaskModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


class VectorTaskLoss(MultiTaskModule):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["task_losses"]["task0"] = out["task_losses"]["task0"].expand(3)
        return out


class OneTask(MultiTaskModule):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["task_losses"] = {"task0": out["task_losses"]["task0"]}
        return out


class Manual(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(("module", "kwargs", "pattern"), [
    (NoTaskLosses, {}, r"training_step must return a dict with 'loss' and 'task_losses'.*got Tensor"),
    (VectorTaskLoss, {}, r"task loss 'task0' must be a scalar tensor, got \(3,\)"),
    (OneTask, {}, r"must be a dict of at least 2 task losses, got 1"),
    (MultiTaskModule, {"shared": ["nothing"]}, r"found no shared parameter.*`shared` matched none"),
    (Manual, {}, r"needs automatic optimization"),
])
def test_contract_errors_name_what_is_wrong(module, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        run_job(job([GradientSurgery("pcgrad", **kwargs)], module=module, epochs=1))


# ---------------------------------------------------------------- what the optimizer receives


def test_sum_equals_plain_training():
    [surgery] = run_job(job([GradientSurgery("sum")]))
    [plain] = run_job(job([]))
    for n, p in plain.params.items():
        torch.testing.assert_close(surgery.params[n], p, rtol=1e-6, atol=1e-7)


def test_mean_gives_the_mean_to_shared_and_own_gradients_to_heads():
    [r] = run_job(TrainJob(module=MultiTaskModule, callbacks=[GradientSurgery("mean"), FirstStepGrads()],
                           trainer_kwargs={"max_steps": 1}, inspect=first_grads))
    torch.manual_seed(7)
    import lightning.pytorch as pl

    pl.seed_everything(7, verbose=False)
    model = MultiTaskModule()
    x, y = next(iter(model.train_dataloader()))
    losses = model.task_losses(x, y)
    shared = list(model.trunk.parameters())
    mean_grads = torch.autograd.grad(torch.stack(list(losses.values())).mean(), shared, retain_graph=True)
    for (n, _), g in zip(model.trunk.named_parameters(), mean_grads):
        torch.testing.assert_close(r.inspected[f"trunk.{n}"], g, rtol=1e-6, atol=1e-7)
    for t in ("task0", "task1"):
        own = torch.autograd.grad(losses[t], list(model.heads[t].parameters()), retain_graph=True)
        for (n, _), g in zip(model.heads[t].named_parameters(), own):
            torch.testing.assert_close(r.inspected[f"heads.{t}.{n}"], g, rtol=1e-6, atol=1e-7)


def test_pcgrad_changes_training_and_logs_conflicts():
    [pc] = run_job(job([GradientSurgery("pcgrad")]))
    [plain] = run_job(job([GradientSurgery("sum")]))
    assert not torch.allclose(pc.params["trunk.0.weight"], plain.params["trunk.0.weight"])
    rates = pc.series("surgery/conflict_rate")
    assert len(rates) == pc.global_step and max(rates) == 1.0  # the two targets are built to conflict
    assert len(pc.series("surgery/grad_norm/task1")) == pc.global_step


def test_accumulation_does_surgery_on_accumulated_task_gradients():
    accumulated = functools.partial(MultiTaskModule, batch_size=4)
    [acc] = run_job(job([GradientSurgery("pcgrad")], module=accumulated, accumulate_grad_batches=2))
    [full] = run_job(job([GradientSurgery("pcgrad")]))
    assert acc.global_step == full.global_step == 16
    for n, p in full.params.items():
        torch.testing.assert_close(acc.params[n], p, rtol=1e-5, atol=1e-6)


def test_bf16_mixed():
    [r] = run_job(job([GradientSurgery("cagrad")], precision="bf16-mixed"))
    assert all(torch.isfinite(p).all() for p in r.params.values())


@pytest.mark.parametrize("method", ["sam_gs", "gcond", "pcgrad"])
def test_resume_is_bit_exact(tmp_path, method):
    module = functools.partial(MultiTaskModule, optimizer="adamw", lr=1e-2)
    check_resume_equivalence(job([GradientSurgery(method)], module=module), total_epochs=3, split_epoch=1,
                             tmp_dir=str(tmp_path))


# ---------------------------------------------------------------- 2-rank DDP


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["pcgrad", pytest.param("cagrad", marks=pytest.mark.slow)])
def test_ddp_equals_surgery_on_the_global_batch(method):
    sharded = functools.partial(MultiTaskModule, batch_size=4, shard_in_order=True)
    ranks = run_job(job([GradientSurgery(method)], module=sharded, use_distributed_sampler=False), world_size=2)
    [single] = run_job(job([GradientSurgery(method)]))
    assert_ranks_identical(ranks)
    for n, p in single.params.items():
        torch.testing.assert_close(ranks[0].params[n], p, rtol=1e-5, atol=1e-6)
    # each task's shared gradient plus every head's, in fp32, once per step
    assert ranks[0].series("surgery/bytes_per_step")[-1] == 4 * (2 * N_SHARED + 2 * N_HEAD)


@pytest.mark.slow  # default run: 2-rank surgery resumes under diloco_x, ddp_topk in test_matrix.py
@pytest.mark.multiprocess
def test_ddp_resume_with_stateful_method(tmp_path):
    module = functools.partial(MultiTaskModule, optimizer="adamw", lr=1e-2)
    straight, _ = check_resume_equivalence(job([GradientSurgery("sam_gs")], module=module), total_epochs=3,
                                           split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert_ranks_identical(straight)
    assert_ranks_identical(straight, "callback_states")


# ---------------------------------------------------------------- dynamic graphs, skipped batches, CLI


class LateBranch(MultiTaskModule):
    """From step 1 on, a shared layer ``late`` (both tasks) and an extra head ``late_head`` (task0 only) join
    the graph: a mixture-of-experts expert or a conditional head first reached after the first batch."""

    def __init__(self, **kwargs):
        super().__init__(optimizer="adamw", lr=1e-2, **kwargs)
        self.late = torch.nn.Linear(16, 16)
        self.late_head = torch.nn.Linear(16, 1)

    def task_losses(self, x, y):
        h = self.trunk(x)
        if self.trainer.global_step >= 1:
            h = h + torch.tanh(self.late(h))
        out = {name: torch.nn.functional.mse_loss(head(h).squeeze(-1), y[:, t])
               for t, (name, head) in enumerate(self.heads.items())}
        if self.trainer.global_step >= 1:
            out["task0"] = out["task0"] + self.late_head(h).pow(2).mean()
        return out


def initial_params(module_factory):
    import lightning.pytorch as pl

    pl.seed_everything(7, verbose=False)
    return {n: p.detach().clone() for n, p in module_factory().named_parameters()}


@pytest.mark.parametrize("method", ["gcond", "pcgrad"])
def test_branch_first_reached_later_is_trained(method):
    with pytest.warns(UserWarning, match=r"no task loss reached the trainable parameters \['late.weight', "
                                         r"'late.bias', 'late_head.weight', 'late_head.bias'\] at the first step"):
        [r] = run_job(job([GradientSurgery(method)], module=LateBranch, epochs=1))
    init = initial_params(LateBranch)
    for name in ("late.weight", "late.bias", "late_head.weight", "late_head.bias"):
        assert not torch.equal(r.params[name], init[name]), name
    shared = r.callback_states[next(k for k in r.callback_states if "GradientSurgery" in k)]["shared"]
    assert shared[-2:] == ["late.weight", "late.bias"]  # appended to the layout when first reached by 2 tasks
    assert "late_head.weight" not in shared


def test_late_branch_resume_is_bit_exact(tmp_path):
    check_resume_equivalence(job([GradientSurgery("gcond")], module=LateBranch), total_epochs=2, split_epoch=1,
                             tmp_dir=str(tmp_path))


def test_late_branch_with_sum_equals_plain_training():
    """Under ``sum`` the callback must give what plain backward gives, whatever each step's graph reaches."""
    [surgery] = run_job(job([GradientSurgery("sum")], module=LateBranch, epochs=1))
    [plain] = run_job(job([], module=LateBranch, epochs=1))
    for n, p in plain.params.items():
        torch.testing.assert_close(surgery.params[n], p, rtol=1e-5, atol=1e-6)


class SkipsOddBatches(MultiTaskModule):
    def training_step(self, batch, batch_idx):
        return None if batch_idx % 3 == 1 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_step_returning_none_skips_the_batch(accumulate):
    """As without the callback: no backward for a skipped batch (under accumulation the micro-batches before
    it are still applied); checked against plain training with ``sum``."""
    module = functools.partial(SkipsOddBatches, batch_size=4)
    [surgery] = run_job(job([GradientSurgery("sum")], module=module, epochs=1, accumulate_grad_batches=accumulate))
    [plain] = run_job(job([], module=module, epochs=1, accumulate_grad_batches=accumulate))
    assert surgery.global_step == plain.global_step
    for n, p in plain.params.items():
        torch.testing.assert_close(surgery.params[n], p, rtol=1e-6, atol=1e-7)
    [pc] = run_job(job([GradientSurgery("pcgrad")], module=module, epochs=1))
    assert all(torch.isfinite(p).all() for p in pc.params.values())


def test_method_options_dict_and_keywords():
    assert GradientSurgery("cagrad", method_options={"c": 0.3}).aggregator.options["c"] == 0.3
    assert GradientSurgery("cagrad", method_options={"c": 0.3}, rescale=2).aggregator.options == {"c": 0.3,
                                                                                                  "rescale": 2}
    with pytest.raises(ValueError, match=r"Options \['c'\] are given both in `method_options` and as keywords"):
        GradientSurgery("cagrad", method_options={"c": 0.3}, c=0.2)
    with pytest.raises(ValueError, match=r"`method_options` must be a dict .* got method_options=0.3"):
        GradientSurgery("cagrad", method_options=0.3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Options \['gamma'\] are not accepted by method='cagrad'"):
        GradientSurgery("cagrad", method_options={"gamma": 0.3})


def test_lightning_cli_yaml_sets_method_options(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 2\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_optx.GradientSurgery\n"
        "      init_args:\n"
        "        method: gcond\n"
        "        method_options: {momentum_beta: 0.5, conflict_thresholds: [-0.9, -0.4, 0.0]}\n"
    )
    cli = LightningCLI(MultiTaskModule, args=["fit", f"--config={config}"], save_config_callback=None)
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, GradientSurgery)]
    assert cb.method == "gcond"
    assert cb.aggregator.options["momentum_beta"] == 0.5
    assert tuple(cb.aggregator.options["conflict_thresholds"]) == (-0.9, -0.4, 0.0)
    assert cli.trainer.global_step == 2 and cb.aggregator.state_dict()["state"]["step"] == 2


class SharedMidAccumulation(MultiTaskModule):
    """``late`` is used by task0 alone at batch 2 (first micro-batch of step 1: task-specific), then by both
    tasks from batch 3 on (second micro-batch of the same step: shared)."""

    def __init__(self):
        super().__init__(batch_size=4)
        self.late = torch.nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def task_losses(self, x, y):
        out = super().task_losses(x, y)
        h = self.trunk(x)
        if self._batch_idx >= 2:
            out["task0"] = out["task0"] + self.late(h).pow(2).mean()
        if self._batch_idx >= 3:
            out["task1"] = out["task1"] + 0.5 * self.late(h).pow(2).mean()
        return out


def test_parameter_becoming_shared_mid_accumulation_keeps_earlier_micro_batches():
    [surgery] = run_job(job([GradientSurgery("sum")], module=SharedMidAccumulation, epochs=1,
                            accumulate_grad_batches=2))
    [plain] = run_job(job([], module=SharedMidAccumulation, epochs=1, accumulate_grad_batches=2))
    for n, p in plain.params.items():
        torch.testing.assert_close(surgery.params[n], p, rtol=1e-5, atol=1e-6)
    shared = surgery.callback_states[next(k for k in surgery.callback_states if "GradientSurgery" in k)]["shared"]
    assert shared[-2:] == ["late.weight", "late.bias"]


class RankDependentBranch(MultiTaskModule):
    """Only rank 1 reaches ``late`` (shared by both tasks) and ``late_head`` (task0): the ranks must still agree
    on the layout and all-reduce the same tensors."""

    def __init__(self):
        super().__init__(batch_size=4, shard_in_order=True)
        self.late = torch.nn.Linear(16, 16)
        self.late_head = torch.nn.Linear(16, 1)

    def task_losses(self, x, y):
        h = self.trunk(x)
        if self.trainer.global_rank == 1:
            h = h + torch.tanh(self.late(h))
        out = {name: torch.nn.functional.mse_loss(head(h).squeeze(-1), y[:, t])
               for t, (name, head) in enumerate(self.heads.items())}
        if self.trainer.global_rank == 1:
            out["task0"] = out["task0"] + self.late_head(h).pow(2).mean()
        return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_ranks_agree_on_a_branch_one_rank_reaches():
    ranks = run_job(job([GradientSurgery("gcond")], module=RankDependentBranch, epochs=1,
                        use_distributed_sampler=False), world_size=2)
    assert_ranks_identical(ranks)
    assert_ranks_identical(ranks, "callback_states")
    init = initial_params(RankDependentBranch)
    for name in ("late.weight", "late_head.weight"):
        assert not torch.equal(ranks[0].params[name], init[name]), name


# ---------------------------------------------------------------- review fixes: compile, MoE, unfreezing, scaler


class LateCompiledBranch(MultiTaskModule):
    """A compiled shared layer reached by the last task only at step 0, by both tasks from step 1: its backward
    is built by a ``retain_graph=False`` call, then run with ``retain_graph=True``."""

    def __init__(self, backend: str = "inductor"):
        super().__init__()
        self.late = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()), backend=backend)

    def task_losses(self, x, y):
        h = self.trunk(x)
        z = self.late(h)
        hs = {"task0": h if self.trainer.global_step == 0 else h + z, "task1": h + z}
        return {n: torch.nn.functional.mse_loss(head(hs[n]).squeeze(-1), y[:, t])
                for t, (n, head) in enumerate(self.heads.items())}


def test_inductor_compiled_branch_first_reached_by_the_last_task():
    import torch._functorch.config as functorch_config

    before = functorch_config.donated_buffer
    torch._dynamo.reset()
    [r] = run_job(job([GradientSurgery("pcgrad")], module=LateCompiledBranch, epochs=1))
    init = initial_params(LateCompiledBranch)
    assert not torch.equal(r.params["late._orig_mod.0.weight"], init["late._orig_mod.0.weight"])
    assert functorch_config.donated_buffer == before  # restored after the fit


class MoE(MultiTaskModule):
    """Top-1 routing in the shared trunk: on every step one expert is reached by no task."""

    def __init__(self):
        super().__init__(optimizer="adamw", lr=1e-2)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])

    def task_losses(self, x, y):
        h = self.trunk(x)
        h = h + torch.tanh(self.experts[int(self.trainer.global_step % 3 == 0)](h))
        return {n: torch.nn.functional.mse_loss(head(h).squeeze(-1), y[:, t])
                for t, (n, head) in enumerate(self.heads.items())}


def test_moe_expert_no_task_reached_keeps_grad_none_and_sum_equals_plain_training():
    [s] = run_job(job([GradientSurgery("sum")], module=MoE, epochs=1))
    [p] = run_job(job([], module=MoE, epochs=1))
    for name, value in p.params.items():  # AdamW moves a zero .grad (weight decay, momentum), not a None one
        assert torch.allclose(s.params[name], value, rtol=1e-5, atol=1e-5 * float(value.norm())), name


class FrozenTrunk(MultiTaskModule):
    def __init__(self):
        super().__init__(optimizer="sgd", lr=1e-2)
        self.trunk.requires_grad_(False)


class SetRequiresGradAtStep2(Callback):
    def __init__(self, part: str, value: bool) -> None:
        self.part, self.value = part, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            getattr(pl_module, self.part).requires_grad_(self.value)


def test_trunk_unfrozen_later_trains_and_sum_equals_plain_training():
    """BackboneFinetuning's idiom: nothing is shared at first (gradients pass through), the trunk joins later."""
    [s] = run_job(job([GradientSurgery("sum"), SetRequiresGradAtStep2("trunk", True)], module=FrozenTrunk, epochs=1))
    [p] = run_job(job([SetRequiresGradAtStep2("trunk", True)], module=FrozenTrunk, epochs=1))
    init = initial_params(FrozenTrunk)
    assert not torch.equal(s.params["trunk.0.weight"], init["trunk.0.weight"])
    for name, value in p.params.items():
        assert torch.allclose(s.params[name], value, rtol=1e-5, atol=1e-6), name


def test_heads_frozen_mid_run_stop_moving():
    [r] = run_job(job([GradientSurgery("pcgrad"), SetRequiresGradAtStep2("heads", False)], epochs=1))
    [two] = run_job(job([GradientSurgery("pcgrad")], epochs=1, max_steps=2))
    assert r.global_step == 8
    heads = [n for n in r.params if n.startswith("heads.")]
    assert heads and all(torch.equal(r.params[n], two.params[n]) for n in heads)  # frozen after 2 steps
    assert not torch.equal(r.params["trunk.0.weight"], two.params["trunk.0.weight"])  # the trunk still trains
