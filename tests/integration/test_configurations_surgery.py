"""GradientSurgery in the configurations users run: fp16 with overflowing steps (a real GradScaler),
bf16-mixed, bf16-true, accumulation, manual optimization (refused), torch.compile, a branch first reached
at step 1, resume with a ``requires_grad``-filtered optimizer, and a PEFT LoRA model.

Equivalences use ``method="sum"`` (the callback must then give exactly what Lightning's own backward gives,
in the same precision); the surgery methods are checked for what they must do in each configuration.
"""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_optx import GradientSurgery
from tests.callbacks.test_gradient_surgery import LateBranch
from tests.helpers import TrainJob, check_resume_equivalence, run_job
from tests.helpers.models import MultiTaskModule


def job(callbacks, module=MultiTaskModule, epochs=1, **trainer_kwargs):
    return TrainJob(module=module, callbacks=callbacks, trainer_kwargs={"max_epochs": epochs, **trainer_kwargs})


def assert_params_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for n, p in b.items():
        torch.testing.assert_close(a[n].float(), p.float(), rtol=rtol, atol=atol, msg=n)


def surgery_state(result):
    return next(v for k, v in result.callback_states.items() if "GradientSurgery" in k)


# ---------------------------------------------------------------- fp16 with a real GradScaler


class ScaleWatcher(Callback):
    """Counts the steps the grad scaler skipped (its scale went down)."""

    def __init__(self) -> None:
        self.skipped = 0
        self._before: float | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = trainer.precision_plugin.scaler.get_scale()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is not None and trainer.precision_plugin.scaler.get_scale() < self._before:
            self.skipped += 1
        self._before = None

    def state_dict(self):
        return {"skipped": self.skipped}


def fp16_plugin():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))


@pytest.mark.parametrize("method", ["gcond", "sam_gs", "pcgrad"])
def test_fp16_overflowing_steps_are_skipped_and_not_measured(method):
    [r] = run_job(job([GradientSurgery(method), ScaleWatcher()], plugins=[fp16_plugin()]))
    skipped = r.callback_states["ScaleWatcher"]["skipped"]
    state = surgery_state(r)
    assert skipped >= 1 and r.global_step == 8
    assert state["skipped_nonfinite_steps"] == skipped  # the callback saw exactly the steps the scaler skipped
    if method != "pcgrad":  # the stateful methods counted only the steps that were applied
        assert state["aggregator"]["state"]["step"] == r.global_step - skipped
    assert all(torch.isfinite(p).all() for p in r.params.values())


def test_fp16_sum_equals_plain_fp16():
    [surgery] = run_job(job([GradientSurgery("sum"), ScaleWatcher()], plugins=[fp16_plugin()]))
    [plain] = run_job(job([ScaleWatcher()], plugins=[fp16_plugin()]))
    assert surgery.callback_states["ScaleWatcher"] == plain.callback_states["ScaleWatcher"]
    assert_params_close(surgery.params, plain.params, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- bf16


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_sum_equals_plain_and_methods_train(precision):
    [surgery] = run_job(job([GradientSurgery("sum")], precision=precision))
    [plain] = run_job(job([], precision=precision))
    tol = 2e-2  # per-task backward passes round their bf16 intermediates differently from one backward
    assert_params_close(surgery.params, plain.params, rtol=tol, atol=tol)
    [gc] = run_job(job([GradientSurgery("gcond")], precision=precision))
    assert all(torch.isfinite(p).all() for p in gc.params.values())
    assert not torch.equal(gc.params["trunk.0.weight"], plain.params["trunk.0.weight"])
    if precision == "bf16-true":
        assert gc.params["trunk.0.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------- accumulation, manual optimization


def test_accumulation_sum_equals_plain_accumulation():
    module = functools.partial(MultiTaskModule, batch_size=4, optimizer="adamw")
    [surgery] = run_job(job([GradientSurgery("sum")], module=module, accumulate_grad_batches=3))
    [plain] = run_job(job([], module=module, accumulate_grad_batches=3))
    assert surgery.global_step == plain.global_step == 6  # 16 batches: 5 full windows and a last short one
    assert_params_close(surgery.params, plain.params)


class ManualTwoOptimizers(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        trunk_opt, head_opt = self.optimizers()
        self.manual_backward(out["loss"])
        trunk_opt.step()
        head_opt.step()
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.trunk.parameters(), lr=0.01), torch.optim.SGD(self.heads.parameters(), lr=0.01)


def test_manual_optimization_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match=r"GradientSurgery needs automatic optimization.*with manual optimization "
                                         r"call `lightning_optx.functional.surgery` yourself"):
        run_job(job([GradientSurgery("pcgrad")], module=ManualTwoOptimizers))


# ---------------------------------------------------------------- torch.compile


class CompiledTrunk(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.trunk = torch.compile(self.trunk, backend="aot_eager")


@pytest.mark.parametrize("method", ["sum", "gcond"])
def test_torch_compile_matches_eager(method):
    torch._dynamo.reset()
    [compiled] = run_job(job([GradientSurgery(method)], module=CompiledTrunk))
    [eager] = run_job(job([GradientSurgery(method)]))
    renamed = {n.replace("trunk._orig_mod.", "trunk."): p for n, p in compiled.params.items()}
    assert_params_close(renamed, eager.params)


# ---------------------------------------------------------------- dynamic graph, resume


def test_branch_first_reached_at_step_1_under_bf16_mixed():
    [r] = run_job(job([GradientSurgery("sam_gs")], module=LateBranch, precision="bf16-mixed"))
    assert surgery_state(r)["shared"][-2:] == ["late.weight", "late.bias"]
    assert r.params["late_head.weight"].abs().sum() > 0


class FrozenFirstLayer(MultiTaskModule):
    """The first trunk layer is frozen; the optimizer holds only ``requires_grad`` parameters (the usual idiom)."""

    def __init__(self):
        super().__init__(optimizer="adamw", lr=1e-2)
        self.trunk[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("method", ["gcond", "sam_gs"])
def test_resume_with_requires_grad_filtered_optimizer_is_bit_exact(tmp_path, method):
    straight, _ = check_resume_equivalence(job([GradientSurgery(method)], module=FrozenFirstLayer), total_epochs=2,
                                           split_epoch=1, tmp_dir=str(tmp_path))
    assert "trunk.0.weight" not in surgery_state(straight[0])["shared"]
    init = _initial(FrozenFirstLayer)
    assert torch.equal(straight[0].params["trunk.0.weight"], init["trunk.0.weight"])


def _initial(factory):
    import lightning.pytorch as pl

    pl.seed_everything(7, verbose=False)
    return {n: p.detach().clone() for n, p in factory().named_parameters()}


# ---------------------------------------------------------------- LoRA (PEFT)


class LoraTrunk(MultiTaskModule):
    """PEFT LoRA adapters (PEFT's default init: ``lora_B = 0``) on the trunk's linear layers; heads trainable."""

    def __init__(self):
        super().__init__(optimizer="adamw", lr=1e-2)
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"])
        self.trunk = peft.inject_adapter_in_model(config, self.trunk)
        for name, p in self.trunk.named_parameters():
            p.requires_grad_("lora_" in name)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_lora_adapters_are_the_shared_parameters():
    pytest.importorskip("peft")
    [r] = run_job(job([GradientSurgery("pcgrad")], module=LoraTrunk))
    [plain] = run_job(job([GradientSurgery("sum")], module=LoraTrunk))
    [no_callback] = run_job(job([], module=LoraTrunk))
    assert_params_close(plain.params, no_callback.params)
    init = _initial(LoraTrunk)
    shared = surgery_state(r)["shared"]
    assert shared and all("lora_" in n for n in shared)
    for n, p in r.params.items():
        moved = not torch.equal(p, init[n])
        assert moved == ("lora_" in n or n.startswith("heads.")), n  # base weights frozen, adapters trained
    assert not torch.equal(r.params["trunk.0.lora_B.default.weight"], plain.params["trunk.0.lora_B.default.weight"])



class InfAtStep1(MultiTaskModule):
    """Task 0's loss overflows to inf at step 1 (any scale): the grad scaler skips that step."""

    def task_losses(self, x, y):
        losses = super().task_losses(x, y)
        if self.trainer.global_step == 1:
            losses["task0"] = losses["task0"] * float("inf")
        return losses


def test_scaler_at_exactly_one_still_keeps_infs_out_of_the_method_state():
    """Non-finite steps are detected whenever a grad scaler is enabled, not when its scale differs from 1."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    [r] = run_job(job([GradientSurgery("gcond")], module=InfAtStep1, plugins=[plugin]))
    state = surgery_state(r)
    assert state["skipped_nonfinite_steps"] == 1
    assert state["aggregator"]["state"]["step"] == r.global_step - 1
    assert all(torch.isfinite(p).all() for p in r.params.values())
