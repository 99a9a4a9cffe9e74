"""Grokfast gradient filters (Lee et al., "Grokfast: Accelerated Grokking by Amplifying Slow Gradients").

Both filters treat the sequence of gradients of a parameter as a signal, estimate its slow
(low-frequency) component ``h`` and amplify it: ``g <- g + lamb * h``.

* EMA filter: ``h <- alpha * h + (1 - alpha) * g``; ``h`` starts at the first gradient seen, as in the
  authors' code, so the very first step is ``g <- (1 + lamb) * g``.
* Moving-average (MA) filter: ``h`` is the mean of the last ``window_size`` gradients (the current one
  included). With ``warmup`` the gradient is left alone until the window is full.

Everything here works on plain lists of tensors and modifies them in place with ``torch._foreach_*``
kernels, so one call costs a handful of fused passes over the gradients, whatever the number of
parameters. The MA filter keeps a ring buffer and a running sum: one step is O(parameters), not
O(window x parameters). The running sum is recomputed from the ring each time the ring wraps around, so
rounding error cannot build up over a long run, at an amortised cost of one extra pass per step.

Examples:
    >>> import torch
    >>> grads = [torch.ones(3)]
    >>> ema = init_ema(grads)
    >>> ema_filter_(grads, ema, alpha=0.9, lamb=2.0)
    >>> grads[0]
    tensor([3., 3., 3.])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MovingAverageState",
    "check_ema_args",
    "check_ma_args",
    "ema_filter_",
    "init_ema",
    "init_moving_average",
    "ma_filter_",
    "moving_average_filter_",
    "state_dtype_for",
]


def check_ema_args(alpha: float, lamb: float) -> None:
    """Raise ``ValueError`` naming the argument if ``alpha`` or ``lamb`` is out of range."""
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha` must be a float in [0, 1), got alpha={alpha!r}.")
    check_lamb(lamb)


def check_lamb(lamb: float) -> None:
    """Raise ``ValueError`` if the amplification factor ``lamb`` is negative or not a number."""
    if not isinstance(lamb, (int, float)) or not lamb >= 0.0:
        raise ValueError(f"`lamb` must be a non-negative float, got lamb={lamb!r}.")


def check_ma_args(window_size: int, lamb: float) -> None:
    """Raise ``ValueError`` naming the argument if ``window_size`` or ``lamb`` is out of range."""
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"`window_size` must be an integer >= 1, got window_size={window_size!r}.")
    check_lamb(lamb)


def state_dtype_for(grad: Tensor) -> torch.dtype:
    """Filter state is kept in at least float32, so bf16/fp16 gradients do not lose the slow signal."""
    return torch.promote_types(grad.dtype, torch.float32)


def init_ema(grads: Sequence[Tensor]) -> list[Tensor]:
    """Start an EMA state from the first gradients (a detached copy, at least float32)."""
    return [g.detach().to(dtype=state_dtype_for(g), copy=True) for g in grads]


def ema_filter_(grads: list[Tensor], ema: list[Tensor], alpha: float, lamb: float) -> None:
    """Update ``ema`` in place and amplify ``grads`` in place with the EMA filter.

    ``ema[i] <- alpha * ema[i] + (1 - alpha) * grads[i]``, then ``grads[i] <- grads[i] + lamb * ema[i]``.
    """
    if not grads:
        return
    torch._foreach_mul_(ema, alpha)
    torch._foreach_add_(ema, grads, alpha=1.0 - alpha)
    torch._foreach_add_(grads, ema, alpha=lamb)


@dataclass
class MovingAverageState:
    """Ring buffer of the last ``window_size`` gradients of a group of tensors, with their running sum.

    Attributes:
        ring: one tensor per parameter of shape ``(window_size, *param.shape)``.
        total: the running sum over the filled slots of ``ring``, one tensor per parameter.
        count: how many slots are filled (at most ``window_size``).
        position: the slot the next gradient is written to.
    """

    ring: list[Tensor]
    total: list[Tensor]
    count: int = 0
    position: int = 0

    @property
    def window_size(self) -> int:
        return self.ring[0].shape[0] if self.ring else 0


def init_moving_average(grads: Sequence[Tensor], window_size: int) -> MovingAverageState:
    """An empty ring buffer shaped for ``grads``."""
    ring = [
        torch.zeros((window_size, *g.shape), dtype=state_dtype_for(g), device=g.device) for g in grads
    ]
    total = [torch.zeros(g.shape, dtype=state_dtype_for(g), device=g.device) for g in grads]
    return MovingAverageState(ring=ring, total=total)


def moving_average_filter_(
    grads: list[Tensor], state: MovingAverageState, lamb: float, warmup: bool = True
) -> bool:
    """Push ``grads`` into the ring and amplify them in place by ``lamb`` times the window mean.

    Returns whether the gradients were amplified (``False`` while warming up).
    """
    if not grads:
        return False
    slots = [buf[state.position] for buf in state.ring]
    if state.count == state.window_size:
        torch._foreach_sub_(state.total, slots)
    else:
        state.count += 1
    torch._foreach_copy_(slots, grads)
    state.position = (state.position + 1) % state.window_size
    if state.position == 0:
        # Exact re-sum once per lap keeps the running sum from drifting (amortised O(1) per step).
        torch._foreach_copy_(state.total, [buf.sum(dim=0) for buf in state.ring])
    else:
        torch._foreach_add_(state.total, slots)
    if warmup and state.count < state.window_size:
        return False
    torch._foreach_add_(grads, state.total, alpha=lamb / state.count)
    return True


ma_filter_ = moving_average_filter_
