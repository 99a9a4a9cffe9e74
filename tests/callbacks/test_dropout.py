"""DropoutSchedule in a real Trainer: rates per optimizer step, module kinds, restore, resume, compile."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lightning_optx import DropoutSchedule, EarlyDropout, LateDropout
from lightning_optx.functional.schedules import dropout_rate
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule

DROPOUT_MLP = functools.partial(TinyModule, model="dropout_mlp", optimizer="adamw", lr=1e-2)


class RateProbe(TinyModule):
    """Records, per micro-batch, the global step and the rate every scheduled module holds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[int, list[float]]] = []

    def training_step(self, batch, batch_idx):
        rates = [m.p for m in self.modules() if isinstance(m, nn.Dropout)]
        rates += [m.dropout for m in self.modules() if isinstance(m, nn.MultiheadAttention)]
        self.seen.append((self.global_step, rates))
        return super().training_step(batch, batch_idx)


def probe(trainer, module):
    rates = [m.p for m in module.modules() if isinstance(m, nn.Dropout)]
    return {"seen": getattr(module, "seen", None), "final_rates": rates}


def job(callbacks, module=DROPOUT_MLP, epochs=2, **trainer_kwargs):
    return TrainJob(module=module, callbacks=callbacks, trainer_kwargs={"max_epochs": epochs, **trainer_kwargs},
                    inspect=probe)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`target` must be 'dropout' or 'drop_path', got target='attention'"):
        DropoutSchedule(target="attention")
    with pytest.raises(ValueError, match=r"`p` must be in \[0, 1\), got p=1.2"):
        EarlyDropout(p=1.2)
    with pytest.raises(ValueError, match=r"`levels` must be None or an integer >= 0, got levels=-1"):
        LateDropout(levels=-1)


def test_no_dropout_module_is_an_error():
    with pytest.raises(ValueError, match=r"DropoutSchedule\(target='dropout'\) found no module to schedule"):
        run_job(job([EarlyDropout()], module=functools.partial(TinyModule, model="mlp")))


@pytest.mark.parametrize(("cb", "mode", "shape", "cutoff"), [
    (EarlyDropout(p=0.4, cutoff=6, shape="linear"), "early", "linear", 6),
    (EarlyDropout(p=0.4, cutoff=0.5, shape="constant"), "early", "constant", 8),
    (LateDropout(p=0.4, cutoff=10), "late", "constant", 10),
    (DropoutSchedule(mode="late", p=0.4, cutoff=4, shape="linear"), "late", "linear", 4),
])
def test_rates_follow_the_schedule_every_optimizer_step(cb, mode, shape, cutoff):
    [r] = run_job(job([cb], module=functools.partial(RateProbe, model="dropout_mlp")))
    expected = [dropout_rate(s, 16, mode, 0.4, cutoff, shape) for s in range(16)]
    seen = r.inspected["seen"]
    assert [step for step, _ in seen] == list(range(16))
    assert [rates for _, rates in seen] == [[e, e] for e in expected]
    assert r.series("dropout/p") == pytest.approx(expected)  # logged as float32
    assert r.inspected["final_rates"] == [0.3, 0.3]  # the module's own rates come back at the end of fit


def test_accumulated_micro_batches_share_one_rate():
    [r] = run_job(job([EarlyDropout(p=0.4, cutoff=4)], module=functools.partial(RateProbe, model="dropout_mlp"),
                      accumulate_grad_batches=2))
    seen = r.inspected["seen"]
    assert [s for s, _ in seen] == [s for s in range(8) for _ in range(2)]
    for (s0, r0), (s1, r1) in zip(seen[::2], seen[1::2]):
        assert s0 == s1 and r0 == r1 == [dropout_rate(s0, 8, "early", 0.4, 4, "linear")] * 2


def test_multihead_attention_dropout_is_scheduled():
    module = functools.partial(RateProbe, model="mha_transformer")
    [r] = run_job(job([EarlyDropout(p=0.2, cutoff=2, shape="constant")], module=module, epochs=1))
    first, later = r.inspected["seen"][0][1], r.inspected["seen"][3][1]
    assert first == [0.2] * len(first) and later == [0.0] * len(later)
    assert len(first) == 8  # 3 nn.Dropout + 1 attention dropout, in each of 2 layers


class DropPath(nn.Module):
    """timm-style stochastic depth (``drop_prob``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


class DropPathModule(TinyModule):
    def __init__(self, **kwargs):
        super().__init__(model="mlp", **kwargs)
        self.drop_path = DropPath(0.05)
        self.path_rates: list[float] = []

    def training_step(self, batch, batch_idx):
        self.path_rates.append(self.drop_path.drop_prob)
        x, y = batch
        loss = nn.functional.mse_loss(self.net.head(self.drop_path(torch.tanh(self.net.fc1(x)) @ torch.eye(16))), y)
        return loss


def test_drop_path_target():
    cb = LateDropout(p=0.3, cutoff=4, target="drop_path")
    [r] = run_job(TrainJob(module=DropPathModule, callbacks=[cb], trainer_kwargs={"max_epochs": 1},
                           inspect=lambda t, m: (m.path_rates, m.drop_path.drop_prob)))
    rates, final = r.inspected
    assert rates == [0.0] * 4 + [0.3] * 4
    assert final == 0.05


@pytest.mark.parametrize("cb", [EarlyDropout(p=0.4, cutoff=10), LateDropout(p=0.4, cutoff=5)])
def test_resume_is_bit_exact_with_dropout_randomness(tmp_path, cb):
    """The RNG state is part of the callback's checkpoint, so the masks after resume are the same."""
    check_resume_equivalence(job([cb]), total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))


def test_without_saved_rng_state_resume_differs(tmp_path):
    """Shows what the saved RNG state buys: without it the dropout masks after resume are different."""
    with pytest.raises(AssertionError, match="parameters after resume"):
        check_resume_equivalence(job([LateDropout(p=0.4, cutoff=5, save_rng_state=False)]), total_epochs=3,
                                 split_epoch=1, tmp_dir=str(tmp_path))


@pytest.mark.multiprocess
def test_ddp_two_ranks_and_resume(tmp_path):
    straight, _ = check_resume_equivalence(job([EarlyDropout(p=0.4, cutoff=6)]), total_epochs=3, split_epoch=1,
                                           tmp_dir=str(tmp_path), world_size=2)
    assert_ranks_identical(straight)
    expected = [dropout_rate(s, 12, "early", 0.4, 6, "linear") for s in range(12)]
    assert straight[0].series("dropout/p") == pytest.approx(expected)


class CompiledDropoutModule(TinyModule):
    def configure_model(self):
        self.net = torch.compile(self.net, backend="aot_eager")


def test_torch_compile_gives_eager_losses_and_quantizes_the_rate():
    """aot_eager keeps eager's RNG, so compiled and eager losses must match step for step."""
    eager = run_job(job([EarlyDropout(p=0.4, cutoff=12, levels=4)], epochs=2))[0]
    compiled_module = functools.partial(CompiledDropoutModule, model="dropout_mlp", optimizer="adamw", lr=1e-2)
    compiled = run_job(job([EarlyDropout(p=0.4, cutoff=12)], module=compiled_module, epochs=2))[0]
    assert compiled.series("dropout/p") == eager.series("dropout/p")
    assert len(set(compiled.series("dropout/p"))) <= 4  # quantised automatically: no recompile storm
    torch.testing.assert_close(torch.tensor(compiled.series("train_loss")), torch.tensor(eager.series("train_loss")),
                               rtol=1e-5, atol=1e-6)


def infos(monkeypatch) -> list[str]:
    """The messages the callback passes to ``rank_zero_info`` (Lightning's logger does not propagate)."""
    messages: list[str] = []
    monkeypatch.setattr("lightning_optx.callbacks.dropout.rank_zero_info", messages.append)
    return messages


def test_float_dropout_attributes_are_scheduled_and_named(monkeypatch):
    """Llama-style attention keeps its rate as a float (`attention_dropout`): it is driven like nn.Dropout."""
    from tests.helpers.configurations import ConfigModule

    messages = infos(monkeypatch)

    def inspect(trainer, module):
        return module.seen, next(c for c in trainer.callbacks if isinstance(c, EarlyDropout)).scheduled_names

    [r] = run_job(TrainJob(module=ConfigModule, callbacks=[EarlyDropout(p=0.4, cutoff=3, shape="constant")],
                           trainer_kwargs={"max_epochs": 1}, inspect=inspect))
    seen, names = r.inspected
    assert [rates["attention_dropout"] for _, rates in seen] == [[0.4] * 3] * 3 + [[0.0] * 3] * 5
    assert [rates["drop_path"] for _, rates in seen] == [torch.linspace(0, 0.1, 3).tolist()] * 8
    assert sorted(names) == sorted([f"net.blocks.{i}.{a}" for i in range(3)
                                    for a in ("attn.attention_dropout", "drop.p")])
    [message] = [m for m in messages if "float dropout attributes" in m]
    assert message.endswith(": " + ", ".join(f"net.blocks.{i}.attn.attention_dropout" for i in range(3)))


def test_drop_path_keeps_the_per_depth_profile(monkeypatch):
    """Blocks built with linspace(0, 0.1, 3) get rate * r_i / max r: 0, rate / 2, rate."""
    from tests.helpers.configurations import ConfigModule

    messages = infos(monkeypatch)

    [r] = run_job(TrainJob(module=ConfigModule, callbacks=[LateDropout(p=0.3, cutoff=2, target="drop_path")],
                           trainer_kwargs={"max_epochs": 1}, inspect=lambda t, m: m.seen))
    profiles = [rates["drop_path"] for _, rates in r.inspected]
    assert profiles[:2] == [[0.0, 0.0, 0.0]] * 2
    assert all(p == pytest.approx([0.0, 0.15, 0.3]) for p in profiles[2:])
    assert all(rates["dropout"] == [0.1] * 3 for _, rates in r.inspected)  # not touched by a drop_path schedule
    assert not [m for m in messages if "float dropout attributes" in m]  # DropPath's own drop_prob


def test_manual_optimization_with_max_steps_plans_in_batches():
    """Two optimizers: max_steps=16 optimizer steps are 8 batches; a cutoff of half the run is 4 batches."""
    np = pytest.importorskip("numpy")
    from tests.helpers.configurations import ConfigModule

    [r] = run_job(TrainJob(module=functools.partial(ConfigModule, manual=True),
                           callbacks=[EarlyDropout(p=0.4, cutoff=0.5)], trainer_kwargs={"max_steps": 16},
                           inspect=lambda t, m: m.seen))
    assert r.global_step == 16
    assert [rnd for rnd, _ in r.inspected] == list(range(8))
    expected = np.linspace(0.4, 0, 4).tolist() + [0.0] * 4
    assert [rates["dropout"][0] for _, rates in r.inspected] == expected
