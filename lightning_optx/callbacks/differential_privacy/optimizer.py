"""The DP optimizer: Opacus' optimizer classes with the steps changed that Lightning and exact clipping need.

:func:`dp_optimizer_class` mixes :class:`LightningDPStep` (and, by the base class, a few smaller mixins) into the
Opacus class ``get_optimizer_class`` picks. What changes, and why:

* ``pre_step``: refuses a step beyond the privacy budget (the callback's guard) and, in reproducible mode,
  reseeds the noise for this step;
* ``clip_and_accumulate``: per-sample norms, clip factors and the clipped sum in fp32 (fp64 for fp64 parameters)
  whatever the gradients' dtype; Opacus computes them in the gradients' dtype, and under bf16 a norm just above
  the bound can round below it, so the sample escapes clipping and the sensitivity the accountant assumes is
  exceeded;
* ``add_noise`` / ``scale_grad`` / ``reduce_gradients``: the noise is added to the fp32 sum, the result divided by
  the expected batch size and (under DDP) all-reduced in fp32, and only then rounded to the parameter's dtype
  (rounding is post-processing of a private value; rounding a noiseless per-rank sum would not be);
* one normalisation per Poisson batch however many micro-batches it was split into.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_optx.callbacks.differential_privacy.ghost import bookkeeping_hooks_class
from lightning_optx.functional import privacy as P


class LightningDPStep:
    """Mixed into Opacus' flat and per-layer DP optimizer classes (hooks, functorch and ghost)."""

    _optx_dp: Any  # the DifferentialPrivacy callback: budget guard and randomness
    _optx_distributed: bool
    #: fp32 per-sample norms and clip factors of the last step (flat clipping), for inspection
    last_per_sample_norms: Tensor | None = None
    last_clip_factors: Tensor | None = None

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        dp = self._optx_dp
        if not dp._step_allowed():
            for p in self.params:  # type: ignore[attr-defined]
                p.__dict__.pop("_optx_clipped_sum", None)  # a refused step's sums must not reach the next one
            return False
        dp._before_noise()
        return super().pre_step(closure)  # type: ignore[misc]

    def clip_and_accumulate(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        params = self.params  # type: ignore[attr-defined]
        grad_samples = [self._get_flat_grad_sample(p) for p in params]  # type: ignore[attr-defined]
        bounds = getattr(self, "max_grad_norms", None)  # per-layer clipping: one bound per parameter
        if bounds is None:
            norms = P.per_sample_norms(grad_samples)
            coefficients: Tensor | list[Tensor] = P.clip_coefficients(norms, self.max_grad_norm)  # type: ignore[attr-defined]
            self.last_per_sample_norms, self.last_clip_factors = norms, coefficients  # type: ignore[assignment]
        else:
            coefficients = [P.clip_coefficients(P.per_sample_norms([g]), c) for g, c in zip(grad_samples, bounds)]
        for p, summed in zip(params, P.clipped_sums(grad_samples, coefficients)):
            _check_processed_flag(p.grad_sample)
            p.summed_grad = summed if p.summed_grad is None else p.summed_grad + summed
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        params = self.params  # type: ignore[attr-defined]
        std = float(self.noise_multiplier) * float(self.max_grad_norm)  # type: ignore[attr-defined]
        sums = []
        for p in params:
            _check_processed_flag(p.summed_grad)
            sums.append(p.summed_grad.to(P.work_dtype(p.summed_grad.dtype)))
        if getattr(self, "rank", 0) == 0 and std > 0:  # DDP: rank 0 alone adds the noise
            sums = [s + n for s, n in zip(sums, self._noise(sums, std))]
        for p, noised in zip(params, sums):
            p._optx_noised = noised
            _mark_as_processed(p.summed_grad)

    def _noise(self, references: list[Tensor], std: float) -> list[Tensor]:
        """``N(0, std^2)`` per coordinate; one draw for all parameters unless secure mode or mixed dtypes."""
        from opacus.optimizers.optimizer import _generate_noise

        generator, secure = self.generator, self.secure_mode  # type: ignore[attr-defined]
        if secure or len({(r.dtype, r.device) for r in references}) != 1:
            return [_generate_noise(std=std, reference=r, generator=generator, secure_mode=secure)
                    for r in references]
        flat = torch.normal(0.0, std, size=(sum(r.numel() for r in references),), generator=generator,
                            device=references[0].device, dtype=references[0].dtype)
        return [n.view_as(r) for n, r in zip(flat.split([r.numel() for r in references]), references)]

    def scale_grad(self) -> None:
        # One Poisson batch per optimizer step, however many micro-batches it was split into: divide by its
        # expected size (per rank; the distributed optimizer then averages over ranks) once.
        mean = self.loss_reduction == "mean"  # type: ignore[attr-defined]
        for p in self.params:  # type: ignore[attr-defined]
            noised = p._optx_noised.view_as(p)
            if mean:
                noised = noised / self.expected_batch_size  # type: ignore[attr-defined]
            if self._optx_distributed:
                p._optx_noised = noised  # all-reduced in fp32 by reduce_gradients
            else:
                p.grad = noised.to(p.dtype)
                del p._optx_noised

    def reduce_gradients(self) -> None:
        """DDP only (Opacus calls it between ``pre_step`` and the wrapped step): all-reduce in fp32, then round."""
        world = self.world_size  # type: ignore[attr-defined]
        for p in self.params:  # type: ignore[attr-defined]
            noised = p._optx_noised
            torch.distributed.all_reduce(noised, op=torch.distributed.ReduceOp.SUM)
            if self.loss_reduction == "mean":  # type: ignore[attr-defined]
                noised /= world
            p.grad = noised.to(p.dtype)
            del p._optx_noised


class FastGradientClippingSteps:
    """Ghost clipping: the backward pass already built each parameter's clipped sum (in fp32, kept as
    ``p._optx_clipped_sum``; ``.grad`` holds it rounded to the parameter's dtype): take it as is, where Opacus
    ``copy.deepcopy``-s ``.grad``."""

    def accumulate(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            clipped = p.__dict__.pop("_optx_clipped_sum", None)
            if clipped is None:
                clipped = p.grad.to(P.work_dtype(p.dtype))
            p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped


class AdaClipEmptyBatch:
    """Opacus' adaptive-clipping optimizer cannot take an empty Poisson batch; make it a no-information step.
    Adaptive clipping keeps Opacus' own clipping and noise (it is refused under bf16)."""

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


class AdaClipStep:
    """Adaptive clipping: the budget guard and per-step noise seed only (Opacus' clipping, noise and scaling)."""

    _optx_dp: Any
    _optx_distributed: bool

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        dp = self._optx_dp
        if not dp._step_allowed():
            return False
        dp._before_noise()
        return super().pre_step(closure)  # type: ignore[misc]

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":  # type: ignore[attr-defined]
            for p in self.params:  # type: ignore[attr-defined]
                p.grad /= self.expected_batch_size  # type: ignore[attr-defined]


_DP_CLASSES: dict[type, type] = {}


def dp_optimizer_class(base: type) -> type:
    """``base`` (an Opacus DP optimizer class) with the mixins above, created once per base."""
    from opacus.optimizers import AdaClipDPOptimizer, DPOptimizerFastGradientClipping

    if base not in _DP_CLASSES:
        mixins: tuple[type, ...]
        if issubclass(base, AdaClipDPOptimizer):
            mixins = (AdaClipStep, AdaClipEmptyBatch)
        elif issubclass(base, DPOptimizerFastGradientClipping):
            mixins = (LightningDPStep, FastGradientClippingSteps)
        else:
            mixins = (LightningDPStep,)
        _DP_CLASSES[base] = type(f"Optx{base.__name__}", (*mixins, base), {})
    return _DP_CLASSES[base]


def clip_bound(clipping: str, max_grad_norm: float | list[float], n_params: int) -> float | list[float]:
    """The ``max_grad_norm`` Opacus' optimizer takes: one bound, or one per parameter tensor (per-layer)."""
    import math

    if clipping != "per_layer":
        if isinstance(max_grad_norm, list):
            raise ValueError(f"`max_grad_norm` must be a float with clipping={clipping!r}, got a list.")
        return max_grad_norm
    if isinstance(max_grad_norm, list):
        if len(max_grad_norm) != n_params:
            raise ValueError(f"`max_grad_norm` holds {len(max_grad_norm)} bounds but the optimizer has "
                             f"{n_params} trainable parameter tensors.")
        return list(max_grad_norm)
    return [max_grad_norm / math.sqrt(n_params)] * n_params


def adaptive_options(max_grad_norm: float, expected_batch_size: float, noise_multiplier: float,
                     overrides: dict[str, float]) -> dict[str, float]:
    """Opacus' adaptive-clipping options with our defaults, checked against the noise (Andrew et al., Thm 1)."""
    opts = {
        "target_unclipped_quantile": 0.5,
        "clipbound_learning_rate": 0.2,
        "max_clipbound": 100.0 * max_grad_norm,
        "min_clipbound": max_grad_norm / 100.0,
        "unclipped_num_std": expected_batch_size / 20.0,
    }
    opts.update(overrides)
    if not noise_multiplier < 2.0 * opts["unclipped_num_std"]:
        raise ValueError(
            f"DifferentialPrivacy(clipping='adaptive'): noise_multiplier={noise_multiplier:.4g} must be below "
            f"2 * unclipped_num_std={2.0 * opts['unclipped_num_std']:.4g} (Andrew et al., Theorem 1); raise "
            "adaptive_clipping['unclipped_num_std'] or lower the noise."
        )
    return opts


class OptimizerWrapping:
    """Attach Opacus' per-sample hooks and wrap the LightningModule's optimizer (mixed into the callback)."""

    grad_sample_mode: str
    clipping: str
    max_grad_norm: float | list[float]
    loss_reduction: str
    secure_mode: bool
    adaptive_clipping: dict[str, float]
    expected_batch_size: float | None
    resolved_noise_multiplier: float | None
    randomness: Any
    _hooks: Any
    _dp_optimizer: Any
    _restored_max_grad_norm: float | None
    _mode: str

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    def _account_step(self, optimizer: Any) -> None:
        raise NotImplementedError

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

        distributed = trainer.world_size > 1 and self._mode == "ddp"  # per replica: every process its own DP-SGD
        ghost_mode = self.grad_sample_mode == "ghost"
        hooks_cls = bookkeeping_hooks_class() if ghost_mode else get_hooks_class(self.grad_sample_mode)
        hook_kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": self.loss_reduction}
        if ghost_mode:
            hook_kwargs["max_grad_norm"] = self.max_grad_norm
        elif self.grad_sample_mode == "functorch":
            hook_kwargs["force_functorch"] = True
        self._remove_hooks()
        self._hooks = hooks_cls(pl_module, **hook_kwargs)

        base = get_optimizer_class(clipping=self.clipping, distributed=distributed,
                                   grad_sample_mode="ghost" if ghost_mode else "hooks")
        assert self.expected_batch_size is not None and self.resolved_noise_multiplier is not None
        kwargs: dict[str, Any] = {
            "noise_multiplier": self.resolved_noise_multiplier,
            "max_grad_norm": clip_bound(self.clipping, self.max_grad_norm, len(params)),
            # per rank (Opacus' convention; per replica: one process each)
            "expected_batch_size": self.expected_batch_size / trainer.world_size,
            "loss_reduction": self.loss_reduction,
            "generator": self.randomness.noise,
            "secure_mode": self.secure_mode,
        }
        if self.clipping == "adaptive":
            assert isinstance(self.max_grad_norm, float)
            kwargs.update(adaptive_options(self.max_grad_norm, self.expected_batch_size,
                                           self.resolved_noise_multiplier, self.adaptive_clipping))
            if self._restored_max_grad_norm is not None:
                kwargs["max_grad_norm"] = self._restored_max_grad_norm
        dp_optimizer = dp_optimizer_class(base)(optimizer, **kwargs)
        dp_optimizer._optx_dp = self
        dp_optimizer._optx_distributed = distributed
        dp_optimizer.attach_step_hook(self._account_step)
        self._dp_optimizer = dp_optimizer
        trainer.strategy.optimizers = [dp_optimizer]  # public setter: also rebuilds the LightningOptimizer wrapper


def complete_per_sample_state(dp: Any, ghost_mode: bool) -> None:
    """Before the DP step: a parameter that got no per-sample gradient (unused in this step's forward, or an empty
    batch) has a zero gradient for every sample of the batch (ghost: a zero clipped sum)."""
    if ghost_mode:
        for p in dp.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return
    lengths = [sum(len(g) for g in p.grad_sample) if isinstance(p.grad_sample, list) else len(p.grad_sample)
               for p in dp.params if getattr(p, "grad_sample", None) is not None]
    n = max(lengths, default=0)
    for p in dp.params:
        if getattr(p, "grad_sample", None) is None:
            p.grad_sample = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
