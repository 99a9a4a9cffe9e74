"""What DifferentialPrivacy refuses, and why: bad arguments, trainer settings, callbacks and layers that would
break the guarantee; and the in-place layer fixes of ``fix_model=True``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from lightning_optx.compatibility import strategy_key
from lightning_optx.functional import privacy as P

CLIPPINGS = ("flat", "per_layer", "adaptive")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")

#: Callbacks that break the guarantee, by class name (callbacks never import each other), with the reason.
REFUSED_CALLBACKS: dict[str, str] = {
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
FP16_REASON = (
    "fp16 mixed precision scales the loss (GradScaler): the per-sample gradients Opacus clips would be the scaled "
    "ones, so `max_grad_norm` would bound the wrong quantity. Use precision='bf16-mixed' or '32-true'"
)


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, clipping: str, callback_type: type) -> Mode:
    """Refuse trainer settings, strategies and callbacks under which DP-SGD's guarantee would not hold; return how
    DP-SGD runs under the trainer's strategy (see :func:`data_parallel_mode`)."""
    if not pl_module.automatic_optimization:
        raise ValueError("DifferentialPrivacy needs automatic optimization: the DP optimizer step, the Poisson "
                         "batches and the accounting follow the optimizer steps Lightning runs.")
    mode = data_parallel_mode(trainer.strategy)
    precision = str(trainer.precision)
    if precision in ("16-mixed", "16"):
        raise ValueError(f"DifferentialPrivacy does not support precision={precision!r}: {FP16_REASON}.")
    if precision == "16-true":
        raise ValueError("DifferentialPrivacy does not support precision='16-true': fp16 per-sample gradients "
                         "under- and overflow without loss scaling. Use 'bf16-mixed', 'bf16-true' or '32-true'.")
    if clipping == "adaptive" and "bf16" in precision:
        raise ValueError(f"DifferentialPrivacy: clipping='adaptive' is not supported with precision={precision!r}: "
                         "Opacus' adaptive-clipping optimizer clips in the gradients' dtype, so bf16 rounding can "
                         "exceed the bound. Use clipping='flat' or 'per_layer' (clipped in fp32), or '32-true'.")
    if trainer.gradient_clip_val:
        raise ValueError(
            f"DifferentialPrivacy: unset gradient_clip_val (got {trainer.gradient_clip_val!r}): Lightning clips "
            "the summed, non-private gradient; DP-SGD clips every sample's gradient to `max_grad_norm`."
        )
    if clipping == "adaptive" and trainer.world_size > 1:
        raise ValueError("DifferentialPrivacy: clipping='adaptive' is single-process only (Opacus has no "
                         "distributed adaptive-clipping optimizer); use 'flat' or 'per_layer' under DDP.")
    dps = [cb for cb in trainer.callbacks if isinstance(cb, callback_type)]  # type: ignore[attr-defined]
    if len(dps) > 1:
        raise ValueError("Only one DifferentialPrivacy callback can be used per Trainer.")
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        names = {c.__name__ for c in type(cb).__mro__}
        for name, reason in REFUSED_CALLBACKS.items():
            if name in names:
                raise ValueError(f"DifferentialPrivacy cannot be combined with {type(cb).__name__}: {reason}. "
                                 "Remove one of the two callbacks.")
    return mode


# ---------------------------------------------------------------------- strategies

#: How DP-SGD runs under a strategy: ``"single"`` (one process), ``"ddp"`` (one DP-SGD over all ranks: Opacus'
#: distributed optimizer, noise on rank 0, the noised sum all-reduced) or ``"replicas"`` (Local SGD, DiLoCo: every
#: process is a replica running its own DP-SGD on its own shard, full noise on every replica, no gradient
#: all-reduce; the strategy's averaging and outer steps post-process the replicas' noised parameters).
Mode = Literal["single", "ddp", "replicas"]

COMPRESSED_REASON = (
    "a compressed, error-fed per-rank message is not a post-processing of the noised sum: the compressor would "
    "average each rank's raw gradient sum, before Opacus clips per sample and adds the noise, and its error "
    "feedback carries what it dropped into later steps"
)
WARMUP_REASON = (
    "Local SGD's warm-up is plain DDP (identical replicas, gradients averaged every step), which under DP-SGD "
    "needs Opacus' distributed optimizer (noise added once to the all-reduced sum), while after the warm-up every "
    "replica needs its own noise; the callback runs one DP-SGD per replica for the whole fit, so the warm-up "
    "replicas would drift apart unaveraged. Use warmup_steps=0"
)
NODE_REPLICA_REASON = (
    "a replica of {size} processes keeps its processes identical by averaging their raw gradients every step, "
    "which under DP-SGD needs a distributed DP optimizer inside each replica (noise once per replica, on the "
    "all-reduced clipped sum); the callback runs one DP-SGD per process. Use replica_size=1 (one process per replica)"
)


def strategy_name(strategy: Any) -> str:
    """The strategy's name in the compatibility table (:func:`lightning_optx.compatibility.strategy_key`:
    ``"ddp"``, ``"local_sgd"``, ``"diloco"``, ``"diloco_x"``, ``"ddp_<compressor>"``, subclasses included),
    ``"single_device"``, else its class name."""
    if type(strategy) is SingleDeviceStrategy:
        return "single_device"
    key = strategy_key(strategy)
    return key if key is not None else type(strategy).__name__


def data_parallel_mode(strategy: Any) -> Mode:
    """How DP-SGD runs under ``strategy``, or a ``ValueError`` naming the callback, the strategy and the reason
    where the privacy argument fails (see docs/methods/differential-privacy.md, "With Local SGD and DiLoCo")."""
    if type(strategy) is SingleDeviceStrategy:
        return "single"
    name = strategy_name(strategy)
    if name == "ddp":
        return "ddp"

    def refuse(reason: str) -> ValueError:
        return ValueError(f"DifferentialPrivacy cannot run under strategy {name!r} ({type(strategy).__name__}): "
                          f"{reason}.")

    if name.startswith("ddp_"):
        raise refuse(COMPRESSED_REASON)
    if name not in ("local_sgd", "diloco", "diloco_x"):
        raise refuse("DifferentialPrivacy supports single-device training, Lightning's DDPStrategy ('ddp'), Local "
                     "SGD ('local_sgd') and DiLoCo ('diloco', 'diloco_x'): Opacus' optimizer, or one DP-SGD per "
                     "replica, must be the only one to reduce gradients")
    if name == "local_sgd" and getattr(strategy, "warmup_steps", 0) > 0:
        raise refuse(f"warmup_steps={strategy.warmup_steps}: {WARMUP_REASON}")
    size = int(getattr(strategy, "replica_size", 1))
    if size > 1:
        raise refuse(f"replica_size={size}: {NODE_REPLICA_REASON.format(size=size)}")
    return "replicas"

# ---------------------------------------------------------------------- model checks


def incompatible_layers(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
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


def raise_on_incompatible_layers(module: nn.Module) -> None:
    problems = incompatible_layers(module)
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


def fix_in_place(module: nn.Module) -> list[str]:
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


# ---------------------------------------------------------------------- argument checks


def check_args(noise_multiplier: float | None, target_epsilon: float | None, target_delta: float,
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
    if clipping not in CLIPPINGS:
        raise ValueError(f"`clipping` must be one of {CLIPPINGS}, got clipping={clipping!r}.")
    if isinstance(max_grad_norm, list):
        if clipping != "per_layer":
            raise ValueError(
                f"`max_grad_norm` can be a list only with clipping='per_layer', got clipping={clipping!r}.")
        for c in max_grad_norm:
            positive("max_grad_norm", c)
    else:
        positive("max_grad_norm", max_grad_norm)
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got "
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
