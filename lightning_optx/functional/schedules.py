"""Dropout schedules (Liu et al., "Dropout Reduces Underfitting").

* ``"early"``: dropout only at the start of training, to reduce underfitting. ``shape="constant"`` keeps
  ``p`` for the first ``cutoff`` steps, then 0; ``shape="linear"`` ramps from ``p`` down to 0 across them,
  as the authors' ``drop_scheduler`` does: the first ``cutoff`` rates are ``np.linspace(p, 0, cutoff)``
  (``p`` at step 0, exactly 0 at step ``cutoff - 1``).
* ``"late"``: no dropout until ``cutoff``, then ``p`` (``shape="linear"`` ramps from 0 up to ``p`` between
  ``cutoff`` and the end of training), to regularise an overfitting model late.
* ``"standard"``: ``p`` throughout.

Examples:
    >>> dropout_rate(step=3, total_steps=100, mode="early", p=0.5, cutoff=5, shape="linear")
    0.125
    >>> depth_profile([0.0, 0.05, 0.1], rate=0.3)
    [0.0, 0.15, 0.3]
    >>> dropout_rate(step=50, total_steps=100, mode="late", p=0.1, cutoff=40, shape="constant")
    0.1
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Mode", "Shape", "check_schedule_args", "depth_profile", "dropout_rate", "quantize", "resolve_cutoff"]

Mode = Literal["early", "late", "standard"]
Shape = Literal["linear", "constant"]


def check_schedule_args(mode: str, p: float, cutoff: int | float, shape: str) -> None:
    """Raise ``ValueError`` naming the argument for an invalid schedule."""
    if mode not in ("early", "late", "standard"):
        raise ValueError(f"`mode` must be 'early', 'late' or 'standard', got mode={mode!r}.")
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"`p` must be in [0, 1), got p={p!r}.")
    if shape not in ("linear", "constant"):
        raise ValueError(f"`shape` must be 'linear' or 'constant', got shape={shape!r}.")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)):
        raise ValueError(
            f"`cutoff` must be a number of steps (int >= 0) or a fraction in (0, 1), got cutoff={cutoff!r}."
        )
    if isinstance(cutoff, int) and cutoff < 0:
        raise ValueError(f"`cutoff` as a number of steps must be >= 0, got cutoff={cutoff!r}.")
    if isinstance(cutoff, float) and not 0.0 < cutoff < 1.0:
        raise ValueError(f"`cutoff` as a fraction of training must be in (0, 1), got cutoff={cutoff!r}; "
                         "pass an int for a number of steps.")


def resolve_cutoff(cutoff: int | float, total_steps: int) -> int:
    """``cutoff`` in optimizer steps: an int is taken as is, a float in (0, 1) as a fraction of training."""
    if isinstance(cutoff, float):
        return round(cutoff * total_steps)
    return int(cutoff)


def dropout_rate(step: int, total_steps: int, mode: Mode, p: float, cutoff: int, shape: Shape) -> float:
    """The dropout probability for optimizer step ``step`` (0-based) of ``total_steps``."""
    if mode == "standard":
        return p
    if mode == "early":
        if step >= cutoff:
            return 0.0
        return p if shape == "constant" else _linspace_entry(p, 0.0, cutoff, step)
    if step < cutoff:
        return 0.0
    if shape == "constant" or total_steps <= cutoff:
        return p
    return p * min(1.0, (step - cutoff + 1) / (total_steps - cutoff))


def quantize(rate: float, p: float, levels: int) -> float:
    """Round ``rate`` to the nearest of ``levels`` evenly spaced values in ``[0, p]`` (``levels=0``: exact)."""
    if levels <= 0 or p == 0:
        return rate
    step = p / (levels - 1) if levels > 1 else p
    return round(rate / step) * step


def _linspace_entry(start: float, stop: float, num: int, i: int) -> float:
    """``np.linspace(start, stop, num)[i]``, computed as numpy does (bit for bit)."""
    if num == 1 or i == num - 1:
        return start if num == 1 else stop
    return i * ((stop - start) / (num - 1)) + start


def depth_profile(originals: list[float], rate: float) -> list[float]:
    """Per-module rates that keep a per-depth profile: module ``i`` gets ``rate * r_i / max(r)``.

    Stochastic depth is usually built with a linear profile (block ``i`` of ``L`` drops with
    ``drop_path_rate * i / (L - 1)``); scaling the built rates keeps that profile while the schedule moves
    its maximum. If every original rate is 0 (no profile to keep), every module gets ``rate``.
    """
    top = max(originals, default=0.0)
    if top <= 0.0:
        return [rate] * len(originals)
    return [rate * r / top for r in originals]
