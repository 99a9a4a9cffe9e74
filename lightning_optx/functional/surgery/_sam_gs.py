"""SAM-GS (Borsani et al. 2025, "Gradient Similarity Surgery in Multi-Task Deep Learning")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._gram_space import (
    _check_positive,
    _check_unit_interval,
    _clone,
    _combine,
    _compute,
    _gram,
    _prepare_state_tensor,
    check_grads,
)


@dataclass
class SamGsState:
    """SAM-GS state: per-task first moments, the second moment of the dissimilarity, a step counter.

    Attributes:
        m: ``(T, n)`` EMA of the task gradients (``None`` until the first call).
        v: scalar EMA of ``(1 - mean similarity)^2`` (``None`` until the first call).
        step: number of calls so far (bias correction uses it).
    """

    m: Tensor | None = None
    v: Tensor | None = None
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Copies of the tensors and the step counter."""
        return {"m": _clone(self.m), "v": _clone(self.v), "step": self.step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are copied)."""
        self.m, self.v = _clone(state_dict["m"]), _clone(state_dict["v"])
        self.step = int(state_dict["step"])


def init_sam_gs_state() -> SamGsState:
    """An empty SAM-GS state; :func:`sam_gs` sizes it on its first call."""
    return SamGsState()


def check_sam_gs_args(gamma: float, beta1: float, beta2: float, eps: float) -> None:
    """Raise ``ValueError`` naming the argument if a SAM-GS hyperparameter is out of range."""
    _check_unit_interval("gamma", gamma, closed=True)
    _check_unit_interval("beta1", beta1)
    _check_unit_interval("beta2", beta2)
    _check_positive("eps", eps)


def gradient_magnitude_similarity(norms: Tensor) -> Tensor:
    """The mean over task pairs ``i < j`` of ``2 ||g_i|| ||g_j|| / (||g_i||^2 + ||g_j||^2)``, in [0, 1].

    1 when all magnitudes are equal, near 0 when one dwarfs the other. Two zero gradients count as similar.
    """
    rows, cols = torch.triu_indices(norms.numel(), norms.numel(), offset=1, device=norms.device)
    a, b = norms[rows], norms[cols]
    den = a * a + b * b
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, 2 * (a * b) / safe, torch.ones_like(den)).mean()


def sam_gs(
    grads: Tensor,
    state: SamGsState,
    gamma: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    eps: float = 1e-8,
) -> Tensor:
    """SAM-GS: equalise gradient magnitudes when they are dissimilar, else modulate by the first moment.

    Follows ``SAMGS.balance_magnitude`` in ThomBors/samgs ``methods/weight_methods.py`` (the authors' code):

    * ``s`` = mean pairwise gradient magnitude similarity (:func:`gradient_magnitude_similarity`);
    * ``m <- beta1 m + (1 - beta1) g`` per task; ``v <- beta2 v + (1 - beta2)(1 - s)^2 + eps`` (a scalar;
      ``eps`` is added every step, as in the reference); ``m_hat``, ``v_hat`` bias-corrected as in Adam;
    * if ``s < gamma`` (equalisation): ``sum_i g_i / ||g_i|| * mean_j ||g_j||``;
    * else (momentum modulation): ``sum_i g_i * |m_hat_i| / sqrt(v_hat)`` (element-wise).

    Both moments are updated on every step, whichever branch is taken. Defaults are the reference's
    (``momentum=0.9, beta2=0.99, gamma=0.1``; the experiment configs also use ``gamma=0.7``). Departures:
    the reference's MTRL variant (``experiments/mtrl_methods/samgs.py``) equalises when ANY pair is below
    ``gamma`` and starts ``m`` at ones; we follow the library version (mean similarity, ``m`` at zero). A
    zero task gradient is left at zero by the equalisation (the reference divides by zero). The reference
    trainer then multiplies the result by ``T`` and clips the shared gradients' norm to 1 (``max_norm``);
    neither is done here (use the Trainer's ``gradient_clip_val``). Note the modulation branch is quadratic
    in the gradient scale. The result is invariant to the order of the tasks (up to rounding).

    The norms and the similarity come from the float64 Gramian, and the equalisation is one combination of
    the task gradients; the modulation is element-wise by definition (per-coordinate weights ``|m_hat|``).
    Only the branch taken is computed: one host sync of the similarity per step.
    """
    check_grads(grads)
    check_sam_gs_args(gamma, beta1, beta2, eps)
    g = _compute(grads)
    state.m = _prepare_state_tensor(state.m, g, tuple(g.shape), "SAM-GS state `m`")
    state.v = _prepare_state_tensor(state.v, g, (), "SAM-GS state `v`")
    state.step += 1
    norms = _gram(g).diagonal().clamp_min(0).sqrt()
    similarity = gradient_magnitude_similarity(norms)
    state.m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    state.v.mul_(beta2).add_((1.0 - beta2) * (1.0 - similarity.to(state.v.dtype)) ** 2 + eps)
    if bool(similarity < gamma):
        safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        return _combine(norms.mean() / safe_norms, g).to(grads.dtype)
    v_hat = state.v / (1.0 - beta2**state.step)
    factor = 1.0 / ((1.0 - beta1**state.step) * v_hat.sqrt())  # |m_hat| / sqrt(v_hat) = |m| * factor
    out = g[0] * state.m[0].abs()  # sum_i g_i * |m_i|, one row at a time (no (T, n) temporaries)
    for row, m_row in zip(g[1:], state.m[1:]):
        out.addcmul_(row, m_row.abs())
    return (out.mul_(factor)).to(grads.dtype)
