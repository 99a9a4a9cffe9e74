"""DifferentialPrivacy as a privacy engineer checks it: secret randomness by default (and reproducible on request),
every data source Poisson-sampled alike, resumes that keep the budget, the Opacus internals guard."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, WeightedRandomSampler

pytest.importorskip("opacus")

from lightning_optx import DifferentialPrivacy
from lightning_optx.callbacks.differential_privacy import opacus_internals
from lightning_optx.functional import privacy as P
from tests.callbacks.test_differential_privacy import DP_KEY, Capture, DPModule
from tests.helpers import TrainJob, assert_tree_equal, run_job
from tests.helpers.models import random_dataset
from tests.helpers.resume import StopAfterEpoch
from tests.helpers.runner import _spawn

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
    pytest.mark.filterwarnings("ignore:.*DifferentialPrivacy.seed=.*"),
    pytest.mark.filterwarnings("ignore:.*re-calibrated noise_multiplier.*"),
]


def _job(seed: int | None, **trainer_kwargs: Any) -> TrainJob:
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", seed=seed)
    return TrainJob(module=functools.partial(DPModule, model="mlp", lr=0.1), callbacks=[cb],
                    trainer_kwargs={"max_epochs": 1, **trainer_kwargs})


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not a[n].equal(b[n]) for n in a)


# ---------------------------------------------------------------- secret randomness


def test_default_fits_under_the_same_seed_everything_differ_and_reproducible_ones_match():
    """seed_everything(7) before both fits (the runner does it): the default draws secret batches and noise."""
    [a], [b] = run_job(_job(None, max_steps=3)), run_job(_job(None, max_steps=3))
    assert _differ(a.params, b.params)
    [c], [d] = run_job(_job(11, max_steps=3)), run_job(_job(11, max_steps=3))
    assert_tree_equal(c.params, d.params, "parameters of two reproducible fits")


class _IndexedModule(pl.LightningModule):
    """Records the sample indices of every batch; optionally sizes a OneCycleLR from estimated_stepping_batches
    in configure_optimizers (Lightning then builds the training loader inside strategy.setup, before on_fit_start)."""

    def __init__(self, scheduler: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.scheduler = scheduler
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.seen.append(index.tolist())
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.scheduler:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=total)}


def _default_fit_batches(scheduler: bool) -> list[list[int]]:
    pl.seed_everything(1, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)), torch.arange(64))
    module = _IndexedModule(scheduler)
    trainer = pl.Trainer(callbacks=[DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")], max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=8, shuffle=True))
    assert trainer.train_dataloader.batch_sampler.generator is not None  # a secret generator, not derived seeds
    return module.seen


@pytest.mark.parametrize("scheduler", [False, True], ids=["plain", "estimated_stepping_batches_scheduler"])
def test_default_fits_under_the_same_seed_everything_draw_different_batches(scheduler):
    """The Poisson batches are secret even when configure_optimizers builds the loader before on_fit_start."""
    a, b = _default_fit_batches(scheduler), _default_fit_batches(scheduler)
    assert len(a) == len(b) == 8
    assert a != b


def test_poisson_sampler_never_falls_back_to_a_default_seed():
    with pytest.raises(ValueError, match=r"needs `generator`.*or an explicit `seed`"):
        P.PoissonBatchSampler(range(10), num_samples=10, sample_rate=0.5, steps=2)


def _mt_reachable_from_a_32_bit_seed(words: list[int]) -> bool:
    """Whether 624 untwisted Mersenne-Twister words are the initialisation of some 32-bit seed (every seed's
    state follows state[i] = 1812433253 * (state[i-1] ^ (state[i-1] >> 30)) + i mod 2^32)."""
    return all(words[i] == (1812433253 * (words[i - 1] ^ (words[i - 1] >> 30)) + i) & 0xFFFFFFFF
               for i in range(1, len(words)))


def test_secret_cpu_generators_hold_a_full_mersenne_twister_state_not_a_32_bit_seed():
    from lightning_optx.callbacks.differential_privacy import randomness

    # the limitation the filler exists for: the CPU generator keeps only the low 32 bits of manual_seed
    low = torch.rand(8, generator=torch.Generator().manual_seed(123456789))
    assert torch.equal(low, torch.rand(8, generator=torch.Generator().manual_seed(123456789 + (7 << 32))))
    # the filler's state is what it wrote, and no 32-bit seed produces it (a seeded state always does the above)
    entropy = os.urandom(4 * 624)
    g = randomness.fill_mt19937_state(torch.Generator(), entropy)
    words = randomness.mt19937_words(g)
    assert words == list(memoryview(entropy).cast("I"))
    assert _mt_reachable_from_a_32_bit_seed(randomness.mt19937_words(torch.Generator().manual_seed(2**32 - 5)))
    assert not _mt_reachable_from_a_32_bit_seed(words)
    # states differing in one word (here the last, beyond any 32-bit seed's reach) draw different streams
    other = bytearray(entropy)
    other[-1] ^= 0x80
    h = randomness.fill_mt19937_state(torch.Generator(), bytes(other))
    assert not torch.equal(torch.rand(1000, generator=g), torch.rand(1000, generator=h))
    # what the callback draws from: sampling and noise generators on CPU are filled from os.urandom
    r = randomness.Randomness(seed=None)
    r.start(torch.device("cpu"))
    for generator in (r.sampling, r.noise):
        assert not _mt_reachable_from_a_32_bit_seed(randomness.mt19937_words(generator))
    with pytest.raises(ValueError, match="`entropy` must be 2496 bytes"):
        randomness.fill_mt19937_state(torch.Generator(), b"short")


def test_resumes_from_one_checkpoint_differ_by_default_and_match_when_reproducible(tmp_path):
    for seed, expect_equal in ((None, False), (11, True)):
        ckpt = str(tmp_path / f"seed{seed}.ckpt")
        first = dataclasses.replace(_job(seed, max_epochs=2), save_checkpoint_to=ckpt,
                                    callbacks=[*_job(seed).callbacks, StopAfterEpoch(1)])
        run_job(first)
        [a] = run_job(dataclasses.replace(_job(seed, max_epochs=2), ckpt_path=ckpt))
        [b] = run_job(dataclasses.replace(_job(seed, max_epochs=2), ckpt_path=ckpt))
        assert a.global_step == b.global_step == 16
        assert _differ(a.params, b.params) != expect_equal, f"seed={seed}"


def test_checkpoint_holds_no_seed_and_reproducible_mode_warns():
    [result] = run_job(_job(None, max_steps=2))
    state = result.callback_states[DP_KEY]
    assert not any("seed" in key for key in state), state.keys()
    with pytest.warns(UserWarning, match=r"seed=11.*subtract the noise"):
        run_job(_job(11, max_steps=1))
    with pytest.raises(ValueError, match="`seed` must be None with secure_mode=True"):
        DifferentialPrivacy(noise_multiplier=1.0, seed=3, secure_mode=True)


# ---------------------------------------------------------------- any data source


class _Data(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_dataset("mlp"), batch_size=4, shuffle=True)


class _NoLoaderModule(DPModule):
    train_dataloader = None  # type: ignore[assignment]


def fit_from_source(source: str, world_size: int) -> dict[str, Any]:
    """One reproducible fit whose training data comes from ``source``; its batches, epsilon and parameters."""
    pl.seed_everything(3, verbose=False)
    capture = Capture()
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", seed=5)
    module = DPModule(model="mlp", lr=0.1, batch_size=4) if source == "hook" else _NoLoaderModule(model="mlp", lr=0.1)
    trainer = pl.Trainer(callbacks=[cb, capture], max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         devices=world_size, strategy="ddp" if world_size > 1 else "auto")
    if source == "hook":
        trainer.fit(module)
    elif source == "train_dataloaders":
        trainer.fit(module, train_dataloaders=DataLoader(random_dataset("mlp"), batch_size=4, shuffle=True))
    else:
        trainer.fit(module, datamodule=_Data())
    return {"batches": [rec["batch"][0] for rec in capture.records], "epsilon": cb.epsilon,
            "history": cb.accountant.history, "rate": cb.sample_rate,
            "params": {n: p.detach().clone() for n, p in module.named_parameters()}}


def _assert_same_sampling(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["rate"] == b["rate"] and a["history"] == b["history"] and a["epsilon"] == b["epsilon"]
    assert len(a["batches"]) == len(b["batches"]) > 0
    assert [len(x) for x in a["batches"]] == [len(x) for x in b["batches"]]
    assert all(x.equal(y) for x, y in zip(a["batches"], b["batches"]))
    assert_tree_equal(a["params"], b["params"], "parameters")


def test_every_data_source_gets_the_same_poisson_batches_and_epsilon():
    hook = fit_from_source("hook", 1)
    assert hook["rate"] == 4 / 64 and hook["history"] == [(1.0, 4 / 64, 16)]
    assert len({len(b) for b in hook["batches"]}) > 1  # Poisson: the batch sizes vary
    for source in ("train_dataloaders", "datamodule"):
        _assert_same_sampling(hook, fit_from_source(source, 1))


def fit_from_sources(sources: tuple[str, ...], world_size: int) -> dict[str, dict[str, Any]]:
    """Several fits in one process (one process start-up for all): ``{source: fit_from_source(...)}``."""
    return {source: fit_from_source(source, world_size) for source in sources}


def _spawned_sources(sources: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    ranks = _spawn(fit_from_sources, (sources, 2), 2, 600)
    assert not any("__error__" in r for r in ranks), ranks
    return {source: [r[source] for r in ranks] for source in sources}


@pytest.mark.multiprocess
def test_fit_train_dataloaders_on_two_ranks_samples_like_the_hook():
    runs = _spawned_sources(("hook", "train_dataloaders"))
    for rank in (0, 1):
        _assert_same_sampling(runs["hook"][rank], runs["train_dataloaders"][rank])
    assert runs["hook"][0]["rate"] == 8 / 64


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fit_datamodule_on_two_ranks_samples_like_the_hook():
    runs = _spawned_sources(("hook", "datamodule"))
    for rank in (0, 1):
        _assert_same_sampling(runs["hook"][rank], runs["datamodule"][rank])


class _Stream(IterableDataset):
    def __iter__(self) -> Any:
        return iter(random_dataset("mlp"))


@pytest.mark.parametrize(("make_loader", "pattern"), [
    (lambda d: DataLoader(_Stream(), batch_size=4), r"IterableDataset _Stream.*poisson_sampling=False"),
    (lambda d: DataLoader(d, batch_sampler=type("MyBatches", (BatchSampler,), {})(SequentialSampler(d), 4, False)),
     r"custom batch sampler \(MyBatches\).*poisson_sampling=False"),
    (lambda d: DataLoader(d, batch_size=4, sampler=WeightedRandomSampler([1.0] * len(d), len(d))),
     r"custom sampler \(WeightedRandomSampler\).*poisson_sampling=False"),
    (lambda d: [DataLoader(d, batch_size=4), DataLoader(d, batch_size=4)], r"one torch DataLoader, got list"),
], ids=["iterable", "batch_sampler", "weighted_sampler", "two_loaders"])
def test_loaders_that_cannot_be_rebuilt_are_refused_naming_the_fix(make_loader, pattern):
    trainer = pl.Trainer(callbacks=[DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")], max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match=pattern):
        trainer.fit(_NoLoaderModule(model="mlp"), train_dataloaders=make_loader(random_dataset("mlp")))


# ---------------------------------------------------------------- restarts keep the budget


def resize_job(world_size: int, seed: int | None = None, **kwargs: Any) -> TrainJob:
    cb = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp", target_delta=1e-3, seed=seed)
    return TrainJob(module=functools.partial(DPModule, model="mlp", lr=0.1, batch_size=8), callbacks=[cb],
                    trainer_kwargs={"max_epochs": 4}, **kwargs)


@pytest.mark.slow  # the re-calibration itself is checked in the default run below (accountant level)
@pytest.mark.multiprocess
def test_resume_on_twice_the_ranks_recalibrates_and_ends_within_target_epsilon(tmp_path):
    ckpt = str(tmp_path / "one_rank.ckpt")
    first = resize_job(1, save_checkpoint_to=ckpt)
    first = dataclasses.replace(first, callbacks=[*first.callbacks, StopAfterEpoch(2)])
    [half] = run_job(first)
    before = half.callback_states[DP_KEY]
    assert before["history"][0][1:] == (8 / 64, 16)
    sigma = before["noise_multiplier"]
    ranks = run_job(resize_job(2, ckpt_path=ckpt), world_size=2)
    for r in ranks:
        state = r.callback_states[DP_KEY]
        eps = P.epsilon_of_history(state["history"], 1e-3, "rdp")
        assert eps <= 3.0
        assert state["history"][0] == before["history"][0]
        new_sigma, new_rate, new_steps = state["history"][-1]
        assert new_rate == 16 / 64 and new_steps == 8 and new_sigma > sigma
    # without re-calibration the same resume would have overshot the target
    assert P.epsilon_of_history([*before["history"], (sigma, 16 / 64, 8)], 1e-3, "rdp") > 3.0


def test_resume_with_a_fixed_noise_multiplier_at_another_sample_rate_is_refused():
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    state = {**DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp").state_dict(),
             "history": [(1.0, 0.25, 4)], "steps": 4, "sample_rate": 0.25, "steps_per_epoch": 4}
    cb.load_state_dict(state)
    trainer = pl.Trainer(callbacks=[cb], max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match=r"sample rate 0.25, this run samples at 0.125.*pass target_epsilon"):
        trainer.fit(DPModule(model="mlp"))


def test_recalibrated_noise_lands_the_whole_run_within_the_target():
    history = [(1.2, 0.125, 16)]
    sigma = P.noise_multiplier_for_remaining(3.0, 1e-3, history, 0.25, 8, accountant="rdp")
    final = P.epsilon_of_history([*history, (sigma, 0.25, 8)], 1e-3, "rdp")
    assert 3.0 - 0.01 <= final <= 3.0
    with pytest.raises(ValueError, match="already taken spent epsilon"):
        P.noise_multiplier_for_remaining(0.5, 1e-3, history, 0.25, 8, accountant="rdp")


# ---------------------------------------------------------------- Opacus internals


def test_every_opacus_internal_the_callback_relies_on_is_where_it_was_checked():
    import opacus

    missing = opacus_internals.missing_internals() + opacus_internals.probe_hook_attributes()
    assert not missing, (
        f"Opacus {opacus.__version__} moved internals DifferentialPrivacy relies on: {missing}. Re-check "
        "lightning_optx/callbacks/differential_privacy/opacus_internals.py against this version before widening "
        f"the supported range (checked: {opacus_internals.OPACUS_CHECKED})."
    )
    low, high = opacus_internals.OPACUS_CHECKED
    assert tuple(map(int, low.split("."))) <= tuple(map(int, opacus.__version__.split(".")[:3])) \
        <= tuple(map(int, high.split("."))), f"opacus {opacus.__version__} is outside the checked range {low}..{high}"


def test_a_moved_internal_fails_with_a_message_naming_it(monkeypatch):
    monkeypatch.setattr(opacus_internals, "OPACUS_INTERNALS",
                        (*opacus_internals.OPACUS_INTERNALS, ("opacus.optimizers", "DPOptimizer._moved_away", "x")))
    with pytest.raises(ImportError, match=r"opacus.optimizers:DPOptimizer._moved_away.*checked against opacus"):
        DifferentialPrivacy(noise_multiplier=1.0)


def test_the_requirement_has_an_upper_bound():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")) as f:
        text = f.read()
    assert '"opacus>=1.6,<1.7"' in text


def test_package_doctests():
    import doctest

    from lightning_optx.callbacks.differential_privacy import callback, randomness

    for module in (opacus_internals, randomness, callback):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ---------------------------------------------------------------- a sample rate that changes within one fit


class _BatchSizeScheduleModule(pl.LightningModule):
    """train_dataloader() with batch size 4 in epoch 0 and 16 afterwards (a batch-size warm-up): with
    reload_dataloaders_every_n_epochs=1 the Poisson sample rate changes from 1/16 to 1/4 within the fit."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        batch_size = 4 if self.trainer.current_epoch == 0 else 16
        data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        return DataLoader(data, batch_size=batch_size)


def _reloading_fit(cb: DifferentialPrivacy, max_epochs: int, *extra: Any) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[cb, *extra], max_epochs=max_epochs, reload_dataloaders_every_n_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(_BatchSizeScheduleModule())
    return trainer


def test_a_rate_change_within_a_fit_recalibrates_the_remaining_noise_within_target_epsilon():
    cb = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    with pytest.warns(UserWarning, match=r"reloaded with sample rate 0\.25 \(was 0\.0625\); re-calibrated"):
        trainer = _reloading_fit(cb, 3)
    rates = [q for _, q, _ in cb.accountant.history]
    assert rates == [0.0625, 0.25]  # 16 steps at 1/16, then 2 epochs of 4 steps at 1/4
    assert cb.steps == trainer.global_step == 24
    assert cb.epsilon <= 3.0  # it ended at 5.19 when the noise calibrated for 1/16 was kept


def test_a_rate_change_within_a_fit_with_a_fixed_noise_multiplier_is_refused():
    cb = DifferentialPrivacy(noise_multiplier=1.0, stop_at_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    with pytest.raises(ValueError, match=r"reloaded during the fit with sample rate 0\.25 \(was 0\.0625.*"
                                         r"noise_multiplier=1\.0 is fixed.*pass target_epsilon"):
        _reloading_fit(cb, 20)
    assert cb.epsilon <= 3.0 and {q for _, q, _ in cb.accountant.history} == {0.0625}


class _RaiseRateBehindTheGuardsBack(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            trainer.callbacks[0].sample_rate = 0.25  # as if the data changed without the callback rebuilding it


def test_the_budget_guard_checks_epsilon_for_the_current_rate_not_a_step_count():
    """stop_at_epsilon is honoured when the rate changes after the step count was computed."""
    cb = DifferentialPrivacy(noise_multiplier=1.0, stop_at_epsilon=3.0, target_delta=1e-3, accountant="rdp")
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[cb, _RaiseRateBehindTheGuardsBack()], max_epochs=50, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(_BatchSizeScheduleModule(), train_dataloaders=DataLoader(data, batch_size=4))
    assert [q for _, q, _ in cb.accountant.history] == [0.0625, 0.25]
    assert cb.epsilon <= 3.0
    one_more = P.epsilon_of_history([*cb.accountant.history, (1.0, 0.25, 1)], 1e-3, "rdp")
    assert one_more > 3.0  # it stopped at the last step within the budget


def test_a_second_fit_of_a_spent_callback_without_a_checkpoint_is_refused():
    """It used to train 1 step of 16 silently: the budget of the first fit was already spent."""
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    cb = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-3, accountant="rdp")

    def fit() -> pl.Trainer:
        trainer = pl.Trainer(callbacks=[cb], max_epochs=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        trainer.fit(_BatchSizeScheduleModule(), train_dataloaders=DataLoader(data, batch_size=8))
        return trainer

    assert fit().global_step == cb.steps == 16
    with pytest.raises(ValueError, match=r"already took 16 DP steps .* in an earlier fit.*Create a new "
                                         r"DifferentialPrivacy for a new run"):
        fit()


def _dict_collate(items: list[Any]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([torch.full((4,), float(len(t))) for t, _ in items]),
            "labels": torch.tensor([y for _, y in items])}


def test_an_empty_first_poisson_batch_keeps_a_dict_collate_structure_in_every_worker_copy():
    """A worker's copy of the collate function may see an empty Poisson batch first: it must still return the
    structure of the user's collate_fn (a dict here), not Opacus' bare-list fallback."""
    import pickle

    from lightning_optx.callbacks.differential_privacy import loader

    data = [(f"w{i}", i % 2) for i in range(64)]
    rebuilt, _ = loader.poisson_loader(DataLoader(data, batch_size=2, collate_fn=_dict_collate), world_size=1, rank=0,
                                       accumulate=1, generator=None, seed=0, epoch_source=lambda: 0, token="t")
    worker_copy = pickle.loads(pickle.dumps(rebuilt.collate_fn))  # what a DataLoader worker starts with
    empty = worker_copy([])
    assert set(empty) == {"x", "labels"}
    assert empty["x"].shape == (0, 4) and empty["x"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    assert worker_copy([data[3], data[4]])["labels"].tolist() == [1, 0]


class _BranchPerMicroBatch(pl.LightningModule):
    """Layer `a` in even micro-batches, `b` in odd ones: with accumulate_grad_batches=2 a dynamic graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        layer = self.a if batch_idx % 2 == 0 else self.b
        return torch.nn.functional.cross_entropy(layer(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_parameter_used_in_some_micro_batches_only_is_refused_by_hooks_and_handled_by_ghost(mode):
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode, seed=1)
    trainer = pl.Trainer(callbacks=[cb], max_epochs=1, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    fit = functools.partial(trainer.fit, _BranchPerMicroBatch(), train_dataloaders=DataLoader(data, batch_size=4))
    if mode == "ghost":
        fit()
        assert cb.steps == 8
        return
    with pytest.raises(ValueError, match=r"grad_sample_mode='hooks'\) with accumulate_grad_batches=2: the parameters "
                                         r"a\.bias, a\.weight, b\.bias, b\.weight got per-sample gradients in only "
                                         r"some micro-batches.*Use grad_sample_mode='ghost'"):
        fit()
