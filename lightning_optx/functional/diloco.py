"""DiLoCo bookkeeping: fragments, their sync schedule, pseudo-gradients and adaptive compression.

DiLoCo (Douillard et al.) trains each replica locally for ``H`` inner steps, then averages the
pseudo-gradient ``delta = theta_start - theta_local`` across replicas and applies it to the global
parameters with an outer optimizer (SGD with Nesterov momentum). Streaming DiLoCo splits the parameters into
``F`` fragments synchronised at staggered steps, so each sync moves ``1/F`` of the bytes. DiLoCoX adapts the
compression of the pseudo-gradient to how well it compresses.

Examples:
    >>> split_fragments([10, 10, 10, 10], 2)
    [[0, 1], [2, 3]]
    >>> [first_sync_step(f, inner_steps=8, fragments=2) for f in range(2)]
    [8, 4]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adapt_level", "check_diloco_args", "first_sync_step", "pseudo_gradients", "split_fragments"]

OUTER_OPTIMIZERS = ("nesterov", "sgd")


def check_diloco_args(inner_steps: int, outer_optimizer: str, outer_lr: float, outer_momentum: float,
                      fragments: int) -> None:
    """Raise ``ValueError`` naming the argument for invalid DiLoCo settings."""
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"`inner_steps` must be an integer >= 1, got inner_steps={inner_steps!r}.")
    if outer_optimizer not in OUTER_OPTIMIZERS:
        raise ValueError(
            f"`outer_optimizer` must be one of {OUTER_OPTIMIZERS}, got outer_optimizer={outer_optimizer!r}."
        )
    if not isinstance(outer_lr, (int, float)) or not outer_lr > 0:
        raise ValueError(f"`outer_lr` must be a positive float, got outer_lr={outer_lr!r}.")
    if not isinstance(outer_momentum, (int, float)) or not 0 <= outer_momentum < 1:
        raise ValueError(f"`outer_momentum` must be in [0, 1), got outer_momentum={outer_momentum!r}.")
    if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
        raise ValueError(f"`fragments` must be an integer >= 1, got fragments={fragments!r}.")
    if inner_steps % fragments:
        raise ValueError(f"`fragments` must divide `inner_steps` so that syncs are evenly staggered, got "
                         f"fragments={fragments} with inner_steps={inner_steps}.")


def split_fragments(numels: Sequence[int], fragments: int) -> list[list[int]]:
    """Split parameter indices, in order, into ``fragments`` contiguous groups of about equal size."""
    if fragments > len(numels):
        raise ValueError(f"`fragments` must be at most the number of parameters ({len(numels)}), got "
                         f"fragments={fragments}.")
    total = sum(numels)
    groups: list[list[int]] = [[] for _ in range(fragments)]
    f, running = 0, 0
    for i, n in enumerate(numels):
        left = len(numels) - i  # parameters still to place, this one included
        past_share = running + n / 2 > (f + 1) * total / fragments
        if groups[f] and f < fragments - 1 and (past_share or left <= fragments - 1 - f):
            f += 1
        groups[f].append(i)
        running += n
    return groups


def first_sync_step(fragment: int, inner_steps: int, fragments: int) -> int:
    """The first optimizer step at which ``fragment`` syncs; afterwards every ``inner_steps`` steps.

    Fragment ``f`` syncs at steps ``s > 0`` with ``s = H - f H / F (mod H)``, so at any step at most one
    fragment is in flight when ``F`` divides ``H``.
    """
    offset = fragment * inner_steps // fragments
    return inner_steps - offset


def pseudo_gradients(start: Sequence[Tensor], local: Sequence[Tensor]) -> list[Tensor]:
    """``start - local`` for every tensor, in float32 (the DiLoCo pseudo-gradient)."""
    return [s.float() - x.float() for s, x in zip(start, local)]


def adapt_level(level: float, relative_error: float, low: float, high: float, bounds: tuple[float, float],
                factor: float = 2.0) -> float:
    """DiLoCoX-style adaptation: raise the level (rank, density) when the compression error is above ``high``,
    lower it below ``low``, within ``bounds``."""
    lo, hi = bounds
    if relative_error > high:
        level = level * factor
    elif relative_error < low:
        level = level / factor
    return float(min(hi, max(lo, level)))


def relative_error(original: Sequence[Tensor], approx: Sequence[Tensor]) -> float:
    """``||original - approx|| / ||original||`` over all tensors together."""
    num = torch.stack([torch.linalg.vector_norm(o.float() - a.float()) for o, a in zip(original, approx)]).norm()
    den = torch.stack([torch.linalg.vector_norm(o.float()) for o in original]).norm()
    return float(num / den) if float(den) > 0 else 0.0
