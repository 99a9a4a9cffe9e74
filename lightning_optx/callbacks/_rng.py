"""Each rank's random-number-generator state, for callbacks whose effect depends on it (dropout masks).

Lightning does not save RNG states in checkpoints; a run that uses dropout therefore cannot resume bit for bit
unless someone does. Under lightning_optx's strategies each rank writes its own state into its per-rank part of the
checkpoint (:class:`~lightning_optx.callbacks._per_rank.RngStream`; no collective). Under other strategies callbacks
are serialised on every rank but written by rank 0, so the states are gathered (:func:`gather_rng_states`, one
small object per rank) and each rank takes its own back on load.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist


def collect_rng_state() -> dict[str, Any]:
    """The process's RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                          float(cached))
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: every rank must call it)."""
    mine = collect_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def restore_own_rng_state(states: list[dict[str, Any]]) -> None:
    """Set this rank's RNG state from a gathered list (rank 0's if the world size changed)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    set_rng_state(states[rank] if len(states) > rank else states[0])
