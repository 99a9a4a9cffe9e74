"""GCond's state (what the arbitrator remembers between steps) and option checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ._gram_space import _check_positive, _check_unit_interval, _clone


@dataclass
class GCondState:
    """GCond state: what the arbitrator remembers between steps, and the momentum of the result.

    Attributes:
        norm_ema: EMA of each task's raw gradient norm (starts at 1.0, as in the reference).
        history: the last ``dominance_window`` arbitration winners (task indices), across steps.
        prev: ``(T, n)`` raw task gradients of the previous step (stability score), ``None`` at first.
        prev_norms: their norms.
        momentum: ``(n,)`` EMA of the resolved gradient, ``None`` at first.
        step: number of calls so far (momentum bias correction).
    """

    norm_ema: list[float] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    prev: Tensor | None = None
    prev_norms: list[float] = field(default_factory=list)
    momentum: Tensor | None = None
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Copies of the tensors and plain values."""
        return {
            "norm_ema": list(self.norm_ema),
            "history": list(self.history),
            "prev": _clone(self.prev),
            "prev_norms": list(self.prev_norms),
            "momentum": _clone(self.momentum),
            "step": self.step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are copied)."""
        self.norm_ema = [float(x) for x in state_dict["norm_ema"]]
        self.history = [int(x) for x in state_dict["history"]]
        self.prev = _clone(state_dict["prev"])
        self.prev_norms = [float(x) for x in state_dict["prev_norms"]]
        self.momentum = _clone(state_dict["momentum"])
        self.step = int(state_dict["step"])


def init_gcond_state() -> GCondState:
    """An empty GCond state; :func:`gcond` sizes it on its first call."""
    return GCondState()


def check_gcond_args(
    conflict_thresholds: tuple[float, float, float],
    remap_power: float,
    dominance_window: int,
    tie_breaking_weights: tuple[float, float],
    norm_ema_beta: float,
    momentum_beta: float,
    projection_max_iters: int | None,
    norm_cap: float | None,
    use_smooth_logic: bool,
) -> None:
    """Raise ``ValueError`` naming the argument if a GCond option is out of range."""
    thresholds = tuple(conflict_thresholds) if isinstance(conflict_thresholds, (tuple, list)) else ()
    if (
        len(thresholds) != 3
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and -1 <= t <= 1 for t in thresholds)
        or not thresholds[0] <= thresholds[1] <= thresholds[2]
    ):
        raise ValueError(
            "`conflict_thresholds` must be 3 cosines (critical, main, weak) in [-1, 1] with "
            f"critical <= main <= weak, got conflict_thresholds={conflict_thresholds!r}."
        )
    _check_positive("remap_power", remap_power)
    if isinstance(dominance_window, bool) or not isinstance(dominance_window, int) or dominance_window < 0:
        raise ValueError(f"`dominance_window` must be an integer >= 0, got dominance_window={dominance_window!r}.")
    weights = tuple(tie_breaking_weights) if isinstance(tie_breaking_weights, (tuple, list)) else ()
    if (
        len(weights) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in weights)
        or not sum(weights) > 0
    ):
        raise ValueError(
            "`tie_breaking_weights` must be 2 non-negative floats (stability, strength) with a positive sum, "
            f"got tie_breaking_weights={tie_breaking_weights!r}."
        )
    _check_unit_interval("norm_ema_beta", norm_ema_beta)
    _check_unit_interval("momentum_beta", momentum_beta)
    if projection_max_iters is not None and (
        isinstance(projection_max_iters, bool) or not isinstance(projection_max_iters, int) or projection_max_iters < 1
    ):
        raise ValueError(
            "`projection_max_iters` must be None or an integer >= 1, "
            f"got projection_max_iters={projection_max_iters!r}."
        )
    if norm_cap is not None:
        _check_positive("norm_cap", norm_cap)
    if not isinstance(use_smooth_logic, bool):
        raise ValueError(f"`use_smooth_logic` must be a bool, got use_smooth_logic={use_smooth_logic!r}.")


@dataclass(frozen=True)
class _GCondOptions:
    """The validated options of :func:`gcond`, passed to its helpers."""

    conflict_thresholds: tuple[float, float, float]
    remap_power: float
    dominance_window: int
    tie_breaking_weights: tuple[float, float]
    norm_ema_beta: float
    momentum_beta: float
    projection_max_iters: int | None
    norm_cap: float | None
    use_smooth_logic: bool


def _prepare_gcond_state(state: GCondState, num_tasks: int, num_params: int) -> None:
    if not state.norm_ema:
        state.norm_ema = [1.0] * num_tasks
    if len(state.norm_ema) != num_tasks or any(h >= num_tasks for h in state.history):
        raise ValueError(
            f"GCond state was built for {len(state.norm_ema)} tasks but `grads` has {num_tasks}; "
            f"start from a fresh state."
        )
    if state.prev is not None and tuple(state.prev.shape) != (num_tasks, num_params):
        raise ValueError(
            f"GCond state `prev` has shape {tuple(state.prev.shape)} but `grads` has shape "
            f"{(num_tasks, num_params)}; start from a fresh state."
        )
