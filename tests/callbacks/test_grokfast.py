"""Grokfast in a real Trainer: hook timing, interaction cases, 2-rank DDP, resume, logging, CLI."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_optx import Grokfast
from tests.helpers import (
    TrainJob,
    assert_ranks_identical,
    assert_tree_equal,
    check_resume_equivalence,
    run_job,
)
from tests.helpers.models import TinyModule, TwoOptimizerModule, random_dataset
from tests.helpers.recorder import StepRecorder, recorded_steps


def grokfast_state(result):
    """The state of the one Grokfast callback of a run (its key holds every hyper-parameter)."""
    [state] = [v for k, v in result.callback_states.items() if k.startswith("Grokfast{")]
    return state


def job(callbacks, epochs=2, module=None, **trainer_kwargs):
    return TrainJob(
        module=module or functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2),
        callbacks=callbacks,
        trainer_kwargs={"max_epochs": epochs, **trainer_kwargs},
    )


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"filter": "fft"}, r"`filter` must be one of \('ema', 'ma'\), got filter='fft'"),
        ({"alpha": 1.0}, r"`alpha` must be a float in \[0, 1\), got alpha=1.0"),
        ({"alpha": -0.5}, r"`alpha` must be a float in \[0, 1\), got alpha=-0.5"),
        ({"lamb": -2.0}, r"`lamb` must be a non-negative float, got lamb=-2.0"),
        ({"window_size": 0}, r"`window_size` must be an integer >= 1, got window_size=0"),
        ({"start_step": -1}, r"`start_step` must be an integer >= 0, got start_step=-1"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Grokfast(**kwargs)


def test_exported_at_top_level():
    import lightning_optx
    import lightning_optx.callbacks

    assert lightning_optx.Grokfast is lightning_optx.callbacks.Grokfast


def test_state_key_holds_the_settings_that_define_the_state():
    ema = {Grokfast("ema", alpha=a, lamb=lam, window_size=w).state_key
           for a in (0.9, 0.98) for lam in (1.0, 2.0) for w in (5, 10)}
    ma = {Grokfast("ma", window_size=w, alpha=a, lamb=lam).state_key
          for w in (5, 10) for a in (0.9, 0.98) for lam in (1.0, 5.0)}
    assert len(ema) == 2 and len(ma) == 2 and not ema & ma  # EMA: alpha; MA: window_size; never lamb


def _fit(cb, epochs, tmp_path, ckpt_path=None):
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], default_root_dir=str(tmp_path), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyModule(model="mlp", optimizer="sgd"), ckpt_path=ckpt_path)
    return trainer


def test_resume_from_a_filter_only_key_or_with_another_lamb_keeps_the_filter_state(tmp_path):
    """Checkpoints written before the key held alpha / window_size are keyed ``Grokfast{'filter': 'ema'}``;
    resuming from one (here also with another ``lamb``) continues the filter instead of restarting it."""
    first = _fit(Grokfast("ema", alpha=0.9, lamb=2.0), 1, tmp_path)
    first.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    cb_states = checkpoint["callbacks"]
    cb_states["Grokfast{'filter': 'ema'}"] = cb_states.pop(Grokfast("ema", alpha=0.9).state_key)
    torch.save(checkpoint, tmp_path / "legacy.ckpt")
    resumed = {}
    for name in ("new", "legacy"):
        cb = Grokfast("ema", alpha=0.9, lamb=1.0)
        resumed[name] = (_fit(cb, 2, tmp_path, ckpt_path=tmp_path / f"{name}.ckpt"), cb)
    for trainer, cb in resumed.values():
        assert cb.filtered_steps == trainer.global_step == 16  # 8 before the checkpoint, 8 after
    assert_tree_equal(resumed["new"][1].state_dict(), resumed["legacy"][1].state_dict())


def test_filter_only_key_with_another_window_size_is_refused():
    legacy = {"callbacks": {"Grokfast{'filter': 'ma'}": Grokfast("ma", window_size=5).state_dict()}}
    with pytest.raises(ValueError, match=r"window_size=5.*window_size=8"):
        Grokfast("ma", window_size=8).on_load_checkpoint(None, None, legacy)


def test_two_instances_coexist_and_resume_each_its_own_state(tmp_path):
    """Two EMA filters in one Trainer (a slow and a fast one) used to collide on the state key."""
    cbs = [Grokfast("ema", alpha=0.98, lamb=1.0), Grokfast("ema", alpha=0.5, lamb=0.5)]
    straight, _ = check_resume_equivalence(job(cbs), total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    slow, fast = (straight[0].callback_states[cb.state_key] for cb in cbs)
    assert slow["filtered_steps"] == fast["filtered_steps"] == straight[0].global_step
    assert any(not torch.equal(slow["ema"][n], fast["ema"][n]) for n in slow["ema"])


def test_state_dict_is_on_the_cpu_and_moves_back_to_the_parameters_device():
    """Saved on the CPU; loaded state follows the gradient's device at the first filtered step (``meta``
    stands in for a GPU here)."""
    cb = Grokfast("ema", alpha=0.5, lamb=1.0)
    cb._ema = {"v": torch.ones(2)}
    saved = cb.state_dict()
    assert {t.device.type for t in saved["ema"].values()} == {"cpu"}
    fresh = Grokfast("ema", alpha=0.5, lamb=1.0)
    fresh.load_state_dict(saved)
    grad = torch.full((2,), 3.0, device="meta")
    fresh._apply_ema(["v"], [grad])
    assert fresh._ema["v"].device.type == "meta"


def test_loading_state_of_another_filter_is_refused():
    ema_state = Grokfast("ema").state_dict()
    with pytest.raises(ValueError, match=r"filter=.ema.*filter=.ma."):
        Grokfast("ma").load_state_dict(ema_state)
    with pytest.raises(ValueError, match=r"window_size=100.*window_size=5"):
        Grokfast("ma", window_size=5).load_state_dict(Grokfast("ma").state_dict())


# ---------------------------------------------------------------- single process behaviour


def test_trainer_run_equals_reference_loop():
    """The callback applies the authors' filter exactly once per optimizer step, before optimizer.step."""
    alpha, lamb, epochs = 0.9, 2.0, 2
    [result] = run_job(job([Grokfast("ema", alpha=alpha, lamb=lamb)], epochs=epochs,
                           module=functools.partial(TinyModule, model="mlp", optimizer="sgd")))

    pl.seed_everything(7, verbose=False)
    module = TinyModule(model="mlp", optimizer="sgd")
    opt = module.configure_optimizers()
    loader = module.train_dataloader()
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    state = None
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.mse_loss(module(x), y).backward()
            grads = [p.grad for p in params]
            if state is None:
                state = [g.clone() for g in grads]
            for i, g in enumerate(grads):
                state[i] = state[i] * alpha + g * (1 - alpha)
                params[i].grad = g + state[i] * lamb
            opt.step()
    for n, p in zip(names, params):
        torch.testing.assert_close(result.params[n], p.detach(), rtol=1e-5, atol=1e-6)
    assert grokfast_state(result)["filtered_steps"] == result.global_step == 16


def test_slow_gradient_norm_is_logged_every_step():
    [result] = run_job(job([Grokfast("ema")]))
    logged = result.series("grokfast/slow_grad_norm")
    assert len(logged) == result.global_step
    ema = grokfast_state(result)["ema"]
    expected = torch.linalg.vector_norm(torch.stack([t.norm() for t in ema.values()])).item()
    assert logged[-1] == pytest.approx(expected, rel=1e-6)


def test_ma_logs_only_once_window_is_full():
    [result] = run_job(job([Grokfast("ma", window_size=5)]))
    assert len(result.series("grokfast/slow_grad_norm")) == result.global_step - 4


def test_start_step_delays_the_filter():
    [result] = run_job(job([Grokfast("ema", start_step=5)]))
    assert grokfast_state(result)["filtered_steps"] == result.global_step - 5


def test_filter_changes_training():
    """Guard against a silent no-op: the same run with lamb=0 ends elsewhere."""
    [with_filter] = run_job(job([Grokfast("ema", lamb=2.0)]))
    [without] = run_job(job([Grokfast("ema", lamb=0.0)]))
    [plain] = run_job(job([]))
    assert_tree_equal(without.params, plain.params, "lamb=0 vs no callback")
    assert any(not torch.equal(with_filter.params[n], plain.params[n]) for n in plain.params)


def test_gradient_accumulation_filters_once_per_optimizer_step():
    """Batch 4 x 2 accumulated micro-batches gives the same training as batch 8."""
    accumulated = job([Grokfast("ema")], accumulate_grad_batches=2,
                      module=functools.partial(TinyModule, model="mlp", batch_size=4))
    [acc] = run_job(accumulated)
    [full] = run_job(job([Grokfast("ema")], module=functools.partial(TinyModule, model="mlp", batch_size=8)))
    assert acc.global_step == full.global_step == 16
    assert grokfast_state(acc)["filtered_steps"] == 16
    for n in full.params:
        torch.testing.assert_close(acc.params[n], full.params[n], rtol=1e-5, atol=1e-6)


class RecordingSGD(torch.optim.SGD):
    """Records the total gradient norm the optimizer actually steps with."""

    seen_norms: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        RecordingSGD.seen_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        super().step()
        return loss


class ClippedModule(TinyModule):
    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=0.05)


def test_gradient_clipping_applies_to_the_amplified_gradient():
    RecordingSGD.seen_norms = []
    run_job(job([Grokfast("ema", lamb=5.0)], module=functools.partial(ClippedModule, model="mlp"),
                gradient_clip_val=0.01))
    assert len(RecordingSGD.seen_norms) == 16
    assert max(RecordingSGD.seen_norms) <= 0.01 * (1 + 1e-4)


def test_several_param_groups_and_optimizers():
    [groups] = run_job(job([Grokfast("ema")], module=functools.partial(TinyModule, two_param_groups=True)))
    names = set(groups.params)
    assert set(grokfast_state(groups)["ema"]) == names

    [manual] = run_job(job([Grokfast("ma", window_size=3)], module=functools.partial(TwoOptimizerModule)))
    state = grokfast_state(manual)
    assert set(state["ring"]) == set(manual.params)
    # one filter pass per optimizer step, two optimizer steps per batch
    assert state["filtered_steps"] == manual.global_step == 32


class InfGradientAt(TinyModule):
    """Poisons one gradient at a given step and skips that step, as an fp16 GradScaler does."""

    def __init__(self, bad_step: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.bad_step = bad_step

    def on_after_backward(self):
        if self.global_step == self.bad_step:
            self.net.fc1.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return SkipNonFiniteSGD(self.parameters(), lr=0.05)


class SkipNonFiniteSGD(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            super().step()
        return loss


@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_nonfinite_gradients_do_not_poison_the_filter(filter_name):
    cb = Grokfast(filter_name, window_size=3)
    [result] = run_job(job([cb], module=functools.partial(InfGradientAt, model="mlp")))
    state = result.callback_states[cb.state_key]
    assert state["skipped_nonfinite_steps"] == 1
    assert state["filtered_steps"] == result.global_step - 1
    tensors = list(state["ema"].values()) + list(state["ring"].values()) + list(state["total"].values())
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    assert all(torch.isfinite(p).all() for p in result.params.values())


def test_bf16_mixed_precision():
    [result] = run_job(job([Grokfast("ema")], precision="bf16-mixed"))
    ema = grokfast_state(result)["ema"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in ema.values())
    assert grokfast_state(result)["filtered_steps"] == result.global_step


def test_bf16_true_parameters_keep_float32_filter_state():
    module = functools.partial(TinyModule, model="mlp", optimizer="sgd")
    [result] = run_job(job([Grokfast("ma", window_size=4)], module=module, precision="bf16-true"))
    state = grokfast_state(result)
    assert all(p.dtype == torch.bfloat16 for p in result.params.values())
    assert all(t.dtype == torch.float32 for t in state["ring"].values())


@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_64_true_float64_state(filter_name):
    module = functools.partial(TinyModule, model="mlp", optimizer="sgd")
    [result] = run_job(job([Grokfast(filter_name, window_size=2)], module=module, epochs=1, precision="64-true"))
    state = grokfast_state(result)
    buffers = state["ema"] if filter_name == "ema" else state["ring"]
    assert buffers and all(t.dtype == torch.float64 and torch.isfinite(t).all() for t in buffers.values())
    assert state["filtered_steps"] == result.global_step
    assert len(result.series("grokfast/slow_grad_norm")) == result.global_step - (filter_name == "ma")


@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_resume_is_bit_exact_single_process(filter_name, tmp_path):
    check_resume_equivalence(job([Grokfast(filter_name, window_size=6)]), total_epochs=3, split_epoch=1,
                             tmp_dir=str(tmp_path))


# ---------------------------------------------------------------- 2-rank DDP


@pytest.mark.multiprocess
@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_ddp_ranks_identical_after_every_step(filter_name):
    j = job([Grokfast(filter_name, window_size=3), StepRecorder(watch=("Grokfast",))])
    j.inspect = recorded_steps
    ranks = run_job(j, world_size=2)
    assert_ranks_identical(ranks, "params")
    assert_ranks_identical(ranks, "callback_states")
    steps0, steps1 = ranks[0].inspected, ranks[1].inspected
    assert len(steps0) == len(steps1) == ranks[0].global_step == 8
    for a, b in zip(steps0, steps1):
        assert_tree_equal(a, b, f"rank 0 vs rank 1 after step {a['step']}")


@pytest.mark.multiprocess
def test_ddp_equals_single_process_with_the_same_global_batch():
    """2 ranks x batch 4 (DDP-averaged gradients) train like 1 process x batch 8: the filter sees the mean."""
    sharded = functools.partial(TinyModule, model="mlp", batch_size=4, shard_in_order=True)
    two = run_job(job([Grokfast("ema")], module=sharded, use_distributed_sampler=False), 2)
    [one] = run_job(job([Grokfast("ema")], module=functools.partial(TinyModule, model="mlp", batch_size=8)))
    assert two[0].global_step == one.global_step == 16
    for n in one.params:
        torch.testing.assert_close(two[0].params[n], one.params[n], rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow  # default run: 2-rank Grokfast resumes under ddp_sign and local_sgd in test_matrix.py
@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_resume_is_bit_exact_two_ranks(filter_name, tmp_path):
    straight, _ = check_resume_equivalence(job([Grokfast(filter_name, window_size=6)]), total_epochs=2,
                                           split_epoch=1, tmp_dir=str(tmp_path), world_size=2)
    assert_ranks_identical(straight, "callback_states")


# ---------------------------------------------------------------- LightningCLI


def _cli(args):
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(TinyModule, run=False, save_config_callback=None, args=args,
                        trainer_defaults={"logger": False, "enable_checkpointing": False})


def test_lightning_cli_builds_the_callback_from_flags():
    cli = _cli(["--trainer.callbacks+=lightning_optx.callbacks.Grokfast", "--trainer.callbacks.filter=ma",
                "--trainer.callbacks.window_size=10", "--trainer.callbacks.lamb=5.0"])
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, Grokfast)]
    assert (cb.filter, cb.window_size, cb.lamb) == ("ma", 10, 5.0)


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_optx.Grokfast\n"
        "      init_args: {filter: ema, alpha: 0.9, lamb: 3.0, start_step: 2}\n"
    )
    cli = _cli([f"--config={config}"])
    [cb] = [c for c in cli.trainer.callbacks if isinstance(c, Grokfast)]
    assert (cb.filter, cb.alpha, cb.lamb, cb.start_step) == ("ema", 0.9, 3.0, 2)


def test_lightning_cli_rejects_an_unknown_filter():
    with pytest.raises(SystemExit):
        _cli(["--trainer.callbacks+=lightning_optx.Grokfast", "--trainer.callbacks.filter=fft"])


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_matches_eager():
    pytest.importorskip("torch._dynamo")

    class Compiled(TinyModule):
        def configure_model(self):
            self.net = torch.compile(self.net)

    eager = run_job(job([Grokfast("ema")], epochs=1, module=functools.partial(TinyModule, model="mlp")))[0]
    compiled = run_job(job([Grokfast("ema")], epochs=1, module=functools.partial(Compiled, model="mlp")))[0]
    for n, p in eager.params.items():
        torch.testing.assert_close(compiled.params[n.replace("net.", "net._orig_mod.")], p,
                                   rtol=1e-4, atol=1e-5)
    assert math.isfinite(compiled.series("grokfast/slow_grad_norm")[-1])


def test_random_dataset_is_fixed():
    a, b = random_dataset("mlp"), random_dataset("mlp")
    assert torch.equal(a.tensors[0], b.tensors[0])
