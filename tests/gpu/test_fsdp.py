"""Grokfast, GradES and DropoutSchedule under Lightning's ``FSDPStrategy`` on one GPU (flattened parameters,
``use_orig_params=True``, Lightning's default): either the callback works, with the properties the CPU tests
check, or it refuses the strategy at setup with an error that names it. ``FSDPStrategy`` refuses the CPU, so
these tests run on CUDA only (the CPU self-check skips them)."""

from __future__ import annotations

import functools

import pytest
import torch
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


def run_or_refusal(job):
    """The single rank's result, or ``None`` after checking that the refusal names FSDPStrategy."""
    try:
        [result] = run_job(job)
    except (ValueError, RuntimeError, TypeError) as error:
        assert "FSDP" in str(error), f"not a clear refusal of FSDPStrategy: {error!r}"
        return None
    return result


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_grokfast_ema_under_fsdp(precision):
    alpha = 0.9
    cb = Grokfast("ema", alpha=alpha, lamb=2.0)
    module = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2)
    r = run_or_refusal(fsdp_job(module, [StepProbe(keep_grads=True), cb], probe_records, precision=precision))
    if r is None:
        return
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
    r = run_or_refusal(fsdp_job(module, [cb, StepRecorder()], grades_facts, epochs=3))
    if r is None:
        return
    frozen = r.callback_states[cb.state_key]["frozen"]
    assert frozen and min(frozen.values()) >= r.inspected["grace"]
    records = {rec["step"]: rec["params"] for rec in r.inspected["steps"]}
    for name, step in frozen.items():  # AdamW with weight decay would move it: a frozen matrix stays bit for bit
        assert all(torch.equal(records[s][name], records[step][name]) for s in records if s >= step), name


def test_dropout_schedule_under_fsdp():
    cb = EarlyDropout(p=0.4, cutoff=12, shape="linear")
    module = functools.partial(RateProbe, model="dropout_mlp", optimizer="adamw", lr=1e-2)
    r = run_or_refusal(fsdp_job(module, [cb], probe))
    if r is None:
        return
    expected = [dropout_rate(s, 16, "early", 0.4, 12, "linear") for s in range(16)]
    seen = r.inspected["seen"]
    assert [step for step, _ in seen] == list(range(16))
    assert [rates for _, rates in seen] == [[e, e] for e in expected]
    assert r.inspected["final_rates"] == [0.3, 0.3]
