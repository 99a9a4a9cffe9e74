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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "adapt_level",
    "bucketed_outer_step_",
    "buckets_by_bytes",
    "check_diloco_args",
    "first_sync_step",
    "pseudo_gradients",
    "split_fragments",
]

DEFAULT_BUCKET_BYTES = 32 * 2**20  # torchft's DiLoCo bucket size

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


def buckets_by_bytes(sizes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Split indices, in order, into contiguous buckets of at most ``bucket_bytes`` (a larger tensor is alone).

    Examples:
        >>> buckets_by_bytes([40, 40, 40, 200, 8], bucket_bytes=100)
        [[0, 1], [2], [3], [4]]
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"`bucket_bytes` must be an integer >= 1, got bucket_bytes={bucket_bytes!r}.")
    buckets: list[list[int]] = []
    used = bucket_bytes
    for i, size in enumerate(sizes):
        if used + size > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(i)
        used += size
    return buckets


def bucketed_outer_step_(
    params: Sequence[Tensor],
    global_params: Sequence[Tensor],
    outer: torch.optim.Optimizer,
    average_: Callable[[Tensor, list[Tensor], list[int]], None],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> int:
    """DiLoCo's outer step, one bucket of parameters at a time, so its transient memory stays bounded.

    For each bucket of at most ``bucket_bytes`` (fp32): the pseudo-gradients ``global - local`` are written
    into ONE flat fp32 buffer on the parameters' device, ``average_(flat, views, indices)`` averages them in
    place across ranks (``views`` are the per-tensor views of ``flat``, ``indices`` their positions in
    ``params``), the outer optimizer steps this bucket's ``global_params`` (parameters without a gradient
    are skipped by ``torch.optim`` optimizers) and the new global values are copied into ``params``. The
    result equals the step over all parameters at once; the transient is one bucket (plus the bucket's
    gradients on the global parameters' device, off the accelerator when they live on the CPU).

    Returns:
        The size in bytes of the largest flat buffer allocated (the transient to budget for).

    Examples:
        >>> local = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
        >>> glob = [torch.zeros(2), torch.zeros(1)]
        >>> outer = torch.optim.SGD(glob, lr=1.0)
        >>> bucketed_outer_step_(local, glob, outer, lambda flat, views, idx: None, bucket_bytes=8)
        8
        >>> local
        [tensor([1., 2.]), tensor([3.])]
    """
    largest = 0
    sizes = [4 * p.numel() for p in params]
    for bucket in buckets_by_bytes(sizes, bucket_bytes):
        device = params[bucket[0]].device
        flat = torch.empty(sum(params[i].numel() for i in bucket), dtype=torch.float32, device=device)
        largest = max(largest, flat.numel() * 4)
        views = list(torch.split(flat, [params[i].numel() for i in bucket]))
        views = [v.view(params[i].shape) for v, i in zip(views, bucket)]
        for v, i in zip(views, bucket):
            v.copy_(global_params[i])
            v.sub_(params[i].detach())
        average_(flat, views, bucket)
        for v, i in zip(views, bucket):
            global_params[i].grad = v.to(global_params[i].device)  # a view of ``flat`` when on the same device
        outer.step()
        for i in bucket:
            global_params[i].grad = None
            params[i].detach().copy_(global_params[i])
        del flat, views
    return largest
