"""DifferentialPrivacy in a real Trainer: clipping against per-sample references, noise scale, exact accounting,
stopping at a budget, refusals, empty Poisson batches, accumulation, bf16, resume, 2-rank DDP."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

pytest.importorskip("opacus")

from lightning_optx.callbacks.differential_privacy import DifferentialPrivacy
from lightning_optx.callbacks.dropout import DropoutSchedule
from lightning_optx.callbacks.grokfast import Grokfast
from lightning_optx.functional import privacy as P
from tests.helpers import TrainJob, assert_tree_equal, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule, make_model, random_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
    pytest.mark.filterwarnings("ignore:.*poisson_sampling=False.*"),
    pytest.mark.filterwarnings("ignore:.*DifferentialPrivacy.seed=.*"),
]

DP_KEY = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp").state_key


class DPModule(TinyModule):
    """TinyModule with plain SGD (update = -lr x gradient) and a loss that is 0, not NaN, on an empty batch."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        per_sample = ((self(x).float() - y) ** 2).mean(dim=1)
        loss = per_sample.mean() if len(per_sample) else per_sample.sum()
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=max(len(per_sample), 1))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class GroupNormModule(DPModule):
    """Linear layers (ghost norms) and GroupNorm (per-sample gradients inside ghost clipping)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GroupNorm(4, 16), nn.Tanh(), nn.Linear(16, 4))


class BatchNormModule(DPModule):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))


class Capture(Callback):
    """Per micro-batch: the batch, the parameters before and after, and the raw (pre-DP) gradients."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._current = {"batch": [t.detach().clone() for t in batch], "batch_idx": batch_idx,
                         "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()}, "raw": None}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._current["raw"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                if p.grad is not None}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._current["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self._current["step"] = trainer.global_step
        self.records.append(self._current)


def captured(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    capture = next(cb for cb in trainer.callbacks if isinstance(cb, Capture))
    dp = next(cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy))
    return {"records": capture.records, "epsilon": dp.epsilon, "noise": dp.resolved_noise_multiplier,
            "sample_rate": dp.sample_rate, "steps": dp.steps, "expected": dp.expected_batch_size,
            "skipped": dp.skipped_over_budget, "optimizer": type(trainer.optimizers[0]).__name__}


def dp_job(cb: DifferentialPrivacy, module: Any = None, callbacks: tuple = (), **trainer_kwargs: Any) -> TrainJob:
    return TrainJob(
        module=module or functools.partial(DPModule, model="mlp", lr=0.1),
        callbacks=[cb, *callbacks],
        trainer_kwargs={"max_epochs": 1, **trainer_kwargs},
        inspect=captured if any(isinstance(c, Capture) for c in callbacks) else None,
    )


def per_sample_gradients(params: dict[str, Tensor], x: Tensor, y: Tensor,
                         net: Any = None) -> list[dict[str, Tensor]]:
    """Per-sample gradients of the per-sample loss, by micro-batches of one (default model: TinyMLP)."""
    model = net() if net is not None else make_model("mlp")
    model.load_state_dict({k.removeprefix("net."): v for k, v in params.items()})
    out = []
    for i in range(len(x)):
        model.zero_grad()
        ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean().backward()
        out.append({f"net.{n}": p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def clipped_sum(grads: list[dict[str, Tensor]], max_grad_norm: float) -> dict[str, Tensor]:
    """Sum of per-sample gradients clipped with Opacus' factor min(1, C / (||g|| + 1e-6))."""
    total: dict[str, Tensor] = {}
    for g in grads:
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g.values()))
        factor = min(1.0, max_grad_norm / (norm.item() + 1e-6))
        for n, t in g.items():
            total[n] = total.get(n, torch.zeros_like(t)) + factor * t
    return total


def update_of(record: dict[str, Any], lr: float, before: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    before = before or record["before"]
    return {n: (before[n] - record["after"][n]) / lr for n in before}


def assert_close_trees(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n].float(), b[n].float(), atol=atol, rtol=1e-4, msg=n)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({}, r"Give exactly one of `noise_multiplier` and `target_epsilon`"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, r"Give exactly one of"),
        ({"noise_multiplier": -1.0}, r"`noise_multiplier` must be a finite float >= 0, got noise_multiplier=-1.0"),
        ({"target_epsilon": 0.0}, r"`target_epsilon` must be a finite float > 0, got target_epsilon=0.0"),
        ({"noise_multiplier": 1.0, "target_delta": 0.0}, r"`target_delta` must be a float in \(0, 1\)"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, r"`max_grad_norm` must be a finite float > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": [1.0]}, r"can be a list only with clipping='per_layer'"),
        ({"noise_multiplier": 1.0, "clipping": "auto"},
         r"`clipping` must be one of \('flat', 'per_layer', 'adaptive'\), got clipping='auto'"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"},
         r"`grad_sample_mode` must be one of \('hooks', 'functorch', 'ghost'\), got grad_sample_mode='ew'"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ghost", "clipping": "per_layer"},
         r"grad_sample_mode='ghost' supports clipping='flat' only"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, r"`accountant` must be one of \('prv', 'rdp'\)"),
        ({"noise_multiplier": 1.0, "stop_at_epsilon": -2}, r"`stop_at_epsilon` must be a finite float > 0"),
        ({"noise_multiplier": 1.0, "loss_reduction": "none"}, r"`loss_reduction` must be 'mean' or 'sum'"),
        ({"noise_multiplier": 1.0, "adaptive_clipping": {"x": 1.0}}, r"need clipping='adaptive'"),
        ({"noise_multiplier": 1.0, "clipping": "adaptive", "adaptive_clipping": {"x": 1.0}},
         r"Unknown `adaptive_clipping` options \['x'\]"),
        ({"noise_multiplier": 1.0, "seed": -1}, r"`seed` must be None or an integer >= 0, got seed=-1"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DifferentialPrivacy(**kwargs)


def test_secure_mode_needs_torchcsprng():
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchcsprng"):
            run_job(dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", secure_mode=True)))
    else:  # pragma: no cover
        pytest.skip("torchcsprng is installed")


# ---------------------------------------------------------------- refusals with a clear reason


@pytest.mark.parametrize(
    ("trainer_kwargs", "pattern"),
    [
        # on CPU Lightning turns precision="16-mixed" into bf16; the plugin forces real fp16 AMP (GradScaler)
        ({"plugins": [MixedPrecision("16-mixed", "cpu")]}, r"precision='16-mixed'.*scales the loss"),
        ({"precision": "16-true"}, r"precision='16-true'"),
        ({"gradient_clip_val": 1.0}, r"unset gradient_clip_val \(got 1.0\)"),
    ],
)
def test_refused_trainer_settings(trainer_kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        run_job(dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), **trainer_kwargs))


class GradientSurgery(Callback):
    """Stands for lightning_optx's GradientSurgery (the refusal goes by class name)."""


@pytest.mark.parametrize("other", [Grokfast(), GradientSurgery()], ids=["Grokfast", "GradientSurgery"])
def test_callbacks_that_break_the_guarantee_are_refused(other):
    name = type(other).__name__
    with pytest.raises(ValueError, match=rf"cannot be combined with {name}: .*Remove one of the two callbacks"):
        run_job(dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), callbacks=(other,)))


def test_manual_optimization_is_refused():
    from tests.helpers.models import TwoOptimizerModule

    with pytest.raises(ValueError, match="needs automatic optimization"):
        run_job(dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), module=TwoOptimizerModule))


def test_batchnorm_is_refused_naming_the_layer_and_the_fix():
    pattern = r"(?s)`net.1` \(BatchNorm1d\): BatchNorm.*ModuleValidator.fix.*fix_model=True"
    with pytest.raises(ValueError, match=pattern):
        run_job(dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), module=BatchNormModule))


def test_fix_model_replaces_batchnorm_before_the_optimizer_is_built():
    def inspect(trainer: pl.Trainer, module: pl.LightningModule) -> Any:
        optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        return {"types": [type(m).__name__ for m in module.net],
                "in_optimizer": all(id(p) in optimizer_params for p in module.parameters())}

    job = dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", fix_model=True), module=BatchNormModule)
    job.inspect = inspect
    [result] = run_job(job)
    assert result.inspected["types"] == ["Linear", "GroupNorm", "Tanh", "Linear"]
    assert result.inspected["in_optimizer"]  # the optimizer was built on the fixed model
    assert result.global_step == 8


def test_lightning_distributed_sampler_injection_recreates_the_poisson_loader():
    """Under DDP with use_distributed_sampler=True (the default) Lightning re-creates the training loader and its
    batch sampler from their saved init arguments with a DistributedSampler. This test calls Lightning's private
    helpers for that path (``_replace_dunder_methods``, ``_update_dataloader``) on purpose: it fails, in the fast
    single-process suite, if Lightning changes it. The 2-process tests exercise the same path end to end."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", seed=5)
    cb._token = "token"
    trainer = SimpleNamespace(world_size=2, global_rank=1, accumulate_grad_batches=1, current_epoch=0)
    data = random_dataset("mlp")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = cb._poisson_loader(DataLoader(data, batch_size=4, shuffle=True), trainer)
    injected = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True)
    recreated = _update_dataloader(loader, injected, mode=RunningStage.TRAINING)
    assert recreated is not loader
    assert isinstance(recreated.batch_sampler, P.PoissonBatchSampler)
    assert recreated.batch_sampler is not loader.batch_sampler and recreated.batch_sampler.token == "token"
    assert list(recreated.batch_sampler) == list(loader.batch_sampler)
    for a, b in zip(recreated, loader):
        assert all(x.equal(y) for x, y in zip(a, b))


# ---------------------------------------------------------------- per-sample clipping


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_noiseless_update_is_the_mean_of_clipped_per_sample_gradients(mode):
    """Fixed batches of 8 (no Poisson), noise 0: the update is the mean of the clipped microbatch-of-one grads."""
    lr, clip = 0.1, 0.05  # small C: every sample is clipped
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, accountant="rdp",
                             poisson_sampling=False)
    [result] = run_job(dp_job(cb, callbacks=(Capture(),), max_steps=3))
    records = result.inspected["records"]
    assert len(records) == 3
    for rec in records:
        x, y = rec["batch"]
        assert len(x) == 8
        grads = per_sample_gradients(rec["before"], x, y)
        assert all(math.sqrt(sum((t**2).sum().item() for t in g.values())) > clip for g in grads)
        expected = {n: t / 8 for n, t in clipped_sum(grads, clip).items()}
        assert_close_trees(update_of(rec, lr), expected)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_groupnorm_and_empty_batches_give_the_clipped_sum(mode):
    """Linear layers (ghost norms) next to GroupNorm (per-sample gradients), Poisson batches of expected size 2,
    some empty: noise 0, the update is the clipped sum / 2 (0 for an empty batch)."""
    lr, clip = 0.1, 0.05
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, accountant="rdp")
    module = functools.partial(GroupNormModule, model="mlp", lr=lr, batch_size=2, data_size=32)
    [result] = run_job(dp_job(cb, module=module, callbacks=(Capture(),), max_epochs=2))
    records = result.inspected["records"]
    assert result.inspected["expected"] == 2.0 and len(records) == 32
    sizes = [len(r["batch"][0]) for r in records]
    assert 0 in sizes and max(sizes) >= 3
    for rec in records:
        grads = per_sample_gradients(rec["before"], *rec["batch"], net=lambda: GroupNormModule(model="mlp").net)
        got = update_of(rec, lr)
        if grads:
            assert_close_trees(got, {n: t / 2.0 for n, t in clipped_sum(grads, clip).items()})
        else:
            assert all(torch.count_nonzero(t) == 0 for t in got.values())


def test_every_sample_gradient_is_clipped_to_max_grad_norm():
    """Batches of one sample, noise 0: each update is that sample's clipped gradient, of norm <= C (= C if clipped)."""
    lr, clip = 0.1, 0.2
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp", poisson_sampling=False)
    module = functools.partial(DPModule, model="mlp", lr=lr, batch_size=1, data_size=16)
    [result] = run_job(dp_job(cb, module=module, callbacks=(Capture(),)))
    records = result.inspected["records"]
    assert len(records) == 16
    clipped = 0
    for rec in records:
        x, y = rec["batch"]
        [raw] = per_sample_gradients(rec["before"], x, y)
        raw_norm = math.sqrt(sum((t**2).sum().item() for t in raw.values()))
        norm = math.sqrt(sum((t.double()**2).sum().item() for t in update_of(rec, lr).values()))
        assert norm <= clip * (1 + 1e-5)
        if raw_norm > clip:
            clipped += 1
            assert norm == pytest.approx(clip, rel=1e-4)
        else:
            assert norm == pytest.approx(raw_norm, rel=1e-4)
    assert clipped >= 4


@pytest.mark.parametrize(("mode", "accumulate"), [("hooks", 1), ("hooks", 2), ("ghost", 2)])
def test_poisson_update_is_clipped_sum_over_expected_batch(mode, accumulate):
    """Poisson batches (variable size), noise 0: update = sum of clipped per-sample grads / (q N), with the
    micro-batches of an accumulated step counted as one batch."""
    lr, clip = 0.1, 0.05
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp", grad_sample_mode=mode)
    module = functools.partial(DPModule, model="mlp", lr=lr, batch_size=8 // accumulate)
    [result] = run_job(dp_job(cb, module=module, callbacks=(Capture(),), accumulate_grad_batches=accumulate))
    info = result.inspected
    assert info["sample_rate"] == 0.125 and info["expected"] == 8.0
    records = info["records"]
    assert len(records) == 8 * accumulate and result.global_step == 8
    sizes = {len(r["batch"][0]) for r in records}
    assert len(sizes) > 1  # Poisson: the batch size varies
    for i in range(0, len(records), accumulate):
        group = records[i:i + accumulate]
        before = group[0]["before"]
        grads = [g for r in group for g in per_sample_gradients(before, *r["batch"])]
        expected = {n: t / 8.0 for n, t in clipped_sum(grads, clip).items()} if grads else None
        got = update_of(group[-1], lr, before)
        if expected is None:
            assert all(torch.count_nonzero(t) == 0 for t in got.values())
        else:
            assert_close_trees(got, expected)


@pytest.mark.parametrize(("mode", "accumulate"), [("hooks", 1), ("hooks", 2), ("ghost", 2)])
def test_noise_std_is_sigma_times_clip_over_expected_batch(mode, accumulate):
    """One step of a 17k-parameter model: update - clean update ~ N(0, (sigma C / (q N))^2) per coordinate,
    once per optimizer step however many micro-batches it has."""
    lr, clip, sigma = 1.0, 0.5, 2.0
    cb = DifferentialPrivacy(noise_multiplier=sigma, max_grad_norm=clip, accountant="rdp", poisson_sampling=False,
                             grad_sample_mode=mode)

    class Wide(DPModule):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.net = make_model("wide_mlp")

    module = functools.partial(Wide, model="mlp", lr=lr, batch_size=8 // accumulate)
    [result] = run_job(dp_job(cb, module=module, callbacks=(Capture(),), max_steps=1,
                              accumulate_grad_batches=accumulate))
    records = result.inspected["records"]
    before = records[0]["before"]
    model = make_model("wide_mlp")
    model.load_state_dict({k.removeprefix("net."): v for k, v in before.items()})
    total = {f"net.{n}": torch.zeros_like(p) for n, p in model.named_parameters()}
    for rec in records:
        x, y = rec["batch"]
        for i in range(len(x)):
            model.zero_grad()
            ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean().backward()
            g = {f"net.{n}": p.grad for n, p in model.named_parameters()}
            norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
            for n in total:
                total[n] += min(1.0, clip / (norm.item() + 1e-6)) * g[n]
    noise = torch.cat([(update_of(records[-1], lr, before)[n] - total[n] / 8).flatten() for n in total])
    assert noise.numel() > 17_000
    assert noise.mean().abs().item() < 0.05 * sigma * clip / 8
    assert noise.std().item() == pytest.approx(sigma * clip / 8, rel=0.05)


def test_empty_poisson_batches_train_and_count():
    """Batch size 1 of 64 samples: q = 1/64, about a third of the batches are empty; every step is accounted."""
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    module = functools.partial(DPModule, model="mlp", batch_size=1)
    [result] = run_job(dp_job(cb, module=module, callbacks=(Capture(),)))
    sizes = [len(r["batch"][0]) for r in result.inspected["records"]]
    assert len(sizes) == 64 and sizes.count(0) >= 10
    assert result.global_step == 64 and result.callback_states[DP_KEY]["steps"] == 64
    assert all(torch.isfinite(p).all() for p in result.params.values())


@pytest.mark.parametrize("clipping", ["per_layer", "adaptive"])
def test_other_clipping_modes_train(clipping):
    options = {"unclipped_num_std": 1.0} if clipping == "adaptive" else None  # default (batch / 20) is < sigma / 2
    cb = DifferentialPrivacy(noise_multiplier=0.5, accountant="rdp", clipping=clipping, adaptive_clipping=options)
    module = functools.partial(DPModule, model="mlp", batch_size=2)
    [result] = run_job(dp_job(cb, module=module, callbacks=(Capture(),)))
    assert result.global_step == 32 and result.inspected["steps"] == 32
    assert all(torch.isfinite(p).all() for p in result.params.values())
    state = result.callback_states[DP_KEY]
    assert (state["max_grad_norm"] is not None) == (clipping == "adaptive")


# ---------------------------------------------------------------- accounting


def test_epsilon_is_the_accountants_for_the_steps_taken_and_logged_every_step():
    cb = DifferentialPrivacy(noise_multiplier=1.1, accountant="rdp")
    [result] = run_job(dp_job(cb, callbacks=(Capture(),), max_epochs=2))
    steps = result.global_step
    assert steps == 16
    state = result.callback_states[DP_KEY]
    assert state["history"] == [(1.1, 0.125, 16)]
    assert result.inspected["epsilon"] == P.make_accountant("rdp", [(1.1, 0.125, 16)]).get_epsilon(1e-5)
    logged = result.series("dp/epsilon")
    assert len(logged) == steps
    for k, value in enumerate(logged, start=1):
        assert value == pytest.approx(P.epsilon(1.1, 0.125, k, 1e-5, "rdp"), rel=1e-6)


def test_prv_accountant_and_log_cadence():
    """PRV (Opacus' default) is exact too; epsilon is computed at the steps Lightning writes logs."""
    cb = DifferentialPrivacy(noise_multiplier=1.0)
    [result] = run_job(dp_job(cb, callbacks=(Capture(),), log_every_n_steps=4))
    assert result.inspected["epsilon"] == P.make_accountant("prv", [(1.0, 0.125, 8)]).get_epsilon(1e-5)
    steps_logged = [s for s, m in result.metrics if "dp/epsilon" in m]
    assert steps_logged == [3, 7]  # Lightning's 0-based logger steps of optimizer steps 4 and 8
    assert result.series("dp/epsilon")[-1] == pytest.approx(result.inspected["epsilon"], rel=1e-6)


def test_target_epsilon_calibrates_the_noise_for_the_planned_steps():
    cb = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")
    [result] = run_job(dp_job(cb, callbacks=(Capture(),), max_epochs=3))
    sigma = result.inspected["noise"]
    assert sigma == P.noise_multiplier_for_epsilon(3.0, 1e-5, 0.125, 24, "rdp")
    assert 3.0 - 0.01 <= result.inspected["epsilon"] <= 3.0


def test_stop_at_epsilon_stops_before_the_step_that_would_exceed_it():
    budget = 3.0
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", stop_at_epsilon=budget)
    [result] = run_job(dp_job(cb, callbacks=(Capture(),), max_epochs=10))
    steps = result.inspected["steps"]
    assert 0 < steps < 80 and result.global_step == steps
    assert P.epsilon(1.0, 0.125, steps, 1e-5, "rdp") <= budget < P.epsilon(1.0, 0.125, steps + 1, 1e-5, "rdp")
    assert result.series("dp/epsilon")[-1] == pytest.approx(P.epsilon(1.0, 0.125, steps, 1e-5, "rdp"), rel=1e-6)


def test_budget_guard_refuses_steps_when_training_is_forced_on():
    """min_steps makes Lightning ignore should_stop: the DP optimizer itself refuses the steps over budget."""
    budget = 2.0
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", stop_at_epsilon=budget)
    with pytest.warns(UserWarning, match="the DP optimizer skips it"):
        [result] = run_job(dp_job(cb, callbacks=(Capture(),), max_epochs=4, min_steps=24))
    info = result.inspected
    assert result.global_step >= 24 and info["skipped"] >= 1
    assert info["epsilon"] <= budget < P.epsilon(1.0, 0.125, info["steps"] + 1, 1e-5, "rdp")
    last = [r for r in info["records"] if r["step"] > info["steps"]]
    assert last and all(r["before"][n].equal(r["after"][n]) for r in last for n in r["before"])  # no update


# ---------------------------------------------------------------- precision, datamodule, other callbacks


@pytest.mark.parametrize(("precision", "model"), [("bf16-mixed", "transformer"), ("bf16-true", "mlp")])
def test_bf16_trains(precision, model):
    """bf16 (no loss scaling) works; fp32 is what every other test runs."""
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", max_grad_norm=1.0)
    module = functools.partial(DPModule, model=model, lr=0.05)
    [result] = run_job(dp_job(cb, module=module, precision=precision, max_steps=4))
    assert result.global_step == 4 == result.callback_states[DP_KEY]["steps"]
    assert all(torch.isfinite(p).all() for p in result.params.values())


def test_datamodule_training_loader_is_replaced():
    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(random_dataset("mlp", n=48), batch_size=6, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(random_dataset("mlp", n=16), batch_size=8)

    class WithVal(DPModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), y))

    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    module, data = WithVal(model="mlp"), Data()
    trainer = pl.Trainer(callbacks=[cb], max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert cb.sample_rate == 6 / 48 and cb.steps == 16 == trainer.global_step
    assert "val_loss" in trainer.callback_metrics
    assert "train_dataloader" not in data.__dict__  # restored after fit
    assert not hasattr(module, "autograd_grad_sample_hooks")  # Opacus hooks removed
    assert not any(hasattr(p, "grad_sample") for p in module.parameters())


def test_datamodule_from_datasets_keeps_its_own_loader_method():
    """from_datasets sets `train_dataloader` as an instance attribute: it is wrapped for fit and given back after."""
    data = pl.LightningDataModule.from_datasets(train_dataset=random_dataset("mlp", n=32), batch_size=8)
    own = data.__dict__.get("train_dataloader")
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    trainer = pl.Trainer(callbacks=[cb], max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(DPModule(model="mlp"), datamodule=data)
    assert cb.steps == 4 and cb.sample_rate == 0.25
    assert data.__dict__.get("train_dataloader") is own
    assert not isinstance(data.train_dataloader().batch_sampler, P.PoissonBatchSampler)


def test_works_with_dropout_schedule_and_resumes_bit_for_bit(tmp_path):
    cbs = [DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", seed=3),
           DropoutSchedule("early", p=0.3, cutoff=0.5)]
    job = TrainJob(module=functools.partial(DPModule, model="dropout_mlp"), callbacks=cbs)
    straight, _ = check_resume_equivalence(job, total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path))
    assert straight[0].callback_states[DP_KEY]["history"] == [(1.0, 0.125, 16)]


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_resume_continues_the_accountant_bit_for_bit(tmp_path, mode):
    # hooks: target_epsilon, whose calibrated noise must be restored, not recalibrated; ghost: with accumulation
    cb = DifferentialPrivacy(target_epsilon=4.0, accountant="rdp", seed=3) if mode == "hooks" else \
        DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode, seed=3)
    job = TrainJob(module=functools.partial(DPModule, model="mlp"), callbacks=[cb],
                   trainer_kwargs={"accumulate_grad_batches": 2} if mode == "ghost" else {})
    straight, resumed = check_resume_equivalence(job, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    steps = straight[0].global_step
    state = resumed[0].callback_states[DP_KEY]
    assert state["steps"] == steps and sum(n for _, _, n in state["history"]) == steps
    # the resumed run's first logged epsilon continues from the checkpoint, it does not restart at step 1
    first_resumed = resumed[0].series("dp/epsilon")[0]
    assert first_resumed > straight[0].series("dp/epsilon")[steps // 3 - 1]


def test_loading_state_of_another_accountant_is_refused():
    state = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp").state_dict()
    with pytest.raises(ValueError, match="accountant='rdp' differs from accountant='prv'"):
        DifferentialPrivacy(noise_multiplier=1.0, accountant="prv").load_state_dict(state)


# ---------------------------------------------------------------- 2-rank DDP


class DDPCapture(Capture):
    """Also records whether DDP's reducer was switched off at backward time."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current["sync"] = bool(getattr(trainer.strategy.model, "require_backward_grad_sync", True))


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["hooks", pytest.param("ghost", marks=pytest.mark.slow)])
def test_ddp_noiseless_update_is_the_global_clipped_mean_and_ddp_does_not_reduce(mode):
    """2 ranks, Poisson shards, noise 0: both ranks apply sum(clipped grads of both ranks' samples) / (q N); the
    gradients before the DP step were not all-reduced by DDP (they differ across ranks)."""
    lr, clip = 0.1, 0.05
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp", grad_sample_mode=mode)
    job = dp_job(cb, module=functools.partial(DPModule, model="mlp", lr=lr, batch_size=4), callbacks=(DDPCapture(),),
                 max_steps=4)
    ranks = run_job(job, world_size=2)
    rec0, rec1 = ranks[0].inspected["records"], ranks[1].inspected["records"]
    assert len(rec0) == len(rec1) == 4
    raw_differs = False
    for a, b in zip(rec0, rec1):
        assert not a["sync"] and not b["sync"]
        ids0 = {tuple(r.tolist()) for r in a["batch"][0]}
        ids1 = {tuple(r.tolist()) for r in b["batch"][0]}
        assert not ids0 & ids1  # disjoint shards
        assert_tree_equal(a["after"], b["after"], "parameters of rank 0 vs rank 1")
        grads = per_sample_gradients(a["before"], *a["batch"]) + per_sample_gradients(b["before"], *b["batch"])
        expected = {n: t / 8.0 for n, t in clipped_sum(grads, clip).items()}
        if grads:
            assert_close_trees(update_of(a, lr), expected)
        if a["raw"] and b["raw"] and any(not a["raw"][n].equal(b["raw"][n]) for n in a["raw"]):
            raw_differs = True
    assert raw_differs


@pytest.mark.multiprocess
def test_ddp_ranks_identical_every_step_and_epsilon_equals_single_process():
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    job = dp_job(cb, module=functools.partial(DPModule, model="mlp", batch_size=4), callbacks=(Capture(),),
                 max_epochs=2)
    ranks = run_job(job, world_size=2)
    rec0, rec1 = ranks[0].inspected["records"], ranks[1].inspected["records"]
    assert len(rec0) == len(rec1) == 16
    for a, b in zip(rec0, rec1):
        assert_tree_equal(a["after"], b["after"], f"parameters after step {a['step']}")
    [single] = run_job(dp_job(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"),
                              module=functools.partial(DPModule, model="mlp", batch_size=8), max_epochs=2))
    assert single.global_step == ranks[0].global_step == 16
    for r in ranks:
        assert r.callback_states[DP_KEY]["history"] == single.callback_states[DP_KEY]["history"] == [(1.0, 0.125, 16)]
        assert r.series("dp/epsilon") == single.series("dp/epsilon")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_resume_is_bit_exact(tmp_path):
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", seed=3)
    job = TrainJob(module=functools.partial(DPModule, model="mlp", batch_size=4), callbacks=[cb])
    check_resume_equivalence(job, total_epochs=2, split_epoch=1, tmp_dir=str(tmp_path), world_size=2)

