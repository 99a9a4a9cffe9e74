"""DP-SGD with Opacus as a Lightning callback: per-sample clipping, calibrated noise, Poisson batches, accounting."""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from lightning_optx.functional import privacy as P

if TYPE_CHECKING:
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

Clipping = Literal["flat", "per_layer", "adaptive"]
GradSampleMode = Literal["hooks", "functorch", "ghost"]
LossReduction = Literal["mean", "sum"]

_CLIPPINGS = ("flat", "per_layer", "adaptive")
_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
_STATE_VERSION = 1
_MISSING = object()

#: Callbacks that break the guarantee, by class name (callbacks never import each other), with the reason.
_REFUSED_CALLBACKS: dict[str, str] = {
    "Grokfast": "it edits the gradients in `on_before_optimizer_step`, which runs before the DP optimizer clips "
                "and noises them: the edit is either discarded (per-sample clipping) or added to the clipped sum "
                "before the noise (ghost clipping), and its filter state is built from non-private gradients",
    "GradientSurgery": "it replaces the backward pass, so no per-sample gradients are collected, and its "
                       "aggregation mixes the gradients of different samples before clipping",
    "GradES": "it freezes matrices from non-private gradient statistics, a data-dependent decision outside the "
              "privacy accounting",
    "GradientAccumulationScheduler": "it changes `accumulate_grad_batches` during training; the Poisson batches "
                                     "are split into a fixed number of micro-batches per optimizer step",
    "BaseFinetuning": "it unfreezes layers during training; per-sample gradient hooks are attached once, at the "
                      "start of fit, to the layers trainable then",
}
_FP16_REASON = (
    "fp16 mixed precision scales the loss (GradScaler): the per-sample gradients Opacus clips would be the scaled "
    "ones, so `max_grad_norm` would bound the wrong quantity. Use precision='bf16-mixed' or '32-true'"
)


class DifferentialPrivacy(Callback):
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
    * **the data**: the training ``DataLoader`` returned by the LightningModule (or datamodule) is rebuilt
      around a :class:`~lightning_optx.functional.privacy.PoissonBatchSampler`: each sample joins each step's
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

    Gradient accumulation: one optimizer step consumes one Poisson batch, split into ``accumulate_grad_batches``
    micro-batches; clipping, noise, normalisation and accounting happen once per optimizer step.

    Args:
        noise_multiplier: noise standard deviation relative to ``max_grad_norm``. Exactly one of
            ``noise_multiplier`` and ``target_epsilon`` must be given.
        target_epsilon: calibrate the noise multiplier so that epsilon at ``target_delta`` after the planned
            optimizer steps (``trainer.estimated_stepping_batches``) is at most this (Opacus'
            ``get_noise_multiplier``).
        target_delta: the delta at which epsilon is reported and calibrated; choose it below ``1 / len(dataset)``.
        max_grad_norm: per-sample clipping bound C. With ``clipping="per_layer"`` a float is split evenly over the
            parameter tensors (each gets ``C / sqrt(n_tensors)``, so the total bound stays C), or give one bound
            per trainable parameter tensor (in optimizer order). With ``"adaptive"``, the initial bound.
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
        secure_mode: draw noise and batches from a cryptographically secure generator (``torchcsprng``) and use
            Opacus' floating-point-attack-resistant noise; not reproducible.
        fix_model: replace layers Opacus cannot train privately (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...)
            with Opacus' ``ModuleValidator`` fixers, in place, in ``setup`` (before the optimizer is built and
            before a checkpoint is restored). Replaced layers are freshly initialised.
        loss_reduction: how ``training_step``'s loss reduces over the batch: ``"mean"`` (default) or ``"sum"``.
        adaptive_clipping: options of ``clipping="adaptive"``: ``target_unclipped_quantile`` (0.5),
            ``clipbound_learning_rate`` (0.2), ``max_clipbound`` (``100 * max_grad_norm``), ``min_clipbound``
            (``max_grad_norm / 100``), ``unclipped_num_std`` (the expected batch size / 20; must exceed
            ``noise_multiplier / 2``).
        seed: base seed of the Poisson draws and the noise (each step's generator is seeded from it, the rank,
            the epoch and the step, so a resumed run draws what the uninterrupted one would). ``None``: drawn
            from torch's global generator (seed it with ``seed_everything``) and broadcast from rank 0.

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
        _check_args(noise_multiplier, target_epsilon, target_delta, max_grad_norm, clipping, grad_sample_mode,
                    accountant, stop_at_epsilon, loss_reduction, adaptive_clipping, seed)
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

        self.accountant = P.make_accountant(accountant)
        #: the noise multiplier in use (given, calibrated, or restored from a checkpoint)
        self.resolved_noise_multiplier: float | None = None
        #: Poisson rate of one optimizer step over the whole data set
        self.sample_rate: float | None = None
        #: expected number of samples per optimizer step, over all ranks
        self.expected_batch_size: float | None = None
        #: DP optimizer steps taken (over all fits of this callback, restored on resume)
        self.steps = 0
        self.base_seed: int | None = None
        self.skipped_over_budget = 0

        self._calibrated = False  # noise multiplier calibrated from target_epsilon (kept on resume)
        self._restored_max_grad_norm: float | None = None
        self._allowed_steps: int | None = None
        self._logged_at = -1
        self._warned_budget = False
        self._eps_cache: tuple[tuple[Any, ...], float] | None = None
        self._token = ""
        self._trainer: pl.Trainer | None = None
        self._hooks: GradSampleHooks | None = None
        self._dp_optimizer: DPOptimizer | None = None
        self._noise_generator: torch.Generator | None = None
        self._secure_generator: Any = None
        self._dataset_size: int | None = None
        self._patched: list[tuple[object, str, Any]] = []
        self._loader_built = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(accountant=self.accountant_name)

    # ------------------------------------------------------------------ public read-outs

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
        self._trainer = trainer
        self._check_trainer(trainer, pl_module)
        if self.fix_model:
            fixed = _fix_in_place(pl_module)
            if fixed:
                rank_zero_info(f"DifferentialPrivacy: replaced {', '.join(fixed)} (opacus ModuleValidator fixers).")
        _raise_on_incompatible_layers(pl_module)

        if self.secure_mode:
            self._secure_generator = _secure_generator()
        elif self.base_seed is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self.base_seed = int(trainer.strategy.broadcast(seed, src=0))
        self._token = uuid.uuid4().hex
        self._loader_built = False
        self._patch_module(trainer, pl_module)

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("DifferentialPrivacy needs automatic optimization: the DP optimizer step, the Poisson "
                             "batches and the accounting follow the optimizer steps Lightning runs.")
        strategy = trainer.strategy
        if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            raise ValueError(
                f"DifferentialPrivacy supports single-device training and Lightning's DDPStrategy, got "
                f"{type(strategy).__name__}: Opacus' optimizer must be the only one to reduce gradients."
            )
        precision = str(trainer.precision)
        if precision in ("16-mixed", "16"):
            raise ValueError(f"DifferentialPrivacy does not support precision={precision!r}: {_FP16_REASON}.")
        if precision == "16-true":
            raise ValueError("DifferentialPrivacy does not support precision='16-true': fp16 per-sample gradients "
                             "under- and overflow without loss scaling. Use 'bf16-mixed', 'bf16-true' or '32-true'.")
        if trainer.gradient_clip_val:
            raise ValueError(
                f"DifferentialPrivacy: unset gradient_clip_val (got {trainer.gradient_clip_val!r}): Lightning clips "
                "the summed, non-private gradient; DP-SGD clips every sample's gradient to `max_grad_norm`."
            )
        if self.clipping == "adaptive" and trainer.world_size > 1:
            raise ValueError("DifferentialPrivacy: clipping='adaptive' is single-process only (Opacus has no "
                             "distributed adaptive-clipping optimizer); use 'flat' or 'per_layer' under DDP.")
        dps = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)]  # type: ignore[attr-defined]
        if len(dps) > 1:
            raise ValueError("Only one DifferentialPrivacy callback can be used per Trainer.")
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            names = {c.__name__ for c in type(cb).__mro__}
            for name, reason in _REFUSED_CALLBACKS.items():
                if name in names:
                    raise ValueError(f"DifferentialPrivacy cannot be combined with {type(cb).__name__}: {reason}. "
                                     "Remove one of the two callbacks.")

    def _patch_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Instance-level wrappers, removed at the end of fit: the train loader and, where needed, backward."""
        self._restore_patches()
        if self.poisson_sampling:
            datamodule = trainer.datamodule  # type: ignore[attr-defined]
            source: Any = pl_module
            if datamodule is not None and is_overridden("train_dataloader", datamodule):
                source = datamodule
            original_loader = source.train_dataloader

            def train_dataloader() -> DataLoader:
                return self._poisson_loader(original_loader(), trainer)

            self._patch(source, "train_dataloader", train_dataloader)

        accumulate = trainer.accumulate_grad_batches
        original_backward = pl_module.backward
        if self.grad_sample_mode == "ghost":
            def ghost_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
                self._ghost_backward(original_backward, loss * accumulate, *args, **kwargs)

            self._patch(pl_module, "backward", ghost_backward)
        elif accumulate > 1:
            # Lightning divides the loss by accumulate_grad_batches before backward; per-sample gradients must be
            # those of each sample's own loss, so undo it (the DP optimizer normalises once per optimizer step).
            def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
                original_backward(loss * accumulate, *args, **kwargs)

            self._patch(pl_module, "backward", backward)

    def _patch(self, obj: object, name: str, fn: Callable[..., Any]) -> None:
        self._patched.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, fn)

    def _restore_patches(self) -> None:
        for obj, name, previous in reversed(self._patched):
            if previous is _MISSING:
                obj.__dict__.pop(name, None)  # the instance attribute goes; the class's method shows again
            else:
                obj.__dict__[name] = previous  # e.g. LightningDataModule.from_datasets sets instance attributes
        self._patched = []

    # ------------------------------------------------------------------ data

    def _poisson_loader(self, loader: Any, trainer: pl.Trainer) -> DataLoader:
        """Rebuild the user's training loader around Poisson batches (Opacus' empty-batch collate)."""
        from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

        if not isinstance(loader, DataLoader):
            raise ValueError(f"DifferentialPrivacy needs the training data as one torch DataLoader, got "
                             f"{type(loader).__name__}; or pass poisson_sampling=False (approximate accounting).")
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError("DifferentialPrivacy: Poisson sampling needs a map-style data set (with __len__ and "
                             "__getitem__), got an IterableDataset.")
        batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        if not isinstance(batch_size, int):
            raise ValueError("DifferentialPrivacy: the training DataLoader has no batch_size; give it one (the "
                             "expected Poisson batch size per device and micro-batch).")
        size = len(dataset)  # type: ignore[arg-type]
        world, rank, accumulate = trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches
        rate = P.sample_rate_for(batch_size, size, world, accumulate)
        self._set_rate(rate, size)
        self._loader_built = True
        first = dataset[0]
        shapes = dtypes = None
        if isinstance(first, (tuple, list)):
            shapes = [(0, *shape_safe(x)) for x in first]
            dtypes = [dtype_safe(x) for x in first]
        batch_sampler = P.PoissonBatchSampler(
            SequentialSampler(dataset),  # type: ignore[arg-type]
            batch_size=max(1, round(batch_size)),
            num_samples=size,
            sample_rate=rate,
            steps=P.steps_per_epoch(rate),
            accumulate=accumulate,
            num_replicas=world,
            rank=rank,
            seed=self.base_seed or 0,
            generator=self._secure_generator,
            epoch_source=lambda: trainer.current_epoch,
            token=self._token,
        )
        kwargs: dict[str, Any] = {}
        if loader.num_workers > 0:
            kwargs = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=loader.num_workers,
            collate_fn=wrap_collate_with_empty(collate_fn=loader.collate_fn, sample_empty_shapes=shapes,
                                               dtypes=dtypes),
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            **kwargs,
        )

    def _set_rate(self, rate: float, dataset_size: int) -> None:
        if self.sample_rate is not None and self.sample_rate != rate:
            rank_zero_warn(f"DifferentialPrivacy: the sample rate changed from {self.sample_rate:.6g} to {rate:.6g}; "
                           "the accountant records both.")
        self.sample_rate = rate
        self._dataset_size = dataset_size
        self.expected_batch_size = rate * dataset_size

    def _rate_from_plain_loader(self, trainer: pl.Trainer) -> None:
        """poisson_sampling=False: the sample rate the accountant assumes for the user's own batches."""
        loader = trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None),
                                                                    "batch_size", None)
        dataset = getattr(loader, "dataset", None)
        if not isinstance(batch_size, int) or dataset is None:
            raise ValueError("DifferentialPrivacy: cannot read the batch size and data set of the training loader.")
        size = len(dataset)
        self._set_rate(P.sample_rate_for(batch_size, size, trainer.world_size, trainer.accumulate_grad_batches),
                       size)

    # ------------------------------------------------------------------ optimizer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _raise_on_incompatible_layers(pl_module)  # layers created in configure_model
        planned = trainer.estimated_stepping_batches  # builds the training loader (and so the sample rate)
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # infinite training: estimated_stepping_batches did not load the data
        if not self.poisson_sampling:
            self._rate_from_plain_loader(trainer)
            rank_zero_warn("DifferentialPrivacy(poisson_sampling=False): the accountant assumes Poisson sampling; "
                           "with the loader's own batches the reported epsilon is an approximation, not a guarantee.")
        if self.poisson_sampling and not self._loader_built:
            raise ValueError(
                "DifferentialPrivacy replaces the training loader's sampler with Poisson sampling, but the training "
                "data did not come from `LightningModule.train_dataloader()` or `LightningDataModule."
                "train_dataloader()` (a DataLoader passed to `trainer.fit(train_dataloaders=...)` cannot be "
                "replaced): return it from one of those hooks."
            )
        self._resolve_noise(planned)
        self._wrap_optimizer(trainer, pl_module)
        self._allowed_steps = self._compute_allowed_steps()

    def _resolve_noise(self, planned: float) -> None:
        if self.noise_multiplier is not None:
            self.resolved_noise_multiplier = self.noise_multiplier
            return
        if self._calibrated and self.resolved_noise_multiplier is not None:
            return  # restored from a checkpoint: keep the noise the run was calibrated with
        if not math.isfinite(planned) or planned < 1:
            raise ValueError("DifferentialPrivacy(target_epsilon=...) needs a finite training length (max_steps or "
                             "max_epochs) to calibrate the noise.")
        assert self.sample_rate is not None and self.target_epsilon is not None
        self.resolved_noise_multiplier = P.noise_multiplier_for_epsilon(
            self.target_epsilon, self.target_delta, self.sample_rate, int(planned), self.accountant_name)
        self._calibrated = True
        rank_zero_info(f"DifferentialPrivacy: noise_multiplier={self.resolved_noise_multiplier:.4f} for epsilon <= "
                       f"{self.target_epsilon} at delta={self.target_delta} after {int(planned)} steps "
                       f"(sample rate {self.sample_rate:.5g}).")

    def _wrap_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from opacus.grad_sample.utils import get_hooks_class
        from opacus.optimizers import get_optimizer_class

        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"DifferentialPrivacy supports one optimizer, got {len(optimizers)}.")
        optimizer = optimizers[0]
        module_params = {id(p) for p in pl_module.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if any(id(p) not in module_params for p in params):
            raise ValueError("DifferentialPrivacy: the optimizer holds parameters that are not the LightningModule's.")

        distributed = trainer.world_size > 1
        hooks_cls = _bookkeeping_hooks_class() if self.grad_sample_mode == "ghost" else \
            get_hooks_class(self.grad_sample_mode)
        hook_kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": self.loss_reduction}
        if self.grad_sample_mode == "ghost":
            assert isinstance(self.max_grad_norm, float)
            hook_kwargs["max_grad_norm"] = self.max_grad_norm
        elif self.grad_sample_mode == "functorch":
            hook_kwargs["force_functorch"] = True
        self._remove_hooks()
        self._hooks = hooks_cls(pl_module, **hook_kwargs)

        base = get_optimizer_class(clipping=self.clipping, distributed=distributed,
                                   grad_sample_mode="ghost" if self.grad_sample_mode == "ghost" else "hooks")
        device = params[0].device if params else torch.device("cpu")
        generator = self._secure_generator if self.secure_mode else torch.Generator(device=device)
        self._noise_generator = generator
        assert self.expected_batch_size is not None and self.resolved_noise_multiplier is not None
        kwargs: dict[str, Any] = {
            "noise_multiplier": self.resolved_noise_multiplier,
            "max_grad_norm": self._clip_bound(len(params)),
            "expected_batch_size": self.expected_batch_size / trainer.world_size,  # per rank (Opacus' convention)
            "loss_reduction": self.loss_reduction,
            "generator": generator,
            "secure_mode": self.secure_mode,
        }
        if self.clipping == "adaptive":
            kwargs.update(self._adaptive_options())
            if self._restored_max_grad_norm is not None:
                kwargs["max_grad_norm"] = self._restored_max_grad_norm
        dp_optimizer = _dp_class(base)(optimizer, **kwargs)
        dp_optimizer._optx_dp = self
        dp_optimizer.attach_step_hook(self._account_step)
        self._dp_optimizer = dp_optimizer
        trainer.strategy.optimizers = [dp_optimizer]  # public setter: also rebuilds the LightningOptimizer wrapper

    def _clip_bound(self, n_params: int) -> float | list[float]:
        if self.clipping != "per_layer":
            if isinstance(self.max_grad_norm, list):
                raise ValueError(f"`max_grad_norm` must be a float with clipping={self.clipping!r}, got a list.")
            return self.max_grad_norm
        if isinstance(self.max_grad_norm, list):
            if len(self.max_grad_norm) != n_params:
                raise ValueError(f"`max_grad_norm` holds {len(self.max_grad_norm)} bounds but the optimizer has "
                                 f"{n_params} trainable parameter tensors.")
            return list(self.max_grad_norm)
        return [self.max_grad_norm / math.sqrt(n_params)] * n_params

    def _adaptive_options(self) -> dict[str, float]:
        assert isinstance(self.max_grad_norm, float) and self.expected_batch_size is not None
        sigma = self.resolved_noise_multiplier or 0.0
        opts = {
            "target_unclipped_quantile": 0.5,
            "clipbound_learning_rate": 0.2,
            "max_clipbound": 100.0 * self.max_grad_norm,
            "min_clipbound": self.max_grad_norm / 100.0,
            "unclipped_num_std": self.expected_batch_size / 20.0,
        }
        opts.update(self.adaptive_clipping)
        if not sigma < 2.0 * opts["unclipped_num_std"]:
            raise ValueError(
                f"DifferentialPrivacy(clipping='adaptive'): noise_multiplier={sigma:.4g} must be below "
                f"2 * unclipped_num_std={2.0 * opts['unclipped_num_std']:.4g} (Andrew et al., Theorem 1); raise "
                "adaptive_clipping['unclipped_num_std'] or lower the noise."
            )
        return opts

    def _account_step(self, optimizer: DPOptimizer) -> None:
        """Opacus step hook: runs once per optimizer step, after the noise, before the update."""
        assert self.sample_rate is not None
        self.accountant.step(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=self.sample_rate)
        self.steps += 1

    def _compute_allowed_steps(self) -> int | None:
        """Total DP steps (counting those already taken) that keep epsilon <= stop_at_epsilon."""
        if self.stop_at_epsilon is None:
            return None
        assert self.resolved_noise_multiplier is not None and self.sample_rate is not None
        more = P.steps_until_budget(self.resolved_noise_multiplier, self.sample_rate, self.target_delta,
                                    self.stop_at_epsilon, self.accountant_name, history=self.accountant.history)
        return self.steps + more

    def _step_allowed(self) -> bool:
        """Called by the DP optimizer before clipping and noise: refuse a step beyond the budget."""
        if self._allowed_steps is None or self.steps < self._allowed_steps:
            return True
        self.skipped_over_budget += 1
        if self._trainer is not None:
            self._trainer.should_stop = True
        if not self._warned_budget:
            rank_zero_warn(f"DifferentialPrivacy: the next step would take epsilon above stop_at_epsilon="
                           f"{self.stop_at_epsilon}; the DP optimizer skips it (training continued past the stop, "
                           "e.g. because of min_steps/min_epochs).")
            self._warned_budget = True
        return False

    def _reseed_noise(self) -> None:
        if not self.secure_mode and self._noise_generator is not None:
            self._noise_generator.manual_seed(P.derive_seed(self.base_seed, "noise", self.steps))

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
                    "DifferentialPrivacy: the training loader is not the Poisson-sampled one it built (a DataLoader "
                    "passed to `trainer.fit(train_dataloaders=...)`, or one wrapped afterwards): return the loader "
                    "from `LightningModule.train_dataloader()` or a datamodule."
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
            # clipped, noised one itself. `require_backward_grad_sync` is DDP's public switch (what no_sync sets).
            model.require_backward_grad_sync = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        """Make the per-sample state complete for the DP step that follows inside ``optimizer.step``."""
        dp = self._dp_optimizer
        if dp is None:
            return
        if self.grad_sample_mode == "ghost":
            for p in dp.params:  # an empty batch or an unused parameter: zero gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        # A parameter with no per-sample gradient (unused in this step's forward, or an empty batch) has a zero
        # gradient for every sample of the batch.
        lengths = [sum(len(g) for g in p.grad_sample) if isinstance(p.grad_sample, list) else len(p.grad_sample)
                   for p in dp.params if getattr(p, "grad_sample", None) is not None]
        n = max(lengths, default=0)
        for p in dp.params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)

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

    # ------------------------------------------------------------------ ghost clipping

    def _ghost_backward(self, original_backward: Callable[..., Any], loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Ghost clipping with book-keeping: one backward pass, then the clipped sum from the captured tensors.

        During the backward pass (the module's own ``backward``) the hooks compute every sample's gradient norm,
        layer by layer, with Opacus' ghost-norm formulas (no per-sample gradient for
        ``nn.Linear``/``nn.Embedding``), and keep each layer's inputs and output gradients. Once all norms are
        known, the clipping factors ``c_i`` give each layer's clipped sum ``sum_i c_i g_i`` directly
        (:func:`~lightning_optx.functional.privacy.clipped_gradient_sum`), which is added to ``.grad``. Opacus'
        ``DPLossFastGradientClipping`` instead runs a second backward pass of ``sum_i c_i loss_i``, which needs
        the per-sample losses and zeroes the gradients in between (erasing the earlier micro-batches of an
        accumulated step); this needs neither. The raw gradients the backward pass writes are dropped.
        """
        hooks, dp = self._hooks, self._dp_optimizer
        assert hooks is not None and dp is not None
        params = dp.params
        kept = [p.grad for p in params]  # the clipped sums of earlier micro-batches of this step
        for p in params:
            p.grad = None
        try:
            original_backward(loss, *args, **kwargs)
        finally:
            for p, g in zip(params, kept):
                p.grad = g
        for p, g in hooks.clipped_sums().items():
            p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)

    # ------------------------------------------------------------------ tear-down

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._cleanup(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cleanup(pl_module)

    def _cleanup(self, pl_module: pl.LightningModule) -> None:
        from opacus.utils.module_utils import trainable_modules

        self._restore_patches()
        self._remove_hooks()
        for _, module in trainable_modules(pl_module):  # what Opacus' hooks leave on the layers they watched
            if isinstance(module.__dict__.get("activations"), list):
                del module.activations
            if isinstance(module.__dict__.get("max_batch_len"), int):
                del module.max_batch_len

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        max_grad_norm = None
        if self.clipping == "adaptive" and self._dp_optimizer is not None:
            max_grad_norm = float(self._dp_optimizer.max_grad_norm)
        return {
            "version": _STATE_VERSION,
            "accountant": self.accountant_name,
            "history": [(float(s), float(q), int(n)) for s, q, n in self.accountant.history],
            "steps": self.steps,
            "noise_multiplier": self.resolved_noise_multiplier,
            "calibrated": self._calibrated,
            "sample_rate": self.sample_rate,
            "target_delta": self.target_delta,
            "seed": self.base_seed,
            "max_grad_norm": max_grad_norm,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("accountant") != self.accountant_name:
            raise ValueError(f"DifferentialPrivacy: the checkpoint's accountant={state_dict.get('accountant')!r} "
                             f"differs from accountant={self.accountant_name!r}; resume with the same accountant.")
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state_dict["history"]]
        self.steps = int(state_dict["steps"])
        self._calibrated = bool(state_dict.get("calibrated", False)) and self.target_epsilon is not None
        if self._calibrated:
            self.resolved_noise_multiplier = float(state_dict["noise_multiplier"])
        if state_dict.get("seed") is not None:
            self.base_seed = int(state_dict["seed"])
        self.sample_rate = state_dict.get("sample_rate")
        self._restored_max_grad_norm = state_dict.get("max_grad_norm")
        self._eps_cache = None


# ---------------------------------------------------------------------- the DP optimizer


class _LightningDPStep:
    """Mixed into Opacus' DP optimizer classes: the budget guard, per-step noise seeds, one normalisation."""

    _optx_dp: DifferentialPrivacy

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        dp = self._optx_dp
        if not dp._step_allowed():
            return False
        dp._reseed_noise()
        return super().pre_step(closure)  # type: ignore[misc]

    def scale_grad(self) -> None:
        # One Poisson batch per optimizer step, however many micro-batches it was split into: divide by its
        # expected size (per rank; the distributed optimizer then averages over ranks) once.
        if self.loss_reduction == "mean":  # type: ignore[attr-defined]
            for p in self.params:  # type: ignore[attr-defined]
                p.grad /= self.expected_batch_size  # type: ignore[attr-defined]



class _FastGradientClippingSteps:
    """Leaner versions of two steps of Opacus' ghost-clipping optimizer, which run for every parameter at every
    optimizer step (on a small model the per-tensor overhead is what DP-SGD costs):

    * ``accumulate``: ``.grad`` holds the clipped sum the backward pass built for this step, a fresh tensor: take
      it as is, where Opacus ``copy.deepcopy``-s it;
    * ``add_noise``: draw the noise of all parameters in one call instead of one (plus a zero tensor) per parameter.
      Same distribution, ``N(0, (noise_multiplier * max_grad_norm)^2)`` per coordinate, from the same generator;
      secure mode, mixed dtypes and ranks other than 0 (which add no noise) keep Opacus' code.
    """

    def accumulate(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        params = self.params  # type: ignore[attr-defined]
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm  # type: ignore[attr-defined]
        dtypes = {p.summed_grad.dtype for p in params}
        if (self.secure_mode or getattr(self, "rank", 0) != 0 or std == 0 or len(dtypes) != 1  # type: ignore[attr-defined]
                or not params):
            super().add_noise()  # type: ignore[misc]
            return
        reference = params[0].summed_grad
        noise = torch.normal(0.0, std, size=(sum(p.numel() for p in params),), generator=self.generator,  # type: ignore[attr-defined]
                             device=reference.device, dtype=reference.dtype)
        offset = 0
        for p in params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + noise[offset:offset + p.numel()].view_as(p)).view_as(p)
            _mark_as_processed(p.summed_grad)
            offset += p.numel()


class _AdaClipEmptyBatch:
    """Opacus' adaptive-clipping optimizer cannot take an empty Poisson batch; make it a no-information step."""

    def clip_and_accumulate(self) -> None:
        from opacus.optimizers import DPOptimizer

        if len(self.grad_samples[0]) > 0:  # type: ignore[attr-defined]
            super().clip_and_accumulate()  # type: ignore[misc]
            return
        DPOptimizer.clip_and_accumulate(self)  # zero sums, as for any empty batch
        self.unclipped_num = torch.zeros((), dtype=torch.long)  # noised by add_noise like any count

    def update_max_grad_norm(self) -> None:
        if getattr(self, "sample_size", 0) == 0:
            return  # no sample, no quantile estimate (Opacus would divide by zero)
        super().update_max_grad_norm()  # type: ignore[misc]


_DP_CLASSES: dict[type, type] = {}


def _dp_class(base: type) -> type:
    from opacus.optimizers import AdaClipDPOptimizer, DPOptimizerFastGradientClipping

    if base not in _DP_CLASSES:
        mixins: tuple[type, ...] = (_LightningDPStep,)
        if issubclass(base, AdaClipDPOptimizer):
            mixins += (_AdaClipEmptyBatch,)
        if issubclass(base, DPOptimizerFastGradientClipping):
            mixins += (_FastGradientClippingSteps,)
        _DP_CLASSES[base] = type(f"Optx{base.__name__}", (*mixins, base), {})
    return _DP_CLASSES[base]


_HOOK_CLASSES: dict[str, type] = {}


def _bookkeeping_hooks_class() -> type:
    """Opacus' ghost-clipping hooks, changed to keep each layer's inputs and output gradients (book-keeping)."""
    if "ghost" in _HOOK_CLASSES:
        return _HOOK_CLASSES["ghost"]
    from opacus.grad_sample import GradSampleHooksFastGradientClipping
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
    from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
    from opacus.utils.module_utils import trainable_parameters

    class BookkeepingGhostClippingHooks(GradSampleHooksFastGradientClipping):
        """Per backward pass: every sample's gradient norm per parameter (ghost norms for ``nn.Linear`` and
        ``nn.Embedding``, from per-sample gradients for the others, as Opacus' ghost clipping does), and what the
        clipped sum needs: the inputs and output gradients of the ghost-norm layers, the per-sample gradients of
        the others (which Opacus computes and drops; kept here until the end of the backward pass)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._captured: list[tuple[nn.Module, list[Tensor], Tensor]] = []
            self._per_sample: list[dict[Tensor, Tensor]] = []
            self._norms: dict[Tensor, Tensor] = {}

        def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                      force_functorch: bool = False) -> None:
            """A forward hook per layer that records its inputs (Opacus' ``capture_activations_hook``) and puts a
            gradient hook on its output. Opacus registers full backward hooks instead, which wrap every layer's
            inputs and outputs in extra autograd nodes; the output's gradient is all the norms need, and a tensor
            hook gets it for less (it also sees through a later in-place op, e.g. ``ReLU(inplace=True)``)."""
            if hasattr(self._module, "autograd_grad_sample_hooks"):
                raise ValueError("Trying to add hooks twice to the same model")
            self._module.autograd_grad_sample_hooks = []
            self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
            for module in self.iterate_submodules(self._module):
                if type(module) in (DPRNN, DPLSTM, DPGRU):
                    continue
                if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                    prepare_layer(module, batch_first=batch_first)
                self.autograd_grad_sample_hooks.append(module.register_forward_hook(
                    functools.partial(self._forward_hook, loss_reduction=loss_reduction, batch_first=batch_first)))
            self.enable_hooks()

        def _forward_hook(self, module: nn.Module, forward_input: Any, output: Any, *, loss_reduction: str,
                          batch_first: bool) -> None:
            recorded = len(getattr(module, "activations", ()))
            self.capture_activations_hook(module, forward_input, output)
            if len(getattr(module, "activations", ())) == recorded:
                return  # not recorded (eval mode, no grad, hooks disabled): no gradient to capture either
            out = output[0] if isinstance(output, (tuple, list)) else output
            out.register_hook(functools.partial(self._output_gradient_hook, module, loss_reduction=loss_reduction,
                                                batch_first=batch_first))

        def _output_gradient_hook(self, module: nn.Module, grad: Tensor, *, loss_reduction: str,
                                  batch_first: bool) -> None:
            self.capture_backprops_hook(module, None, (grad,), loss_reduction, batch_first)

        def _per_sample_gradients(self, module: nn.Module, activations: Any, backprops: Tensor) -> Any:
            sampler = None if self.force_functorch else self.GRAD_SAMPLERS.get(type(module))
            return (sampler or ft_compute_per_sample_gradient)(module, activations, backprops)

        def capture_backprops_hook(self, module: nn.Module, _forward_input: Any, forward_output: Any,
                                   loss_reduction: str, batch_first: bool) -> None:
            if not self.hooks_enabled:
                return
            params = [p for _, p in trainable_parameters(module)]
            if any(p._forward_counter > 1 for p in params):
                raise ValueError(
                    f"DifferentialPrivacy(grad_sample_mode='ghost'): {type(module).__name__} ran more than once in one "
                    "forward pass (shared weights or a reused layer); use grad_sample_mode='hooks'."
                )
            activations, backprops = self.rearrange_grad_samples(
                module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction,
                batch_first=batch_first)
            if self.use_ghost_clipping and type(module) in self.NORM_SAMPLERS:
                norms = self.NORM_SAMPLERS[type(module)](module, activations, backprops)
                self._captured.append((module, activations, backprops))
            else:  # no ghost norm for this layer: per-sample gradients (as Opacus does), kept for the clipped sum
                grads = self._per_sample_gradients(module, activations, backprops)
                norms = {p: g.flatten(1).norm(2, dim=-1) for p, g in grads.items()}
                self._per_sample.append(grads)
            for p in params:
                p._forward_counter -= 1
            self._norms.update({p: n for p, n in norms.items() if p.requires_grad})
            if not module.activations and hasattr(module, "max_batch_len"):
                del module.max_batch_len

        def clipped_sums(self) -> dict[Tensor, Tensor]:
            """The clipped per-sample gradients of the last backward pass, summed; forgets the captured tensors."""
            captured, per_sample_grads, norms = self._captured, self._per_sample, self._norms
            self._captured, self._per_sample, self._norms = [], [], {}
            if not norms:
                return {}
            per_sample = torch.stack([n.float() for n in norms.values()]).norm(2, dim=0)
            self.per_sample_gradient_norms = per_sample
            coefficients = P.clip_coefficients(per_sample, self.max_grad_norm)
            sums: dict[Tensor, Tensor] = {}
            for module, activations, backprops in captured:
                for p, g in P.clipped_gradient_sum(module, activations, backprops, coefficients,
                                                   self._per_sample_gradients).items():
                    sums[p] = sums[p] + g if p in sums else g
            for grads in per_sample_grads:
                for p, g in grads.items():
                    if p.requires_grad:
                        total = torch.einsum("n,n...->...", coefficients.to(g), g)
                        sums[p] = sums[p] + total if p in sums else total
            return sums

    _HOOK_CLASSES["ghost"] = BookkeepingGhostClippingHooks
    return BookkeepingGhostClippingHooks


# ---------------------------------------------------------------------- model checks


def _incompatible_layers(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, layer, reason) for every layer Opacus cannot train privately."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    problems: list[tuple[str, nn.Module, str]] = []
    seen: set[str] = set()
    for name, m in module.named_modules():
        if isinstance(m, batch_norms):
            problems.append((name, m, "BatchNorm normalises each sample with statistics of the whole batch, so "
                                      "per-sample gradients do not exist"))
            seen.add(name)
    for name, m in trainable_modules(module):
        if name in seen:
            continue
        validator = ModuleValidator.VALIDATORS.get(type(m))
        errors = list(validator(m)) if validator is not None else []
        if errors:
            problems.append((name, m, "; ".join(str(e) for e in errors)))
        elif any(True for _ in m.buffers(recurse=False)):
            problems.append((name, m, "a trainable layer with buffers (state computed from the batch is not private)"))
    return problems


def _raise_on_incompatible_layers(module: nn.Module) -> None:
    problems = _incompatible_layers(module)
    if not problems:
        return
    lines = "\n".join(f"  - `{name}` ({type(m).__name__}): {reason}" for name, m, reason in problems)
    raise ValueError(
        "DifferentialPrivacy: the model has layers Opacus cannot train with per-sample gradients:\n"
        f"{lines}\n"
        "Fix: replace them, e.g. `model = opacus.validators.ModuleValidator.fix(model)` (BatchNorm -> GroupNorm, "
        "LSTM -> DPLSTM, ...), or pass DifferentialPrivacy(fix_model=True) to do it in place before the optimizer "
        "is built."
    )


def _fix_in_place(module: nn.Module) -> list[str]:
    """Apply Opacus' ModuleValidator fixers to the layers that have one, replacing them inside ``module``."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    fixed = []
    for name, m in list(trainable_modules(module)):
        fixer = ModuleValidator.FIXERS.get(type(m))
        if fixer is None or not name:
            continue
        replacement = fixer(m)
        replacement.to(next(m.parameters()).device)
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, replacement)
        fixed.append(f"`{name}` ({type(m).__name__} -> {type(replacement).__name__})")
    return fixed


def _secure_generator() -> Any:
    try:
        import torchcsprng as csprng
    except ImportError as err:
        raise ImportError("DifferentialPrivacy(secure_mode=True) needs torchcsprng (a cryptographically secure "
                          "generator), as Opacus does: https://github.com/pytorch/csprng#installation") from err
    return csprng.create_random_device_generator("/dev/urandom")


# ---------------------------------------------------------------------- argument checks


def _check_args(noise_multiplier: float | None, target_epsilon: float | None, target_delta: float,
                max_grad_norm: float | list[float], clipping: str, grad_sample_mode: str, accountant: str,
                stop_at_epsilon: float | None, loss_reduction: str,
                adaptive_clipping: Mapping[str, float] | None, seed: int | None) -> None:
    def positive(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
            raise ValueError(f"`{name}` must be a finite float > 0, got {name}={value!r}.")

    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("Give exactly one of `noise_multiplier` and `target_epsilon`, got "
                         f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}.")
    if noise_multiplier is not None and (isinstance(noise_multiplier, bool)
                                         or not isinstance(noise_multiplier, (int, float))
                                         or not 0.0 <= noise_multiplier < math.inf):
        raise ValueError(f"`noise_multiplier` must be a finite float >= 0, got noise_multiplier={noise_multiplier!r}.")
    if target_epsilon is not None:
        positive("target_epsilon", target_epsilon)
    if isinstance(target_delta, bool) or not isinstance(target_delta, (int, float)) or not 0.0 < target_delta < 1.0:
        raise ValueError(f"`target_delta` must be a float in (0, 1), got target_delta={target_delta!r}.")
    if clipping not in _CLIPPINGS:
        raise ValueError(f"`clipping` must be one of {_CLIPPINGS}, got clipping={clipping!r}.")
    if isinstance(max_grad_norm, list):
        if clipping != "per_layer":
            raise ValueError(
                f"`max_grad_norm` can be a list only with clipping='per_layer', got clipping={clipping!r}.")
        for c in max_grad_norm:
            positive("max_grad_norm", c)
    else:
        positive("max_grad_norm", max_grad_norm)
    if grad_sample_mode not in _GRAD_SAMPLE_MODES:
        raise ValueError(f"`grad_sample_mode` must be one of {_GRAD_SAMPLE_MODES}, got "
                         f"grad_sample_mode={grad_sample_mode!r}.")
    if grad_sample_mode == "ghost" and clipping != "flat":
        raise ValueError(f"grad_sample_mode='ghost' supports clipping='flat' only (Opacus), got clipping={clipping!r}.")
    if accountant not in P.ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {P.ACCOUNTANTS}, got accountant={accountant!r}.")
    if stop_at_epsilon is not None:
        positive("stop_at_epsilon", stop_at_epsilon)
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"`loss_reduction` must be 'mean' or 'sum', got loss_reduction={loss_reduction!r}.")
    if adaptive_clipping is not None:
        if clipping != "adaptive":
            raise ValueError(f"`adaptive_clipping` options need clipping='adaptive', got clipping={clipping!r}.")
        allowed = {"target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound", "min_clipbound",
                   "unclipped_num_std"}
        unknown = set(adaptive_clipping) - allowed
        if unknown:
            raise ValueError(f"Unknown `adaptive_clipping` options {sorted(unknown)}; allowed: {sorted(allowed)}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"`seed` must be None or an integer >= 0, got seed={seed!r}.")
