"""GradES as a Lightning callback: freeze each converged attention/FFN matrix, stop when all are frozen."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn import Parameter
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_optx.callbacks._steps import holds_compiled_module, planned_rounds, rounds_after_batch
from lightning_optx.compatibility import check_supported
from lightning_optx.distributed import Communicator
from lightning_optx.functional import grades as F

MetricName = Literal["grad", "weight_delta"]
TauMode = Literal["absolute", "relative"]


class GradES(Callback):
    """Gradient-based early stopping of individual weight matrices (Wen et al., "GradES").

    Every attention projection and feed-forward matrix found in the model is watched on its own (a LoRA
    adapter's ``lora_A`` / ``lora_B`` pair as one component, as in the authors' code). Once
    ``grace_fraction`` of the planned optimizer steps have passed, a component whose metric is below ``tau``
    is frozen: ``requires_grad`` is switched off, so autograd skips its weight-gradient matmul (the speed-up),
    and its ``.grad`` is dropped, so momentum and weight decay no longer move it. When every component is
    frozen and ``stop_when_all_frozen``, training stops.

    The metric is measured once per optimizer step on what Lightning hands to ``on_before_optimizer_step``
    (unscaled, accumulated, DDP-averaged gradients), with L1 norms accumulated in float32 (an fp16 sum
    overflows), then averaged across ranks, so every rank takes the same freeze decision. A step whose
    gradients hold inf/NaN (the fp16 grad scaler skips it) is neither measured nor counted
    (``skipped_steps``), and neither is a component whose gradient is ``None`` (a branch not reached yet).
    Under DDP the wrapper is rebuilt after a freeze so that its reducer stops waiting for the frozen
    gradients (plain ``find_unused_parameters=False`` DDP would fail otherwise), without DDP's initial
    broadcast, so under Local SGD / DiLoCo every rank keeps its local progress. Our strategies then stop
    sending frozen matrices (after one last average under Local SGD / DiLoCo, see ``docs/methods/grades.md``).

    Relative mode: each component's reference is the largest finite metric it showed during the grace period
    (or, for a component first reached later, its first non-zero one). The maximum, not the first value, so
    that a zero-initialised factor or a small first step does not make the threshold zero.

    Resume: the frozen set is re-applied in ``on_train_start``, after ``configure_optimizers`` has run with
    every matrix trainable (as in the run that wrote the checkpoint, so the common idiom of building the
    optimizer from ``p.requires_grad`` parameters matches the saved optimizer state) and after that state is
    restored.

    Manual optimization (several optimizers) works: each optimizer's components are measured at its step,
    and the steps are counted in batches (the unit of ``trainer.estimated_stepping_batches``).

    ``torch.compile``: dynamo guards on ``requires_grad``, so every freeze event recompiles the graph, and past
    its recompile limit (8) the model silently runs eagerly. When the model holds a compiled module, freeze
    decisions are therefore taken only at the end of the grace period and every
    ``ceil((planned - grace) / compile_freeze_events)`` steps after it, ``compile_freeze_events`` times at
    most: at most ``compile_freeze_events`` recompiles.

    Args:
        tau: threshold. ``tau_mode="absolute"``: freeze when the metric is below ``tau``. ``"relative"``: freeze
            when it is below ``tau`` times the component's reference (see above; ``0 < tau < 1``).
        grace_fraction: fraction of the planned optimizer steps (``trainer.estimated_stepping_batches``) during
            which nothing is frozen; the paper uses 0.55.
        metric: ``"grad"`` (mean absolute gradient of the component) or ``"weight_delta"`` (mean absolute change
            of the component made by the last optimizer step's update, as in the authors' code; under Local
            SGD / DiLoCo the jump of a synchronisation is not part of it).
        targets: ``"auto"`` (attention and FFN matrices of common layouts, or only LoRA adapters when present)
            or a list of regular expressions matched (``re.search``) against parameter names.
        stop_when_all_frozen: set ``trainer.should_stop`` once every component is frozen.
        remove_from_optimizer: also drop frozen matrices (and their state) from the optimizers' param groups,
            which frees their optimizer memory. Off by default: frozen parameters without ``.grad`` are
            already skipped by every PyTorch optimizer.
        tau_mode: ``"absolute"`` or ``"relative"`` (see ``tau``).
        compile_freeze_events: under ``torch.compile``, the most freeze events (recompiles) after the grace
            period.

    Choosing ``tau``: run a few hundred steps with the callback and ``grace_fraction`` near 1 and read the
    logged ``grades/metric_min`` / ``grades/metric_max`` curves; ``tau`` a little above where the curves
    flatten freezes the matrices that have settled. The relative mode (``tau=0.1`` to ``0.3``) needs no such
    calibration.

    Examples:
        >>> from lightning_optx import GradES
        >>> cb = GradES(tau=0.2, tau_mode="relative", grace_fraction=0.5)
        >>> cb = GradES(tau=1e-4, targets=[r"fc\\d\\.weight$"])   # a plain MLP, by regex
    """

    def __init__(
        self,
        tau: float,
        grace_fraction: float = 0.55,
        metric: MetricName = "grad",
        targets: Literal["auto"] | list[str] = "auto",
        stop_when_all_frozen: bool = True,
        remove_from_optimizer: bool = False,
        tau_mode: TauMode = "absolute",
        compile_freeze_events: int = 4,
    ) -> None:
        F.check_grades_args(tau, grace_fraction, metric, tau_mode)
        if targets != "auto" and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
            raise ValueError(f"`targets` must be 'auto' or a list of regular expressions, got targets={targets!r}.")
        if isinstance(compile_freeze_events, bool) or not isinstance(compile_freeze_events, int) \
                or compile_freeze_events < 1:
            raise ValueError(f"`compile_freeze_events` must be an integer >= 1, got "
                             f"compile_freeze_events={compile_freeze_events!r}.")
        self.tau = float(tau)
        self.grace_fraction = float(grace_fraction)
        self.metric = metric
        self.targets = targets
        self.stop_when_all_frozen = stop_when_all_frozen
        self.remove_from_optimizer = remove_from_optimizer
        self.tau_mode = tau_mode
        self.compile_freeze_events = compile_freeze_events

        self.frozen: dict[str, int] = {}  # component -> optimizer-step round at which it froze
        self.reference: dict[str, float] = {}  # relative mode: max finite metric over the grace period
        self.last_metrics: dict[str, float] = {}
        self.measured_steps = 0
        self.skipped_steps = 0  # non-finite steps (skipped by the grad scaler): neither measured nor counted
        self.grace_steps = 0
        self.freeze_interval = 1  # > 1 under torch.compile: freeze decisions only every so many rounds
        self._last_decision_step: float = math.inf  # finite under torch.compile: the last freeze decision
        self._restoring_into: pl.Trainer | None = None  # set while a checkpoint may still be restored
        self._components: dict[str, list[str]] = {}  # component -> parameter names
        self._params: dict[str, Parameter] = {}
        self._pending: dict[str, Tensor] = {}  # component -> this step's metric, not yet averaged across ranks
        self._step_hooks: dict[int, RemovableHandle] = {}  # weight_delta: id(optimizer) -> its step post-hook
        self._valid: dict[str, bool] = {}  # component -> measured (finite, reached) at this step
        self._stepped = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric, targets=self.targets)

    @property
    def target_names(self) -> list[str]:
        """Every watched parameter."""
        return list(self._params)

    @property
    def component_names(self) -> list[str]:
        """Every watched component: a parameter, or a LoRA A/B pair (``<layer>.lora[<adapter>]``)."""
        return list(self._components)

    @property
    def frozen_parameter_names(self) -> list[str]:
        """Every frozen parameter (both factors of a frozen LoRA pair)."""
        return [n for c in self.frozen for n in self._components.get(c, [])]

    @property
    def active_names(self) -> list[str]:
        """Components not frozen yet."""
        return [c for c in self._components if c not in self.frozen]

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported(self, trainer)
        # resuming into a module whose matrices are already frozen (fitted again in the same script): the
        # frozen set arrives with this callback's state, after `setup`; `on_fit_start` looks again then (and
        # raises if there is still nothing to watch, before any step)
        self._find_targets(pl_module, required=False)

    def _find_targets(self, pl_module: pl.LightningModule, required: bool) -> None:
        frozen_params = {n for c in self.frozen for n in self._components.get(c, [c])}
        named_all = dict(pl_module.named_parameters())
        frozen_params |= {n for n in named_all if F.component_of(n) in self.frozen}
        named = {n: p for n, p in named_all.items() if p.requires_grad or n in frozen_params}
        patterns = None if self.targets == "auto" else list(self.targets)
        names = F.find_targets(named, patterns)
        if not names and required:
            sample = ", ".join(list(named)[:8])
            raise ValueError(
                f"GradES found no target matrix with targets={self.targets!r} among the trainable parameters "
                f"(e.g. {sample}). Pass `targets` as a list of regular expressions over parameter names."
            )
        self._params = {n: named[n] for n in names}
        self._components = F.group_components(names)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._params or any(F.component_of(c) not in self._components and c not in self._components
                                   for c in self.frozen):
            self._find_targets(pl_module, required=True)  # the restored frozen set names matrices `setup` missed
        planned = planned_rounds(trainer)
        if not math.isfinite(planned):
            raise ValueError("GradES needs a finite training length (max_steps or max_epochs) to place its grace "
                             "period.")
        self.grace_steps = math.ceil(self.grace_fraction * planned)
        self.freeze_interval = 1
        self._last_decision_step = math.inf
        if holds_compiled_module(pl_module):
            # Each freeze flips `requires_grad`, which dynamo guards on: one recompile per freeze event.
            self.freeze_interval = max(1, math.ceil((planned - self.grace_steps) / self.compile_freeze_events))
            # decisions at grace, grace + interval, ...: the first `compile_freeze_events` of them only
            self._last_decision_step = self.grace_steps + (self.compile_freeze_events - 1) * self.freeze_interval
            rank_zero_info(f"GradES: the model is compiled; freeze decisions are batched every "
                           f"{self.freeze_interval} steps after the grace period (at most "
                           f"{self.compile_freeze_events} freeze events, each one recompile).")
        if trainer.strategy.restore_checkpoint_after_setup:
            self._restoring_into = trainer  # FSDP, DeepSpeed: the state arrives later, in `load_state_dict`
        else:
            self._prepare_restored_state(trainer)

    def _prepare_restored_state(self, trainer: pl.Trainer) -> None:
        """Between the restore of this callback's state and that of the optimizers' state."""
        # a checkpoint of an older version keys LoRA factors by parameter name: map them to their pair
        self.frozen = {F.component_of(k) if k in self._params else k: v for k, v in self.frozen.items()}
        self.reference = {F.component_of(k) if k in self._params else k: v for k, v in self.reference.items()}
        if self.remove_from_optimizer and self.frozen:
            # the checkpoint's param groups lack the frozen matrices
            _remove_from_optimizers(trainer.optimizers, self._frozen_params(self.frozen))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restoring_into = None
        # Resume: freeze only now, after `configure_optimizers` saw every matrix trainable (as in the run that
        # wrote the checkpoint, so an optimizer built from `p.requires_grad` parameters matches its saved state)
        # and after that state was loaded.
        if self.frozen:
            self._apply_frozen_flags()
            _rewrap_ddp(trainer.strategy)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_step_hooks()  # a fit that ended inside a batch must not leave a hook on the optimizer

    # ------------------------------------------------------------------ measuring

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        self._stepped = True
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = F.all_finite(grads)  # what the grad scaler checks: one inf anywhere skips the whole step
        measured: list[str] = []
        for c in self.active_names:
            members = [n for n in self._components[c] if id(self._params[n]) in in_optimizer]
            if not members:
                continue  # another optimizer's (manual optimization)
            reached = all(self._params[n].grad is not None for n in members)
            self._valid[c] = finite and reached
            if self._valid[c]:
                measured.append(c)
        if not measured:
            return
        if self.metric == "grad":
            tensors = [self._params[n].grad for c in measured for n in self._components[c]]
            values = F.group_mean_abs(tensors, [len(self._components[c]) for c in measured])  # type: ignore[arg-type]
            self._pending.update(zip(measured, values))
        else:
            self._measure_update_of(optimizer, measured)

    def _measure_update_of(self, optimizer: Optimizer, measured: list[str]) -> None:
        """``weight_delta``: the change made by this optimizer's own update, right after ``optimizer.step``.

        Measured in a step post-hook, not at ``on_train_batch_end``: our strategies synchronise (Local SGD's
        average, DiLoCo's outer step) between the two, and the jump to the average is not the step's change.
        A step the grad scaler skips never calls ``optimizer.step``: no hook, no measurement.
        """
        stepping = _innermost_optimizer(optimizer)
        old = self._step_hooks.pop(id(stepping), None)
        if old is not None:
            old.remove()  # a second step of this optimizer within the batch (manual optimization)
        before = {n: self._params[n].detach().clone() for c in measured for n in self._components[c]}

        def after_step(*_: Any) -> None:
            if not before:
                return  # already measured (the handle is removed at the batch end, not during the hook loop)
            deltas = [self._params[n].detach() - before[n] for c in measured for n in self._components[c]]
            values = F.group_mean_abs(deltas, [len(self._components[c]) for c in measured])
            self._pending.update(zip(measured, values))
            before.clear()

        self._step_hooks[id(stepping)] = stepping.register_step_post_hook(after_step)

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:
            return  # not an optimizer-step boundary (gradient accumulation)
        self._stepped = False
        self._remove_step_hooks()
        names = self.active_names
        if not names:
            return
        metrics, valid = self._reduce_measurements(trainer, names)
        self._pending, self._valid = {}, {}
        step = rounds_after_batch(trainer)
        if not valid.any():
            self.skipped_steps += 1
            return
        self.measured_steps += 1
        measured = [n for n, ok in zip(names, valid.tolist()) if ok]
        values = metrics[valid]
        self.last_metrics = dict(zip(measured, values.tolist()))
        for n, v in self.last_metrics.items():
            if step < self.grace_steps or not self.reference.get(n):
                updated = F.update_reference(self.reference.get(n), v)
                if updated is not None:
                    self.reference[n] = updated
        if self._may_freeze_at(step):
            self._decide(trainer, pl_module, measured, values, step)
        self._log(pl_module, values)
        if self.stop_when_all_frozen and not self.active_names:
            trainer.should_stop = True

    def _reduce_measurements(self, trainer: pl.Trainer, names: list[str]) -> tuple[Tensor, Tensor]:
        """Average every component's metric across ranks; a component counts only if every rank measured it.

        Every rank calls the collective at every step boundary, measured or not, so a step that one rank
        skips (or a branch one rank did not reach) cannot leave the others waiting.
        """
        device = next(iter(self._params.values())).device
        # weight_delta: a component whose optimizer never stepped (grad scaler skip) has no pending value
        by_name = {c: self._pending[c] for c in names if self._valid.get(c, False) and c in self._pending}
        zero = torch.zeros((), dtype=torch.float32, device=device)
        flags = torch.tensor([c in by_name for c in names], dtype=torch.float32, device=device)
        local = torch.cat([torch.stack([by_name.get(c, zero).to(device) for c in names]), flags])
        reduced = _mean_across_ranks(trainer.strategy, local).float().cpu()
        valid = reduced[len(names):] > 1.0 - 1e-6
        metrics = reduced[:len(names)]
        return metrics, valid & torch.isfinite(metrics)

    def _may_freeze_at(self, step: int) -> bool:
        if step < self.grace_steps or step > self._last_decision_step:
            return False
        return (step - self.grace_steps) % self.freeze_interval == 0

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str], metrics: Tensor,
                step: int) -> None:
        reference = None
        if self.tau_mode == "relative":
            reference = torch.tensor([self.reference.get(n, 0.0) for n in names])
        newly = [n for n, hit in zip(names, F.freeze_mask(metrics, self.tau, reference).tolist()) if hit]
        if newly:
            self._freeze(trainer, pl_module, newly, step)

    # ------------------------------------------------------------------ freezing

    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str], step: int) -> None:
        for n in names:
            self.frozen[n] = step
            rank_zero_info(f"GradES: froze {n} at step {step} (metric {self.last_metrics[n]:.3e})")
        self._apply_frozen_flags()
        if self.remove_from_optimizer:
            _remove_from_optimizers(trainer.optimizers, self._frozen_params(names))
        _rewrap_ddp(trainer.strategy)

    def _frozen_params(self, components: Iterable[str]) -> list[Parameter]:
        return [self._params[n] for c in components for n in self._components.get(c, []) if n in self._params]

    def _apply_frozen_flags(self) -> None:
        for p in self._frozen_params(self.frozen):
            p.requires_grad_(False)
            p.grad = None

    def _log(self, pl_module: pl.LightningModule, metrics: Tensor) -> None:
        frozen_numel = sum(p.numel() for p in self._frozen_params(self.frozen))
        all_numel = sum(p.numel() for p in self._params.values())
        pl_module.log_dict(
            {
                "grades/frozen_fraction": len(self.frozen) / len(self._components),
                "grades/frozen_param_fraction": frozen_numel / all_numel,
                "grades/metric_min": float(metrics.min()),
                "grades/metric_max": float(metrics.max()),
                "grades/skipped_steps": float(self.skipped_steps),
            },
            on_step=True, on_epoch=False,
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": dict(self.frozen), "reference": dict(self.reference),
                "last_metrics": dict(self.last_metrics), "measured_steps": self.measured_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Nothing is frozen here: `on_train_start` does it once the optimizers are built and restored.
        self.frozen = {k: int(v) for k, v in state_dict["frozen"].items()}
        self.reference = dict(state_dict["reference"])
        self.last_metrics = dict(state_dict["last_metrics"])
        self.measured_steps = int(state_dict.get("measured_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        if self._restoring_into is not None:  # restored after `on_fit_start`, before the optimizers' state
            self._prepare_restored_state(self._restoring_into)


def _innermost_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that updates the weights: Opacus' ``DPOptimizer`` steps its ``original_optimizer``."""
    while isinstance(getattr(optimizer, "original_optimizer", None), Optimizer):
        optimizer = optimizer.original_optimizer  # type: ignore[attr-defined]
    return optimizer


def _mean_across_ranks(strategy: Any, tensor: Tensor) -> Tensor:
    """The mean over every rank, through our strategies' ledger (tag ``"control"``) when they are used.

    Under Local SGD / DiLoCo each rank measures its own gradients; the decision is taken from the mean of
    every rank's metric, identical on every rank, so all ranks freeze the same matrices at the same step.
    """
    comm = getattr(strategy, "world_comm", None)
    if isinstance(comm, Communicator):
        if comm.active:
            comm.all_reduce_(tensor, op="mean", tag="control")
        return tensor
    return strategy.reduce(tensor, reduce_op="mean")


def _remove_from_optimizers(optimizers: list[Optimizer], params: list[Parameter]) -> None:
    ids = {id(p) for p in params}
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for p in params:
            opt.state.pop(p, None)


def _rewrap_ddp(strategy: Any) -> None:
    """Rebuild DDP's wrapper so its reducer only waits for parameters that still require a gradient.

    The new wrapper is built with ``init_sync=False``: DDP's constructor would otherwise broadcast rank 0's
    parameters and buffers, which under Local SGD / DiLoCo replaces every rank's local progress since the
    last sync (and under plain DDP is a wasted broadcast of identical weights). The wrapper keeps the
    strategy's DDP options (its ``process_group`` inside node replicas) and comm hook.

    Uses Lightning's private ``DDPStrategy._setup_model`` and ``_register_ddp_hooks`` (the same calls its own
    ``configure_ddp`` makes); ``tests/callbacks/test_grades.py::test_ddp_freeze_mid_run`` fails if they change.
    """
    if not (isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel)):
        return
    module = strategy.lightning_module
    if module is None or not any(p.requires_grad for p in module.parameters()):
        return
    kwargs = strategy._ddp_kwargs
    strategy._ddp_kwargs = {**kwargs, "init_sync": False}
    try:
        strategy.model = strategy._setup_model(module)
    finally:
        strategy._ddp_kwargs = kwargs
    strategy._register_ddp_hooks()
