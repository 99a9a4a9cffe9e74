"""DP-SGD with Opacus as a Lightning callback: the thin adapter between Lightning's hooks and the parts in
this package (checks, randomness, the Poisson loader, the DP optimizer, ghost clipping, the Opacus shim)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_optx.callbacks.differential_privacy import checks, loader
from lightning_optx.callbacks.differential_privacy.backward import BackwardPatching
from lightning_optx.callbacks.differential_privacy.budget import PrivacyBudget
from lightning_optx.callbacks.differential_privacy.opacus_internals import require_internals
from lightning_optx.callbacks.differential_privacy.optimizer import OptimizerWrapping, complete_per_sample_state
from lightning_optx.callbacks.differential_privacy.randomness import Randomness
from lightning_optx.compatibility import check_supported
from lightning_optx.functional import privacy as P

if TYPE_CHECKING:
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

Clipping = Literal["flat", "per_layer", "adaptive"]
GradSampleMode = Literal["hooks", "functorch", "ghost"]
LossReduction = Literal["mean", "sum"]

_REPRODUCIBLE_WARNING = (
    "DifferentialPrivacy(seed={seed}): the Poisson batches and the noise are derived from the seed, so anyone who "
    "knows it (or holds a checkpoint and the configuration) can rebuild every batch and subtract the noise: the "
    "model is not private against them. Use seed=None (the default) for a release."
)


class DifferentialPrivacy(PrivacyBudget, OptimizerWrapping, BackwardPatching, Callback):
    """Train with DP-SGD (Abadi et al., 2016) through Opacus, leaving the LightningModule unmodified.

    For the duration of ``fit`` the callback makes the three changes DP-SGD needs, with Opacus' components:

    * **per-sample gradients**: Opacus' grad-sample hooks are attached to the module's layers
      (``grad_sample_mode="hooks"`` or ``"functorch"``), or its ghost-norm hooks (``"ghost"``: per-sample
      gradient *norms*, then the clipped sum from the layers' inputs and output gradients, in the same backward
      pass);
    * **the optimizer**: the one ``configure_optimizers`` returned is wrapped in Opacus' DP optimizer (its
      distributed variant under DDP), whose ``step`` clips every sample's gradient to ``max_grad_norm``, adds
      Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` once per optimizer step, divides
      by the expected batch size and then runs the wrapped optimizer;
    * **the data**: the training ``DataLoader``, whatever its source (``trainer.fit(train_dataloaders=...)``, a
      datamodule or ``LightningModule.train_dataloader()``), is rebuilt over the same data set, ``collate_fn`` and
      workers around a :class:`~lightning_optx.functional.privacy.PoissonBatchSampler`: each sample joins each step's
      batch independently with probability ``q = batch_size x devices x accumulate_grad_batches / len(dataset)``,
      so batch sizes vary (and can be 0); an epoch is ``int(1 / q)`` optimizer steps.

    Every optimizer step is recorded in an Opacus accountant (``"prv"`` or ``"rdp"``) with the actual noise
    multiplier and sample rate; ``dp/epsilon`` (at ``target_delta``) is computed by that accountant and logged
    with ``pl_module.log`` at every optimizer step at which Lightning writes logs (every ``log_every_n_steps``,
    and when training stops); :attr:`epsilon` gives it at any time. The accountant history, the noise multiplier
    and the seed are saved in checkpoints, so a resumed run continues the same privacy ledger.

    Where the noise happens: Lightning runs ``training_step`` and ``backward`` inside ``optimizer.step``'s
    closure, then ``on_before_optimizer_step`` and its own gradient clipping, and only then does the DP
    optimizer clip per sample (ghost clipping: already done in the backward pass), add noise (DDP: on rank 0
    only), all-reduce and update. So ``on_before_optimizer_step`` sees gradients before the noise: callbacks
    that edit or read them there (Grokfast, GradES, gradient surgery) are refused, and ``gradient_clip_val``
    must be unset.

    DDP: DDP's own gradient all-reduce is switched off (``require_backward_grad_sync = False`` before every
    batch); Opacus' distributed optimizer all-reduces the clipped sums itself after rank 0 added the noise, so
    every rank applies the same update. Each rank Poisson-samples its own shard of the data set (samples
    ``rank, rank + world_size, ...``), so the union is one Poisson sample of rate ``q`` of the whole data set:
    epsilon equals that of a single process with the same global batch and steps.

    Local SGD and DiLoCo (``"local_sgd"``, ``"diloco"``, ``"diloco_x"``): every process is a replica that runs its own
    DP-SGD on its own shard (Poisson sampling at the same rate ``q`` over the samples it owns, full noise
    ``noise_multiplier * max_grad_norm`` added by every replica to its own clipped sum, Opacus' single-process
    optimizer, no gradient all-reduce); the strategy's averaging and outer steps only post-process the replicas'
    noised parameters, and the shards are disjoint, so the run's epsilon is one replica's (parallel composition),
    the number logged. Refused: Local SGD's ``warmup_steps > 0``, node replicas (``replica_size > 1``) and every
    compressed DDP strategy; docs/methods/differential-privacy.md gives the argument.

    Gradient accumulation: one optimizer step consumes one Poisson batch, split into ``accumulate_grad_batches``
    micro-batches; clipping, noise, normalisation and accounting happen once per optimizer step.

    Args:
        noise_multiplier: noise standard deviation relative to ``max_grad_norm``. Exactly one of
            ``noise_multiplier`` and ``target_epsilon`` must be given.
        target_epsilon: calibrate the noise multiplier so that epsilon at ``target_delta`` after the planned
            optimizer steps (``trainer.estimated_stepping_batches``) is at most this (Opacus'
            ``get_noise_multiplier``).
        target_delta: the delta at which epsilon is reported and calibrated; choose it below ``1 / len(dataset)``.
        max_grad_norm: per-sample clipping bound C (norms, clip factors and the clipped sum are computed in
            fp32 under bf16, the noise added before rounding). With ``clipping="per_layer"`` a float is split
            evenly over the parameter tensors (each gets ``C / sqrt(n_tensors)``, so the total bound stays C), or
            give one bound per trainable parameter tensor (in optimizer order). With ``"adaptive"``, the initial bound.
        clipping: ``"flat"`` (one bound on the whole per-sample gradient), ``"per_layer"`` or ``"adaptive"``
            (Andrew et al.'s quantile-tracking bound; single process only; see ``adaptive_clipping``).
        grad_sample_mode: ``"hooks"`` (per-sample gradients by Opacus' layer formulas), ``"functorch"`` (by
            ``torch.func`` for every layer) or ``"ghost"`` (ghost clipping: per-sample gradient norms from Opacus'
            ghost-norm hooks, without per-sample gradients for ``nn.Linear``/``nn.Embedding``, then the clipped
            sum from the tensors the hooks kept, in the same backward pass; ``clipping="flat"`` only; a layer may
            run once per forward pass).
        poisson_sampling: replace the training sampler by Poisson sampling (what the accountant assumes). With
            ``False`` the loader is left alone and epsilon is computed as if it were Poisson-sampled: an
            approximation, not a guarantee.
        accountant: ``"prv"`` (Opacus' default, tighter) or ``"rdp"``.
        stop_at_epsilon: stop training before the optimizer step that would take epsilon above this. The DP
            optimizer also refuses such a step itself, should training go on (``min_steps``).
        secure_mode: draw noise and batches from a cryptographically secure generator (``torchcsprng``, an
            ``ImportError`` naming it when missing) and use Opacus' floating-point-attack-resistant noise.
        fix_model: replace layers Opacus cannot train privately (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...)
            with Opacus' ``ModuleValidator`` fixers, in place, in ``setup`` (before the optimizer is built and
            before a checkpoint is restored). Replaced layers are freshly initialised.
        loss_reduction: how ``training_step``'s loss reduces over the batch: ``"mean"`` (default) or ``"sum"``.
        adaptive_clipping: options of ``clipping="adaptive"``: ``target_unclipped_quantile`` (0.5),
            ``clipbound_learning_rate`` (0.2), ``max_clipbound`` (``100 * max_grad_norm``), ``min_clipbound``
            (``max_grad_norm / 100``), ``unclipped_num_std`` (the expected batch size / 20; must exceed
            ``noise_multiplier / 2``).
        seed: ``None`` (default): secret randomness, see above. An integer: reproducible randomness for research
            and tests; every step's Poisson draw and noise are seeded from it, the rank, the epoch and the step, so
            a resumed run draws what the uninterrupted one would, and anyone who knows the seed can remove the
            noise. Not with ``secure_mode``.

    Examples:
        >>> import lightning as L
        >>> from lightning_optx import DifferentialPrivacy
        >>> dp = DifferentialPrivacy(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0)
        >>> trainer = L.Trainer(callbacks=[dp], max_epochs=10, logger=False, enable_checkpointing=False)
        >>> dp = DifferentialPrivacy(noise_multiplier=1.1, accountant="rdp", stop_at_epsilon=8.0)
    """

    def __init__(
        self,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,
        max_grad_norm: float | list[float] = 1.0,
        clipping: Clipping = "flat",
        grad_sample_mode: GradSampleMode = "hooks",
        poisson_sampling: bool = True,
        accountant: P.AccountantName = "prv",
        stop_at_epsilon: float | None = None,
        secure_mode: bool = False,
        fix_model: bool = False,
        loss_reduction: LossReduction = "mean",
        adaptive_clipping: Mapping[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        P.require_opacus()
        require_internals()
        checks.check_args(noise_multiplier, target_epsilon, target_delta, max_grad_norm, clipping, grad_sample_mode,
                          accountant, stop_at_epsilon, loss_reduction, adaptive_clipping, seed)
        if seed is not None and secure_mode:
            raise ValueError(f"`seed` must be None with secure_mode=True (a secure generator cannot be seeded), got "
                             f"seed={seed!r}.")
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.target_delta = float(target_delta)
        self.max_grad_norm = [float(c) for c in max_grad_norm] if isinstance(max_grad_norm, list) \
            else float(max_grad_norm)
        self.clipping = clipping
        self.grad_sample_mode = grad_sample_mode
        self.poisson_sampling = bool(poisson_sampling)
        self.accountant_name = accountant
        self.stop_at_epsilon = None if stop_at_epsilon is None else float(stop_at_epsilon)
        self.secure_mode = bool(secure_mode)
        self.fix_model = bool(fix_model)
        self.loss_reduction = loss_reduction
        self.adaptive_clipping = dict(adaptive_clipping or {})
        self.seed = seed
        self.randomness = Randomness(seed, self.secure_mode)

        self.accountant = P.make_accountant(accountant)
        #: the noise multiplier in use (given, calibrated, re-calibrated on resume, or restored from a checkpoint)
        self.resolved_noise_multiplier: float | None = None
        #: Poisson rate of one optimizer step over the whole data set
        self.sample_rate: float | None = None
        #: expected number of samples per optimizer step, over all ranks
        self.expected_batch_size: float | None = None
        #: DP optimizer steps taken (over all fits of this callback, restored on resume)
        self.steps = 0
        self.skipped_over_budget = 0

        self._calibrated = False  # noise multiplier calibrated from target_epsilon
        self._steps_per_epoch: int | None = None
        self._planned_total: int | None = None
        self._restored_max_grad_norm: float | None = None
        self._allowed_steps: int | None = None
        self._allowed_for: tuple[float | None, float | None, int] | None = None
        self._step_participants: frozenset[int] | None = None
        self._ended_a_fit = False  # a fit of this callback ran (and its state was not replaced by load_state_dict)
        self._fitting = False  # between on_fit_start and the end of the fit: a reloaded loader is a mid-fit change
        self._logged_at = -1
        self._warned_budget = False
        self._eps_cache: tuple[tuple[Any, ...], float] | None = None
        self._token = ""
        self._trainer: pl.Trainer | None = None
        self._hooks: GradSampleHooks | None = None
        self._dp_optimizer: DPOptimizer | None = None
        self._patched: list[tuple[object, str, Any]] = []
        self._loader_built = False
        self._mode: checks.Mode = "single"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(accountant=self.accountant_name)

    @property
    def epsilon(self) -> float:
        """Epsilon at ``target_delta`` spent so far, as Opacus' accountant computes it for the steps taken."""
        history = tuple(tuple(h) for h in self.accountant.history)
        if self._eps_cache is None or self._eps_cache[0] != history:
            eps = P.epsilon_of_history(self.accountant.history, self.target_delta, self.accountant_name)
            self._eps_cache = (history, eps)
        return self._eps_cache[1]

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported(self, trainer)
        if self._ended_a_fit and self.steps and getattr(trainer, "ckpt_path", None) is None:
            raise ValueError(
                f"DifferentialPrivacy: this callback already took {self.steps} DP steps (epsilon={self.epsilon:.4g})"
                " in an earlier fit, and this fit resumes from no checkpoint: its budget was spent by that fit. "
                "Create a new DifferentialPrivacy for a new run, or pass ckpt_path=... to continue the earlier one."
            )
        self._trainer = trainer
        self._mode = checks.check_trainer(trainer, pl_module, self.clipping, DifferentialPrivacy)
        # one DP-SGD per replica (Local SGD, DiLoCo): every replica draws its own noise, also with a seed
        self.randomness.replica = trainer.global_rank if self._mode == "replicas" else None
        if self.fix_model:
            fixed = checks.fix_in_place(pl_module)
            if fixed:
                rank_zero_info(f"DifferentialPrivacy: replaced {', '.join(fixed)} (opacus ModuleValidator fixers).")
        checks.raise_on_incompatible_layers(pl_module)
        self._token = uuid.uuid4().hex
        self._loader_built = False
        # before anything can build the training loader (configure_optimizers reading
        # trainer.estimated_stepping_batches does, inside strategy.setup, before on_fit_start)
        self.randomness.start(trainer.strategy.root_device)
        self._restore_patches()
        if self.poisson_sampling:
            loader.install(trainer, lambda user_loader: self._poisson_loader(user_loader, trainer), self._patch)
        self._patch_backward(trainer, pl_module)

    def _poisson_loader(self, user_loader: Any, trainer: pl.Trainer) -> DataLoader:
        if not self.randomness.started:  # setup always starts it; a loader built outside a fit gets secret ones too
            strategy = getattr(trainer, "strategy", None)
            self.randomness.start(getattr(strategy, "root_device", torch.device("cpu")))
        rebuilt, geometry = loader.poisson_loader(
            user_loader, world_size=trainer.world_size, rank=trainer.global_rank,
            accumulate=trainer.accumulate_grad_batches, generator=self.randomness.sampling,
            seed=self.randomness.sampling_seed, epoch_source=lambda: trainer.current_epoch, token=self._token)
        self._set_geometry(geometry)
        self._loader_built = True
        return rebuilt

    def _set_geometry(self, geometry: loader.LoaderGeometry) -> None:
        previous = self.sample_rate
        self.sample_rate = geometry.sample_rate
        self.expected_batch_size = geometry.sample_rate * geometry.dataset_size
        self._steps_per_epoch = geometry.steps_per_epoch
        if self._fitting and previous is not None and previous != geometry.sample_rate:
            assert self._trainer is not None
            self._rate_changed_mid_fit(self._trainer, previous)

    # ------------------------------------------------------------------ fit start: data, noise, optimizer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checks.raise_on_incompatible_layers(pl_module)  # layers created in configure_model
        if self.randomness.reproducible:
            rank_zero_warn(_REPRODUCIBLE_WARNING.format(seed=self.seed))
        restored_rate, restored_spe = self.sample_rate, self._steps_per_epoch
        planned = trainer.estimated_stepping_batches  # builds the training loader (and so the sample rate)
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # infinite training: estimated_stepping_batches did not load the data
        if not self.poisson_sampling:
            self._set_geometry(loader.plain_loader_geometry(trainer.train_dataloader, trainer.world_size,
                                                            trainer.accumulate_grad_batches))
            rank_zero_warn("DifferentialPrivacy(poisson_sampling=False): the accountant assumes Poisson sampling; "
                           "with the loader's own batches the reported epsilon is an approximation, not a guarantee.")
        elif not self._loader_built:
            raise ValueError("DifferentialPrivacy: the training loader did not pass through Lightning's training data "
                             "source, so it could not be rebuilt with Poisson sampling.")
        self._resolve_noise(trainer, planned, restored_rate, restored_spe)
        self._wrap_optimizer(trainer, pl_module)
        self._allowed_steps = self._compute_allowed_steps()
        self._fitting = True

    # ------------------------------------------------------------------ per batch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from opacus.utils.module_utils import trainable_modules

        in_eval = [name or type(m).__name__ for name, m in trainable_modules(pl_module) if not m.training]
        if in_eval:
            raise ValueError(
                f"DifferentialPrivacy: trainable layers in eval mode at the start of training ({', '.join(in_eval[:5])}"
                f"{', ...' if len(in_eval) > 5 else ''}): Opacus records the per-sample inputs of layers in training "
                "mode only. Call `.train()` on the model before `trainer.fit` (Lightning keeps the modes it finds)."
            )
        if self.poisson_sampling:
            batch_sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
            if not (isinstance(batch_sampler, P.PoissonBatchSampler) and batch_sampler.token == self._token):
                raise ValueError(
                    "DifferentialPrivacy: the training loader is not the Poisson-sampled one it built (it was "
                    "wrapped or replaced after the callback rebuilt it); pass a plain DataLoader to `trainer.fit`, a "
                    "datamodule or `LightningModule.train_dataloader()`."
                )
        accumulate = trainer.accumulate_grad_batches
        if accumulate > 1 and trainer.num_training_batches % accumulate:
            raise ValueError(
                f"DifferentialPrivacy: {trainer.num_training_batches} training batches per epoch is not a multiple "
                f"of accumulate_grad_batches={accumulate}: an optimizer step would use part of a Poisson batch. "
                "Adjust limit_train_batches."
            )
        if self._allowed_steps is not None and self.steps >= self._allowed_steps:
            trainer.should_stop = True
        self._logged_at = self.steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            # DDP would all-reduce the raw summed gradient in backward; Opacus' distributed optimizer reduces the
            # clipped, noised one itself (per replica: nothing is reduced). `require_backward_grad_sync` is DDP's
            # public switch (what no_sync sets).
            model.require_backward_grad_sync = False
        if self._mode == "replicas" and trainer.strategy.gradient_averaging_comm() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"DifferentialPrivacy: strategy {checks.strategy_name(trainer.strategy)!r} would "
                               "average gradients at this step; each replica's DP-SGD must keep them local.")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        """Make the per-sample state complete for the DP step that follows inside ``optimizer.step``."""
        if self._dp_optimizer is not None:
            complete_per_sample_state(self._dp_optimizer, self.grad_sample_mode == "ghost")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.steps == self._logged_at:
            return  # no DP step in this batch (accumulating, or a step refused over budget)
        self._logged_at = self.steps
        if self._allowed_steps is not None and self.steps >= self._allowed_steps:
            trainer.should_stop = True
        every = getattr(trainer, "log_every_n_steps", 50)  # Trainer(log_every_n_steps=...), set by its logger connector
        if every > 0 and (trainer.global_step % every == 0 or trainer.should_stop):
            pl_module.log("dp/epsilon", self.epsilon, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"DifferentialPrivacy: epsilon={self.epsilon:.4f} at delta={self.target_delta} after "
                       f"{self.steps} steps (noise_multiplier={self.resolved_noise_multiplier:.4g}, sample rate "
                       f"{self.sample_rate:.5g}, accountant={self.accountant_name}).")

    # ------------------------------------------------------------------ tear-down

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup(pl_module)

    def _cleanup(self, pl_module: pl.LightningModule) -> None:
        from opacus.utils.module_utils import trainable_modules

        self._fitting = False
        self._ended_a_fit = True
        self._restore_patches()
        self._remove_hooks()
        self.randomness.stop()
        for p in pl_module.parameters():  # fp32 sums the DP optimizer keeps between its steps
            p.__dict__.pop("_optx_clipped_sum", None)
            p.__dict__.pop("_optx_noised", None)
        for _, module in trainable_modules(pl_module):  # what Opacus' hooks leave on the layers they watched
            if isinstance(module.__dict__.get("activations"), list):
                del module.activations
            if isinstance(module.__dict__.get("max_batch_len"), int):
                del module.max_batch_len
