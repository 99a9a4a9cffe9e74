"""Callback state that differs per rank, saved through the strategy's per-rank checkpoint files.

Lightning saves a callback's ``state_dict`` from rank 0 only and hands it to every rank on resume. That is right
when every rank holds the same state (plain or compressed DDP: every rank sees the same averaged gradients),
but not under Local SGD and DiLoCo, where each rank's gradients stay local between syncs, nor for each rank's
random-number generators. Such state is registered with :func:`lightning_optx.checkpointing.per_rank_state`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_optx.callbacks._rng import collect_rng_state, set_rng_state
from lightning_optx.checkpointing import PerRankState, per_rank_state
from lightning_optx.strategies import DiLoCoStrategy, LocalSGDStrategy


def local_gradient_state(trainer: Any) -> PerRankState | None:
    """The per-rank registry if ``trainer``'s strategy keeps gradients local between syncs, else ``None``.

    Local SGD (after its warm-up), DiLoCo and DiLoCoX: a callback that reads the gradients holds per-rank state.
    """
    store = per_rank_state(trainer)
    if store is None:
        return None
    return store if isinstance(trainer.strategy, (LocalSGDStrategy, DiLoCoStrategy)) else None


def per_rank_key(callback: Callback, what: str = "state") -> str:
    """The registry key of a callback's per-rank ``what`` (unique per callback configuration)."""
    return f"callback:{callback.state_key}:{what}"


class CallbackRankState:
    """A callback's whole ``state_dict``, saved per rank; rank 0's part is the checkpoint's own callback state.

    Lightning already writes rank 0's ``state_dict`` into the checkpoint and loads it on every rank before the
    per-rank parts are restored, so rank 0's part stays empty (no second copy of a filter in the checkpoint)
    and every other rank's part replaces what it loaded from rank 0.
    """

    def __init__(self, callback: Callback, strategy: Any) -> None:
        self.callback = callback
        self.strategy = strategy

    def state_dict(self) -> dict[str, Any]:
        return {} if self.strategy.is_global_zero else self.callback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.callback.load_state_dict(state)


class RngStream:
    """This process's random-number-generator states (torch, CUDA, Python, NumPy) as per-rank state."""

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)
