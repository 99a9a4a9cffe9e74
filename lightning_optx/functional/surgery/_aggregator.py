"""``Aggregator``: one method with its options and state, PCGrad's per-step random order from ``(seed, step)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._cagrad import cagrad, check_cagrad_args
from ._gcond import gcond
from ._gcond_state import GCondState, check_gcond_args
from ._gram_space import aggregate_mean, aggregate_sum
from ._pcgrad import pcgrad
from ._sam_gs import SamGsState, check_sam_gs_args, sam_gs

METHODS = ("pcgrad", "cagrad", "sam_gs", "gcond", "sum", "mean")


_DEFAULTS: dict[str, dict[str, Any]] = {
    "pcgrad": {"seed": 0},
    "cagrad": {"c": 0.5, "rescale": 1},
    "sam_gs": {"gamma": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8},
    "gcond": {
        "conflict_thresholds": (-0.8, -0.5, 0.0),
        "remap_power": 2.0,
        "dominance_window": 3,
        "tie_breaking_weights": (0.8, 0.2),
        "norm_ema_beta": 0.95,
        "momentum_beta": 0.85,
        "projection_max_iters": None,
        "norm_cap": None,
        "use_smooth_logic": True,
    },
    "sum": {},
    "mean": {},
}


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got seed={seed!r}.")


_CHECKS: dict[str, Callable[..., None]] = {
    "pcgrad": _check_seed,
    "cagrad": check_cagrad_args,
    "sam_gs": check_sam_gs_args,
    "gcond": check_gcond_args,
    "sum": lambda: None,
    "mean": lambda: None,
}


def _step_seed(seed: int, step: int) -> int:
    """PCGrad's per-step generator seed: a function of (seed, step) only, in the range manual_seed accepts."""
    return (seed * 1_000_003 + step) % (1 << 63)


class Aggregator:
    """One gradient-surgery method with its options and state: ``aggregator(grads, step) -> (n,)``.

    Build it with :func:`make_aggregator`. ``step`` is the optimizer step: PCGrad draws its random order
    from ``torch.Generator().manual_seed(seed * 1_000_003 + step)`` (CPU), so every rank, and a run resumed
    at that step, draws the same order; the other methods ignore it (SAM-GS and GCond count their own
    calls). ``state_dict()`` holds everything needed to resume bit for bit (tensors and plain values);
    ``load_state_dict`` restores the method's state (the options stay those given to the constructor).
    """

    def __init__(self, method: str, **options: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got method={method!r}.")
        unknown = sorted(set(options) - set(_DEFAULTS[method]))
        if unknown:
            allowed = tuple(_DEFAULTS[method]) or "none"
            raise ValueError(f"Options {unknown} are not accepted by method={method!r}; it accepts {allowed}.")
        self.method = method
        self.options: dict[str, Any] = {**_DEFAULTS[method], **options}
        _CHECKS[method](**self.options)
        self._sam_gs = SamGsState() if method == "sam_gs" else None
        self._gcond = GCondState() if method == "gcond" else None

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Aggregator({self.method!r}{', ' if opts else ''}{opts})"

    def __call__(self, grads: Tensor, step: int) -> Tensor:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0 (the optimizer step), got step={step!r}.")
        if self.method == "pcgrad":
            generator = torch.Generator().manual_seed(_step_seed(self.options["seed"], step))
            return pcgrad(grads, generator)
        if self.method == "cagrad":
            return cagrad(grads, **self.options)
        if self._sam_gs is not None:
            return sam_gs(grads, self._sam_gs, **self.options)
        if self._gcond is not None:
            return gcond(grads, self._gcond, **self.options)
        return aggregate_sum(grads) if self.method == "sum" else aggregate_mean(grads)

    def grow(self, extra: int) -> None:
        """``extra`` parameters were appended to the end of the flattened layout: pad the state with zeros.

        For callers whose set of aggregated parameters grows during training (a branch first reached later):
        existing coordinates keep their state, the new ones start from zero (SAM-GS moments, GCond's previous
        gradients and momentum). Stateless methods ignore it.
        """
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ValueError(f"`extra` must be an integer >= 0, got extra={extra!r}.")
        state = self._sam_gs or self._gcond
        if state is None or extra == 0:
            return
        for name in ("m", "prev", "momentum"):
            tensor = getattr(state, name, None)
            if tensor is not None:
                pad = tensor.new_zeros((*tensor.shape[:-1], extra))
                setattr(state, name, torch.cat([tensor, pad], dim=-1))

    def reset(self) -> None:
        """Forget the method's state (SAM-GS moments, GCond history and momentum)."""
        self._sam_gs = SamGsState() if self.method == "sam_gs" else None
        self._gcond = GCondState() if self.method == "gcond" else None

    def state_dict(self) -> dict[str, Any]:
        """``{"method", "options", "state"}``; ``state`` is empty for the stateless methods."""
        stateful = self._sam_gs or self._gcond
        return {
            "method": self.method,
            "options": dict(self.options),
            "state": stateful.state_dict() if stateful is not None else {},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` of an aggregator of the same method."""
        if state_dict.get("method") != self.method:
            raise ValueError(
                f"Cannot load the state of method={state_dict.get('method')!r} into an aggregator of "
                f"method={self.method!r}."
            )
        stateful = self._sam_gs or self._gcond
        if stateful is not None:
            stateful.load_state_dict(state_dict["state"])


def make_aggregator(method: str, **options: Any) -> Aggregator:
    """An :class:`Aggregator` for ``method`` (one of :data:`METHODS`) with the given options.

    Options by method (defaults): ``pcgrad``: ``seed=0``; ``cagrad``: ``c=0.5, rescale=1``; ``sam_gs``:
    ``gamma=0.1, beta1=0.9, beta2=0.99, eps=1e-8``; ``gcond``: the keyword arguments of :func:`gcond`;
    ``sum``, ``mean``: none. An unknown method, an option the method does not take, or a value out of range
    raises ``ValueError`` naming it.
    """
    return Aggregator(method, **options)
