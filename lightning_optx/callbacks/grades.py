"""GradES as a Lightning callback: freeze each converged attention/FFN matrix, stop when all are frozen."""

from __future__ import annotations

import math
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

from lightning_optx.functional import grades as F

MetricName = Literal["grad", "weight_delta"]
TauMode = Literal["absolute", "relative"]


class GradES(Callback):
    """Gradient-based early stopping of individual weight matrices (Wen et al., "GradES").

    Every attention projection and feed-forward matrix found in the model is watched on its own. Once
    ``grace_fraction`` of the planned optimizer steps have passed, a matrix whose metric is below ``tau`` is
    frozen: ``requires_grad`` is switched off, so autograd skips its weight-gradient matmul (the speed-up),
    and its ``.grad`` is dropped, so momentum and weight decay no longer move it. When every target is frozen
    and ``stop_when_all_frozen``, training stops.

    The metric is measured once per optimizer step on what Lightning hands to ``on_before_optimizer_step``
    (unscaled, accumulated, DDP-averaged gradients), then averaged across ranks, so every rank takes the
    same freeze decision. Under DDP the wrapper is rebuilt after a freeze so that its reducer stops waiting
    for the frozen gradients (plain ``find_unused_parameters=False`` DDP would fail otherwise). On resume the
    frozen set is re-applied before the model is wrapped and the optimizer restored.

    Args:
        tau: threshold. ``tau_mode="absolute"``: freeze when the metric is below ``tau``. ``"relative"``: freeze
            when it is below ``tau`` times the matrix's metric at the first measured step (``0 < tau < 1``).
        grace_fraction: fraction of the planned optimizer steps (``trainer.estimated_stepping_batches``) during
            which nothing is frozen; the paper uses 0.55.
        metric: ``"grad"`` (mean absolute gradient of the matrix) or ``"weight_delta"`` (mean absolute change of
            the matrix over the last optimizer step, as in the authors' code).
        targets: ``"auto"`` (attention and FFN matrices of common layouts, or only LoRA adapters when present)
            or a list of regular expressions matched (``re.search``) against parameter names.
        stop_when_all_frozen: set ``trainer.should_stop`` once every target is frozen.
        remove_from_optimizer: also drop frozen matrices (and their state) from the optimizers' param groups,
            which frees their optimizer memory. Off by default: frozen parameters without ``.grad`` are
            already skipped by every PyTorch optimizer.
        tau_mode: ``"absolute"`` or ``"relative"`` (see ``tau``).

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
    ) -> None:
        F.check_grades_args(tau, grace_fraction, metric, tau_mode)
        if targets != "auto" and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
            raise ValueError(f"`targets` must be 'auto' or a list of regular expressions, got targets={targets!r}.")
        self.tau = float(tau)
        self.grace_fraction = float(grace_fraction)
        self.metric = metric
        self.targets = targets
        self.stop_when_all_frozen = stop_when_all_frozen
        self.remove_from_optimizer = remove_from_optimizer
        self.tau_mode = tau_mode

        self.frozen: dict[str, int] = {}  # name -> optimizer step at which it froze
        self.reference: dict[str, float] = {}  # relative mode: each matrix's first metric
        self.last_metrics: dict[str, float] = {}
        self.grace_steps = 0
        self._params: dict[str, Parameter] = {}
        self._pending: dict[str, Tensor] = {}  # grad metric, or weights before the step (weight_delta)
        self._module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(metric=self.metric, targets=self.targets)

    @property
    def target_names(self) -> list[str]:
        return list(self._params)

    @property
    def active_names(self) -> list[str]:
        return [n for n in self._params if n not in self.frozen]

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("GradES needs automatic optimization: it measures and freezes matrices around the "
                             "optimizer step Lightning runs.")
        named = {n: p for n, p in pl_module.named_parameters() if p.requires_grad or n in self.frozen}
        patterns = None if self.targets == "auto" else list(self.targets)
        names = F.find_targets(named, patterns)
        if not names:
            sample = ", ".join(list(named)[:8])
            raise ValueError(
                f"GradES found no target matrix with targets={self.targets!r} among the trainable parameters "
                f"(e.g. {sample}). Pass `targets` as a list of regular expressions over parameter names."
            )
        self._params = {n: named[n] for n in names}
        self._module = pl_module
        self._apply_frozen_flags()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        planned = trainer.estimated_stepping_batches
        if not math.isfinite(planned):
            raise ValueError("GradES needs a finite training length (max_steps or max_epochs) to place its grace "
                             "period.")
        self.grace_steps = math.ceil(self.grace_fraction * planned)
        if self.remove_from_optimizer and self.frozen:
            _remove_from_optimizers(trainer.optimizers, [self._params[n] for n in self.frozen])

    # ------------------------------------------------------------------ measuring

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        names = [n for n in self.active_names if self._params[n].grad is not None]
        if not names:
            return
        if self.metric == "grad":
            values = F.mean_abs([self._params[n].grad for n in names])  # type: ignore[misc]
            self._pending = dict(zip(names, values))
        else:
            self._pending = {n: self._params[n].detach().clone() for n in names}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._pending:
            return  # not an optimizer-step boundary (gradient accumulation) or nothing left to watch
        names = list(self._pending)
        if self.metric == "grad":
            local = torch.stack([self._pending[n] for n in names])
        else:
            local = F.mean_abs([self._params[n].detach() - self._pending[n] for n in names])
        self._pending = {}
        metrics = trainer.strategy.reduce(local, reduce_op="mean").float().cpu()
        self.last_metrics = dict(zip(names, metrics.tolist()))
        for n, v in self.last_metrics.items():
            self.reference.setdefault(n, v)
        step = trainer.global_step
        if step >= self.grace_steps:
            reference = torch.tensor([self.reference[n] for n in names]) if self.tau_mode == "relative" else None
            newly = [n for n, hit in zip(names, F.freeze_mask(metrics, self.tau, reference).tolist()) if hit]
            if newly:
                self._freeze(trainer, pl_module, newly, step)
        self._log(pl_module, metrics)
        if self.stop_when_all_frozen and not self.active_names:
            trainer.should_stop = True

    # ------------------------------------------------------------------ freezing

    def _freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str], step: int) -> None:
        for n in names:
            self.frozen[n] = step
            rank_zero_info(f"GradES: froze {n} at step {step} (metric {self.last_metrics[n]:.3e})")
        self._apply_frozen_flags()
        if self.remove_from_optimizer:
            _remove_from_optimizers(trainer.optimizers, [self._params[n] for n in names])
        _rewrap_ddp(trainer.strategy)

    def _apply_frozen_flags(self) -> None:
        for n in self.frozen:
            p = self._params.get(n)
            if p is not None:
                p.requires_grad_(False)
                p.grad = None

    def _log(self, pl_module: pl.LightningModule, metrics: Tensor) -> None:
        total = len(self._params)
        frozen_numel = sum(self._params[n].numel() for n in self.frozen)
        all_numel = sum(p.numel() for p in self._params.values())
        pl_module.log_dict(
            {
                "grades/frozen_fraction": len(self.frozen) / total,
                "grades/frozen_param_fraction": frozen_numel / all_numel,
                "grades/metric_min": float(metrics.min()),
                "grades/metric_max": float(metrics.max()),
            },
            on_step=True, on_epoch=False,
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": dict(self.frozen), "reference": dict(self.reference),
                "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = {k: int(v) for k, v in state_dict["frozen"].items()}
        self.reference = dict(state_dict["reference"])
        self.last_metrics = dict(state_dict["last_metrics"])
        # Called after `setup` and before the strategy wraps the model: freeze now, so DDP never expects them.
        self._apply_frozen_flags()


def _remove_from_optimizers(optimizers: list[Optimizer], params: list[Parameter]) -> None:
    ids = {id(p) for p in params}
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for p in params:
            opt.state.pop(p, None)


def _rewrap_ddp(strategy: Any) -> None:
    """Rebuild DDP's wrapper so its reducer only waits for parameters that still require a gradient.

    Uses Lightning's private ``DDPStrategy._setup_model`` and ``_register_ddp_hooks`` (the same calls its own
    ``configure_ddp`` makes); ``tests/callbacks/test_grades.py::test_ddp_freeze_mid_run`` fails if they change.
    """
    if not (isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel)):
        return
    module = strategy.lightning_module
    if module is None or not any(p.requires_grad for p in module.parameters()):
        return
    strategy.model = strategy._setup_model(module)
    strategy._register_ddp_hooks()
