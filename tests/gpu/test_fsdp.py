"""Grokfast, GradES and DropoutSchedule under Lightning's ``FSDPStrategy`` on one GPU (flattened parameters,
``use_orig_params=True``, Lightning's default): either the callback works, with the properties the CPU tests
check, or it refuses the strategy before step 0 with an error that names both the callback's class and
``FSDPStrategy`` (the test is then skipped with that message, so the log shows which path was taken).
``FSDPStrategy`` refuses the CPU, so these tests run on CUDA only (the CPU self-check skips them)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from lightning_optx import GradES, Grokfast
from lightning_optx.callbacks.dropout import EarlyDropout
from lightning_optx.functional.schedules import dropout_rate
from tests.callbacks.test_dropout import RateProbe, probe
from tests.gpu.common import StepProbe, assert_close_relative, probe_records
from tests.gpu.device import on_device, only_on_cuda, pytestmark
from tests.helpers import TrainJob, run_job
from tests.helpers.models import TinyModule
from tests.helpers.recorder import StepRecorder, recorded_steps

pytestmark = [*pytestmark, only_on_cuda]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """FSDPStrategy initialises a (1-rank NCCL) process group in this process: leave none to the next test."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fsdp_job(module, callbacks, inspect, epochs=2, precision="32-true"):
    job = TrainJob(module=module, callbacks=callbacks, strategy=FSDPStrategy(), inspect=inspect,
                   trainer_kwargs={"max_epochs": epochs})
    return on_device(job, precision)


STARTED_STEPS: list[int] = []  # module-level: run_job deep-copies the callbacks, not this list


class StartedSteps(Callback):
    """Records every training step that started (in this process: FSDP on one GPU runs in-process)."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        STARTED_STEPS.append(trainer.global_step)


def run_or_refusal(job: TrainJob, callback: Callback) -> Any:
    """The single rank's result, or a skip that shows the refusal's message, after checking that the refusal is a
    clear one: it names the callback's class and ``FSDPStrategy``, and comes before step 0."""
    STARTED_STEPS.clear()
    try:
        [result] = run_job(dataclasses.replace(job, callbacks=[*job.callbacks, StartedSteps()]))
    except (ValueError, RuntimeError, TypeError) as error:
        message = str(error)
        names = {c.__name__ for c in type(callback).__mro__ if c.__module__.startswith("lightning_optx")}
        assert "FSDPStrategy" in message and any(n in message for n in names), \
            f"not a clear refusal of FSDPStrategy by {type(callback).__name__}: {error!r}"
        assert not STARTED_STEPS, f"refused only after training started (steps {STARTED_STEPS}): {error!r}"
        pytest.skip(f"{type(callback).__name__} refuses FSDPStrategy before step 0: {message}")
    return result


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_grokfast_ema_under_fsdp(precision):
    alpha = 0.9
    cb = Grokfast("ema", alpha=alpha, lamb=2.0)
    module = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2)
    r = run_or_refusal(fsdp_job(module, [StepProbe(keep_grads=True), cb], probe_records, precision=precision), cb)
    records, state = r.inspected, r.callback_states[cb.state_key]
    assert all(rec["finite"] for rec in records) and state["filtered_steps"] == r.global_step == 16
    grads = [rec["grads"] for rec in records]
    assert set(state["ema"]) == set(grads[0])  # every (unflattened) parameter by its own name
    ema = dict(grads[0])
    for g in grads[1:]:
        ema = {n: ema[n] * alpha + g[n] * (1 - alpha) for n in g}
    for name, t in state["ema"].items():
        assert t.shape == ema[name].shape, name
        assert_close_relative(t, ema[name], rtol=1e-5, what=name)


def grades_facts(trainer, module):
    cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
    return {"steps": recorded_steps(trainer, module), "grace": cb.grace_steps}


def test_grades_under_fsdp():
    cb = GradES(tau=0.5, tau_mode="relative", grace_fraction=0.3)
    module = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1)
    r = run_or_refusal(fsdp_job(module, [cb, StepRecorder()], grades_facts, epochs=3), cb)
    frozen = r.callback_states[cb.state_key]["frozen"]
    assert frozen and min(frozen.values()) >= r.inspected["grace"]
    records = {rec["step"]: rec["params"] for rec in r.inspected["steps"]}
    for name, step in frozen.items():  # AdamW with weight decay would move it: a frozen matrix stays bit for bit
        assert all(torch.equal(records[s][name], records[step][name]) for s in records if s >= step), name


def test_dropout_schedule_under_fsdp():
    cb = EarlyDropout(p=0.4, cutoff=12, shape="linear")
    module = functools.partial(RateProbe, model="dropout_mlp", optimizer="adamw", lr=1e-2)
    r = run_or_refusal(fsdp_job(module, [cb], probe), cb)
    expected = [dropout_rate(s, 16, "early", 0.4, 12, "linear") for s in range(16)]
    seen = r.inspected["seen"]
    assert [step for step, _ in seen] == list(range(16))
    assert [rates for _, rates in seen] == [[e, e] for e in expected]
    assert r.inspected["final_rates"] == [0.3, 0.3]
