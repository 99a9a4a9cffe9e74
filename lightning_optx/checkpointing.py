"""Per-rank checkpoint state: every rank writes its own file beside Lightning's checkpoint.

Lightning writes a checkpoint from rank 0 only. State that differs per rank (error-feedback residuals;
under Local SGD and DiLoCo each rank's parameters and optimizer moments between syncs; a callback's
filter or RNG stream under a local strategy) is therefore written by each rank itself, never gathered:

- rank 0's own state goes into the checkpoint (under ``checkpoint["lightning_optx"]["rank0"]``), next to the
  model and optimizer state Lightning already writes from rank 0;
- rank ``r >= 1`` writes ``<checkpoint>.rank<r>.pt`` (:func:`rank_file`), a file beside the checkpoint;
  its files follow the checkpoint: a strategy of ours removes them when Lightning removes the checkpoint
  (``ModelCheckpoint``'s ``save_top_k``), and a ``last.ckpt`` symlink (``save_last="link"``) is followed
  to the checkpoint it points at when loading.

So rank 0 holds and writes one copy of the model whatever the world size, and each other rank writes its
own copy. Loading needs the checkpoint and the side files of the same world size; a checkpoint written with
another world size (or whose side files are missing) resumes every rank from rank 0's state, with a warning.

A callback registers per-rank state with the strategy (:func:`per_rank_state`), in its ``setup`` hook::

    class MyFilter(Callback):
        def setup(self, trainer, pl_module, stage):
            store = per_rank_state(trainer)        # None unless the strategy is one of lightning_optx's
            if store is not None:
                store.register("my_filter", self._filter)   # anything with state_dict / load_state_dict

The registered object's ``state_dict()`` is saved in every rank's own part at each checkpoint; on resume its
``load_state_dict`` is called on each rank with that rank's state, *after* Lightning has restored the
callback's own (rank 0) ``state_dict`` and after the DDP wrap, so the per-rank state wins. An object
registered later than that (e.g. built lazily) receives its state at registration.

Examples:
    >>> rank_file("/ckpts/epoch=0-step=8.ckpt", 3)
    '/ckpts/epoch=0-step=8.ckpt.rank3.pt'
    >>> import torch
    >>> store = PerRankState()
    >>> counter = torch.nn.Linear(1, 1)          # any object with state_dict / load_state_dict
    >>> store.register("counter", counter)
    >>> sorted(store.collect())
    ['counter']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from lightning.fabric.utilities.cloud_io import _atomic_save, _load, get_filesystem

__all__ = ["PerRankState", "Stateful", "per_rank_state", "rank_file"]

FORMAT_VERSION = 1


@runtime_checkable
class Stateful(Protocol):
    """What :meth:`PerRankState.register` accepts: an object that saves and restores its state."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Any) -> Any: ...


def rank_file(checkpoint_path: str | os.PathLike[str], rank: int) -> str:
    """The file beside ``checkpoint_path`` that holds rank ``rank``'s own state."""
    return f"{os.fspath(checkpoint_path)}.rank{rank}.pt"


class PerRankState:
    """Registry of per-rank state and its files (one per strategy; see the module docstring).

    Keys are strings; the key ``"strategy"`` is reserved for the strategy's own state.

    Examples:
        >>> import os, tempfile, torch
        >>> store = PerRankState()
        >>> layer = torch.nn.Linear(2, 1)
        >>> store.register("layer", layer)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "a.ckpt")
        ...     store.write(path, store.collect(), rank=1, world_size=2, step=5)
        ...     loaded = PerRankState.read(path, rank=1, world_size=2, step=5)
        >>> torch.equal(loaded["layer"]["weight"], layer.weight)
        True
    """

    def __init__(self) -> None:
        self._owners: dict[str, Stateful] = {}
        self._pending: dict[str, Any] = {}
        self._restored = False

    def register(self, key: str, owner: Stateful) -> None:
        """Save ``owner.state_dict()`` per rank at every checkpoint; restore it per rank on resume.

        A later registration under the same key replaces the earlier one (a strategy reused by a new Trainer).
        """
        if not isinstance(key, str) or not key or key == "strategy":
            raise ValueError(f"`key` must be a non-empty string other than 'strategy', got key={key!r}.")
        if not isinstance(owner, Stateful):
            raise TypeError(f"`owner` must have `state_dict` and `load_state_dict`, got {type(owner).__name__}.")
        self._owners[key] = owner
        if self._restored and key in self._pending:
            owner.load_state_dict(self._pending.pop(key))

    def unregister(self, key: str) -> None:
        self._owners.pop(key, None)

    @property
    def keys(self) -> list[str]:
        return sorted(self._owners)

    def collect(self) -> dict[str, Any]:
        """Every registered owner's current state, by key."""
        return {key: owner.state_dict() for key, owner in self._owners.items()}

    def set_pending(self, states: Mapping[str, Any]) -> None:
        """States read from a checkpoint, handed to their owners by :meth:`restore`."""
        self._pending = {k: v for k, v in states.items() if k != "strategy"}
        self._restored = False

    def restore(self) -> None:
        """Hand each registered owner its pending state; later registrations get theirs at once."""
        for key in [k for k in self._pending if k in self._owners]:
            self._owners[key].load_state_dict(self._pending.pop(key))
        self._restored = True

    # ------------------------------------------------------------------ files

    @staticmethod
    def write(checkpoint_path: str | os.PathLike[str], states: Mapping[str, Any], rank: int, world_size: int,
              step: int) -> None:
        """Write this rank's ``states`` to :func:`rank_file` (atomically), tagged with world size and step."""
        path = rank_file(checkpoint_path, rank)
        get_filesystem(path).makedirs(os.path.dirname(path) or ".", exist_ok=True)
        payload = {"format": FORMAT_VERSION, "rank": rank, "world_size": world_size, "step": step,
                   "states": dict(states)}
        _atomic_save(payload, path)

    @staticmethod
    def read(checkpoint_path: str | os.PathLike[str], rank: int, world_size: int, step: int) -> dict[str, Any] | None:
        """This rank's states for ``checkpoint_path``, or ``None`` if its file is missing or belongs elsewhere.

        A ``last.ckpt`` symlink is followed to the checkpoint it points at. The file must carry the same
        rank, world size and step as the checkpoint (a stale file left by another run is ignored).
        """
        for candidate in _candidates(checkpoint_path):
            path = rank_file(candidate, rank)
            if not get_filesystem(path).exists(path):
                continue
            payload = _load(path, map_location="cpu", weights_only=False)
            if (payload.get("rank"), payload.get("world_size"), payload.get("step")) == (rank, world_size, step):
                return dict(payload["states"])
        return None

    @staticmethod
    def remove(checkpoint_path: str | os.PathLike[str], rank: int) -> None:
        """Delete rank ``rank``'s file of ``checkpoint_path`` if it exists."""
        path = rank_file(checkpoint_path, rank)
        fs = get_filesystem(path)
        if fs.exists(path):
            fs.rm(path)


def _candidates(checkpoint_path: str | os.PathLike[str]) -> list[str]:
    path = os.fspath(checkpoint_path)
    out = [path]
    if os.path.islink(path):  # ModelCheckpoint(save_last="link"): last.ckpt -> the checkpoint it mirrors
        out.append(os.path.realpath(path))
    return out


def per_rank_state(trainer: Any) -> PerRankState | None:
    """The per-rank state registry of ``trainer``'s strategy, or ``None`` if the strategy has none.

    Only lightning_optx's strategies (Local SGD, DiLoCo, compressed DDP) checkpoint per-rank state.
    """
    store = getattr(getattr(trainer, "strategy", None), "per_rank_state", None)
    return store if isinstance(store, PerRankState) else None

