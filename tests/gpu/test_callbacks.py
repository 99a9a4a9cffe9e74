"""Grokfast, GradES, DropoutSchedule and GradientSurgery on one GPU: fp16 with a real GradScaler (one step
overflows) and bf16-mixed, with the properties the CPU tests check. The same checks under torch.compile (inductor)
are in test_compile.py (their own file, so that pytest-xdist spreads the compiles over its workers)."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_optx import GradES, GradientSurgery, Grokfast
from lightning_optx.callbacks.dropout import EarlyDropout
from lightning_optx.functional.schedules import dropout_rate
from tests.callbacks.test_dropout import RateProbe, probe
from tests.gpu.common import (
    StepProbe,
    assert_close_relative,
    assert_real_overflows,
    probe_records,
    register_variants,
    trainer_precision,
    variant,
)
from tests.gpu.device import DEVICE, on_device, pytestmark, tensors_on  # noqa: F401  (pytestmark: marker, skip)
from tests.helpers import TrainJob, run_job
from tests.helpers.models import MultiTaskModule, TinyModule
from tests.helpers.recorder import StepRecorder, recorded_steps

PRECISIONS = ["16-mixed", "bf16-mixed"]  # "compile": test_compile.py

register_variants(RateProbe, globals())


def device_job(base, precision, callbacks, epochs=2, inspect=None, **module_kwargs):
    module = functools.partial(variant(base, precision), **module_kwargs)
    job = TrainJob(module=module, callbacks=callbacks, trainer_kwargs={"max_epochs": epochs}, inspect=inspect)
    return on_device(job, trainer_precision(precision))


def check_overflow(records, precision):
    """The steps the GradScaler skipped (fp16), after checking that they overflowed for real; none otherwise."""
    if precision == "16-mixed":
        return assert_real_overflows(records)
    assert all(r["finite"] for r in records)
    return []


# ---------------------------------------------------------------- Grokfast


def reference_filter_state(records, filter_name, alpha, window):
    """The EMA / the window's sum, in float64 from the gradients each finite step handed to the callback."""
    state = None
    grads = [r["grads"] for r in records if r["finite"]]
    if filter_name == "ema":
        for g in grads:
            state = dict(g) if state is None else {n: state[n] * alpha + g[n] * (1 - alpha) for n in g}
        return state
    last = grads[-window:]
    return {n: sum(g[n] for g in last) for n in last[0]}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("filter_name", ["ema", "ma"])
def test_grokfast_filter_equals_the_reference(filter_name, precision):
    check_grokfast_filter(filter_name, precision)


def check_grokfast_filter(filter_name, precision):
    alpha, window = 0.9, 3
    cb = Grokfast(filter_name, alpha=alpha, lamb=2.0, window_size=window)
    job = device_job(TinyModule, precision, [StepProbe(keep_grads=True), cb], inspect=probe_records,
                     model="mlp", optimizer="adamw", lr=1e-2)
    [r] = run_job(job)
    records, state = r.inspected, r.callback_states[cb.state_key]
    skipped = check_overflow(records, precision)
    assert state["skipped_nonfinite_steps"] == len(skipped)
    assert state["filtered_steps"] == r.global_step - len(skipped)
    filtered = state["ema"] if filter_name == "ema" else state["total"]
    assert filtered and tensors_on(filtered, DEVICE.type)
    assert all(t.dtype == torch.float32 for t in filtered.values())
    expected = reference_filter_state(records, filter_name, alpha, window)
    assert set(filtered) == set(expected)
    for name, t in filtered.items():
        assert_close_relative(t, expected[name], rtol=1e-5, what=f"{filter_name} state of {name}")
    assert all(torch.isfinite(p).all() for p in r.params.values())


# ---------------------------------------------------------------- GradES


def uncompiled(name):
    return name.replace("._orig_mod", "")


def grades_facts(trainer, module):
    cb = next(c for c in trainer.callbacks if isinstance(c, GradES))
    return {"steps": recorded_steps(trainer, module), "grace": cb.grace_steps, "targets": cb.target_names,
            "trainable": {n for n, p in module.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grades_freezes_and_frozen_matrices_never_move(precision):
    check_grades_freezing(precision)


def check_grades_freezing(precision):
    cb = GradES(tau=0.5, tau_mode="relative", grace_fraction=0.3)
    job = device_job(TinyModule, precision, [cb, StepRecorder()], epochs=3, inspect=grades_facts,
                     model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1)
    [r] = run_job(job)
    facts, state = r.inspected, r.callback_states[cb.state_key]
    frozen = state["frozen"]
    assert len(facts["targets"]) == 12
    assert frozen and min(frozen.values()) >= facts["grace"] == 8
    # GradES names parameters as the uncompiled module does (no `_orig_mod.`)
    records = {rec["step"]: {uncompiled(n): p for n, p in rec["params"].items()} for rec in facts["steps"]}
    for name, step in frozen.items():
        assert all(torch.equal(records[s][name], records[step][name]) for s in records if s >= step), name
    assert {uncompiled(n) for n in facts["trainable"]}.isdisjoint(frozen)
    assert r.series("grades/frozen_fraction")[-1] == pytest.approx(len(frozen) / 12)
    # a step the fp16 scaler skips is no measurement: nothing inf/NaN in what GradES keeps
    for key in ("reference", "last_metrics"):
        values = [float(v) for v in state[key].values()]
        assert all(torch.isfinite(torch.tensor(values))), f"{key}: {values}"
    assert all(torch.isfinite(p).all() for p in r.params.values())


# ---------------------------------------------------------------- DropoutSchedule


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dropout_rates_follow_the_schedule(precision):
    check_dropout_rates(precision)


def check_dropout_rates(precision):
    cb = EarlyDropout(p=0.4, cutoff=12, shape="linear")
    job = device_job(RateProbe, precision, [cb], inspect=probe, model="dropout_mlp", optimizer="adamw", lr=1e-2)
    [r] = run_job(job)
    seen = r.inspected["seen"]
    assert [step for step, _ in seen] == list(range(16))  # a step the scaler skips still counts as a step
    logged = r.series("dropout/p")
    for (_, rates), p in zip(seen, logged):  # the rate logged (as float32) is the rate the layers held
        assert rates == [pytest.approx(p)] * 2
    exact = [dropout_rate(s, 16, "early", 0.4, 12, "linear") for s in range(16)]
    if precision == "compile":  # quantised so that dynamo does not recompile for every new rate
        assert len(set(logged)) <= 4 and logged[0] == pytest.approx(0.4) and logged[-1] == 0.0
        assert max(abs(a - b) for a, b in zip(logged, exact)) <= 0.4 / 3 + 1e-6
    else:
        assert logged == pytest.approx(exact)
    assert r.inspected["final_rates"] == [0.3, 0.3]


# ---------------------------------------------------------------- GradientSurgery


def flat(params):
    return torch.cat([p.detach().double().cpu().flatten() for _, p in sorted(params.items())])


def surgery_job(method, precision, **kwargs):
    cbs = [StepProbe(), GradientSurgery(method)] if method else [StepProbe()]
    return device_job(MultiTaskModule, precision, cbs, inspect=probe_records, **kwargs)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_surgery_sum_equals_plain_training_and_pcgrad_sees_the_conflict(precision):
    check_gradient_surgery(precision)


def check_gradient_surgery(precision):
    # the callback's run first: under inductor it raises (test_compile.py) before the plain compiled run is paid for
    [summed] = run_job(surgery_job("sum", precision))
    [plain] = run_job(surgery_job(None, precision))
    skipped = check_overflow(summed.inspected, precision)
    assert check_overflow(plain.inspected, precision) == skipped  # the same steps overflow with and without
    difference = flat(summed.params) - flat(plain.params)
    if precision == "compile":
        assert_close_relative(flat(summed.params), flat(plain.params), rtol=1e-5, what="sum vs plain")
    else:
        # T low-precision backward passes vs one: within a few times what low precision alone moves the run (a
        # forgotten (un)scaling would be off by 2**16)
        [fp32] = run_job(surgery_job(None, "32-true"))
        noise = (flat(plain.params) - flat(fp32.params)).norm()
        assert difference.norm() <= 4 * noise + 1e-6 * flat(plain.params).norm(), (difference.norm(), noise)
    cb = GradientSurgery("pcgrad")
    [pc] = run_job(device_job(MultiTaskModule, precision, [StepProbe(), cb], inspect=probe_records))
    assert pc.callback_states[cb.state_key]["skipped_nonfinite_steps"] == len(check_overflow(pc.inspected, precision))
    rates = pc.series("surgery/conflict_rate")
    assert len(rates) >= pc.global_step - len(skipped) and max(rates) == 1.0
    assert all(torch.isfinite(p).all() for p in pc.params.values())
