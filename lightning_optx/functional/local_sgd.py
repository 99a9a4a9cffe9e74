"""Local SGD schedules: periodic averaging and the Quadratic Synchronization Rule.

QSR (Gu et al., "A Quadratic Synchronization Rule for Distributed Deep Learning") sets the number of local
steps between two averagings from the current learning rate: ``H = max(H_base, floor((alpha / lr) ** 2))``,
so that syncs become rarer as the learning rate decays.

Examples:
    >>> qsr_period(lr=0.1, alpha=0.2, min_period=1)
    4
    >>> qsr_period(lr=1.0, alpha=0.2, min_period=2)
    2
"""

from __future__ import annotations

import math

__all__ = ["check_period_args", "qsr_period"]


def qsr_period(lr: float, alpha: float, min_period: int) -> int:
    """The QSR period ``max(min_period, floor((alpha / lr)^2))`` (``min_period`` if ``lr`` is 0)."""
    if lr <= 0:
        return min_period
    return max(min_period, math.floor((alpha / lr) ** 2))


def check_period_args(period: int, warmup_steps: int, qsr_alpha: float | None, min_period: int) -> None:
    """Raise ``ValueError`` naming the argument for an invalid Local SGD schedule."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"`period` must be an integer >= 1, got period={period!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an integer >= 0, got warmup_steps={warmup_steps!r}.")
    if isinstance(min_period, bool) or not isinstance(min_period, int) or min_period < 1:
        raise ValueError(f"`min_period` must be an integer >= 1, got min_period={min_period!r}.")
    if qsr_alpha is not None and (not isinstance(qsr_alpha, (int, float)) or not qsr_alpha > 0):
        raise ValueError(f"`qsr_alpha` must be a positive float or None, got qsr_alpha={qsr_alpha!r}.")
