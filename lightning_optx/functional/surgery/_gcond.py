"""GCond (Gradient Conductor, "GCond: Gradient Conflict Resolution via Accumulation-based Stabilization for
Large-Scale Multi-Task Learning"), on Gram-space coefficients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._gcond_state import GCondState, _GCondOptions, _prepare_gcond_state, check_gcond_args
from ._gram_space import (
    COSINE_TOL,
    COSINE_TOL_FLOAT32,
    _combine,
    _compute,
    _gram_pair,
    _prepare_state_tensor,
    check_grads,
    decision_tolerance,
)

# A resolved gradient whose squared norm fell below this fraction of its own is out of the arbitration.
RESOLVED_FLOOR = COSINE_TOL_FLOAT32
# Floor of GCond's norm EMAs (the reference floors them at 1e-8; we only keep them away from zero).
_TINY = 1e-30


def _gcond_worst_pair(
    gram: list[list[float]], weak: float, floor: float | Sequence[float], tol: float = COSINE_TOL
) -> tuple[int, int, float] | None:
    """The pair ``i < j`` with the lowest cosine if it is below ``weak - tol``, else None.

    Pairs whose cosines are within ``tol`` of the lowest are ties, broken by index order (the
    first such pair in row-major order), so rounding cannot change the choice. Gradient ``i`` is skipped when
    its squared norm is ``<= floor`` (or ``<= floor[i]``, one floor per gradient).
    """
    floors = [floor] * len(gram) if isinstance(floor, (int, float)) else list(floor)
    cosines: list[tuple[int, int, float]] = []
    for i in range(len(gram)):
        for j in range(i + 1, len(gram)):
            if gram[i][i] <= floors[i] or gram[j][j] <= floors[j]:
                continue
            cosines.append((i, j, gram[i][j] / math.sqrt(gram[i][i] * gram[j][j])))
    if not cosines:
        return None
    lowest = min(cosine for _, _, cosine in cosines)
    if not lowest < weak - tol:
        return None
    return next(pair for pair in cosines if pair[2] <= lowest + tol)


@dataclass
class _Arbiter:
    """What GCond's arbitrator reads: norm EMAs, the winner history, last step's raw gradients."""

    norm_ema: list[float]
    history: list[int]
    window: int
    weights: tuple[float, float]
    cross: Tensor | None  # cross[k, i] = <g_k (raw, this step), prev_i>
    prev_norms: list[float]
    tol: float = COSINE_TOL  # a challenger wins only with a score higher by more than this

    def dominant(self, task: int) -> bool:
        return self.window > 0 and len(self.history) == self.window and all(h == task for h in self.history)

    def stability(self, task: int, coeffs: Tensor, norm: float) -> float:
        """``max(cos(current g_task, previous raw g_task), 0)``; 0 without a previous step."""
        if self.cross is None or norm <= 0 or self.prev_norms[task] <= 0:
            return 0.0
        return max(float(coeffs[task] @ self.cross[:, task]) / (norm * self.prev_norms[task]), 0.0)

    def decide(self, i: int, j: int, coeffs: Tensor, gram: list[list[float]]) -> tuple[int, int]:
        """(winner, loser). A task that won the last ``window`` arbitrations yields; else the higher score."""
        if self.dominant(i) and not self.dominant(j):
            return j, i
        if self.dominant(j) and not self.dominant(i):
            return i, j
        norm_i, norm_j = math.sqrt(gram[i][i]), math.sqrt(gram[j][j])
        scaled_i, scaled_j = norm_i / self.norm_ema[i], norm_j / self.norm_ema[j]
        total = scaled_i + scaled_j
        strength_i, strength_j = (scaled_i / total, scaled_j / total) if total > 0 else (0.0, 0.0)
        w_stability, w_strength = self.weights
        score_i = w_stability * self.stability(i, coeffs, norm_i) + w_strength * strength_i
        score_j = w_stability * self.stability(j, coeffs, norm_j) + w_strength * strength_j
        return (j, i) if score_j > score_i + self.tol else (i, j)

    def record(self, winner: int) -> None:
        if self.window > 0:
            self.history = [*self.history, winner][-self.window :]


def _gcond_angle_factors(cosine: float, thresholds: tuple[float, float, float], power: float) -> tuple[float, float]:
    """GCond's smooth logic: the remapped conflict angle's sines ``(s_winner, s_loser)``.

    ``cos >= main``: angle ``pi/2 (1 - t)``, ``t = (cos - main) / (weak - main)`` in [0, 1];
    ``critical < cos < main``: ``pi/2 + pi/2 t^power``, ``t = (cos - main) / (critical - main)``;
    ``cos <= critical``: ``pi`` (the winner is left alone: ``s_winner = 0`` exactly). The loser's factor is
    ``sin(min(angle, pi/2))``: 1 from the main threshold down.
    """
    critical, main, weak = thresholds
    if cosine <= critical:
        return 0.0, 1.0
    if cosine >= main:
        t = min(max((cosine - main) / (weak - main), 0.0), 1.0) if weak > main else 1.0
        angle = math.pi / 2 * (1.0 - t)
    else:
        angle = math.pi / 2 + math.pi / 2 * ((cosine - main) / (critical - main)) ** power
    return math.sin(angle), math.sin(min(angle, math.pi / 2))


def _gcond_resolve_smooth(
    coeffs: Tensor, gram: list[list[float]], winner: int, loser: int, cosine: float, options: _GCondOptions
) -> None:
    """Both gradients of the pair are moved off each other at once, scaled by the remapped angle."""
    s_w, s_l = _gcond_angle_factors(cosine, options.conflict_thresholds, options.remap_power)
    dot = gram[winner][loser]
    alpha_w = -s_w * dot / gram[loser][loser]
    alpha_l = -s_l * dot / gram[winner][winner]
    row_w, row_l = coeffs[winner].clone(), coeffs[loser].clone()
    coeffs[winner] = row_w + alpha_w * row_l
    coeffs[loser] = row_l + alpha_l * row_w


def _gcond_resolve_zones(
    coeffs: Tensor, gram: list[list[float]], pair: tuple[int, int], cosine: float, arbiter: _Arbiter,
    options: _GCondOptions,
) -> None:
    """GCond's 4-zone logic: zero the loser / project the loser / project both symmetrically / nothing."""
    i, j = pair
    critical, main, weak = options.conflict_thresholds
    if cosine < main:
        winner, loser = arbiter.decide(i, j, coeffs, gram)
        if cosine < critical:
            coeffs[loser] = 0.0
        else:
            coeffs[loser] = coeffs[loser] - (gram[loser][winner] / gram[winner][winner]) * coeffs[winner]
        arbiter.record(winner)
    elif cosine < weak:
        dot = gram[i][j]
        row_i, row_j = coeffs[i].clone(), coeffs[j].clone()
        coeffs[i] = row_i - (dot / gram[j][j]) * row_j
        coeffs[j] = row_j - (dot / gram[i][i]) * row_i


def _gcond_floors(start_sq_norms: list[float]) -> list[float]:
    """Below its floor a resolved gradient takes no further part in the arbitration.

    The floor is :data:`RESOLVED_FLOOR` of the gradient's own squared norm before the loop (its norm fell below
    0.3% of what it was), in every dtype: what is left of a gradient projected (towards) zero is then rounding
    noise of the float32 Gramian (relative 1e-6), whose cosines are arbitrary, and float32 and float64 make the
    same decisions; and at least ``1e-20`` of the largest, so that an exactly zero gradient is skipped too.
    """
    absolute = 1e-20 * max(max(start_sq_norms), 1e-300)
    return [max(RESOLVED_FLOOR * sq, absolute) for sq in start_sq_norms]


def _gcond_coefficients(
    raw_gram: Tensor, arbiter: _Arbiter, raw_norms: list[float], options: _GCondOptions
) -> Tensor:
    """Run GCond's conflict resolution on coefficients: resolved gradient ``i`` is ``sum_k C[i, k] g_k``.

    Every operation of the reference (projections, zeroing, norm capping) is a linear combination of task
    gradients, so it acts on the ``(T, T)`` float64 matrix ``C`` and the Gramian, never on the ``n``-dim
    vectors: the whole loop runs on the host for the price of one ``(T, T)`` transfer.
    """
    num_tasks = raw_gram.shape[0]
    coeffs = torch.eye(num_tasks, dtype=torch.float64)
    if options.norm_cap is not None:
        for i, norm in enumerate(raw_norms):
            if norm > options.norm_cap:
                coeffs[i, i] = options.norm_cap / norm
    weak = options.conflict_thresholds[2]
    floors: list[float] = []
    for step in range(options.projection_max_iters or 2 * num_tasks):
        gram = (coeffs @ raw_gram @ coeffs.T).tolist()
        if step == 0:
            floors = _gcond_floors([gram[i][i] for i in range(num_tasks)])
        found = _gcond_worst_pair(gram, weak, floors, arbiter.tol)
        if found is None:
            break
        i, j, cosine = found
        if options.use_smooth_logic:
            winner, loser = arbiter.decide(i, j, coeffs, gram)
            arbiter.record(winner)
            _gcond_resolve_smooth(coeffs, gram, winner, loser, cosine, options)
        else:
            _gcond_resolve_zones(coeffs, gram, (i, j), cosine, arbiter, options)
    return coeffs


def gcond(
    grads: Tensor,
    state: GCondState,
    *,
    conflict_thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
    remap_power: float = 2.0,
    dominance_window: int = 3,
    tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
    norm_ema_beta: float = 0.95,
    momentum_beta: float = 0.85,
    projection_max_iters: int | None = None,
    norm_cap: float | None = None,
    use_smooth_logic: bool = True,
) -> Tensor:
    """GCond (Gradient Conductor): resolve the worst conflict first, with an arbitrator, then momentum.

    Follows ``GradientConductor`` in AlevLab-dev/GCond ``grad_conductor.py`` (the authors' code, latest
    version: ``_project``, ``_run_arbitrator``, ``_get_effective_alpha``, ``_momentum_update``), with the
    reference's option names and defaults. One step:

    1. Update each task's norm EMA with its raw norm (``ema <- b ema + (1 - b) ||g_i||``, from 1.0);
       optionally cap each task gradient's norm at ``norm_cap``.
    2. Up to ``projection_max_iters`` times (default ``2 T``): find the pair with the lowest cosine; stop if
       it is ``>= weak``. The arbitrator names a winner: a task that won the last ``dominance_window``
       arbitrations (kept across steps) yields; otherwise the higher score ``w_stab * max(cos(g_i,
       prev_i), 0) + w_str * s_i / (s_i + s_j)`` wins, with ``s_i = ||g_i|| / ema_i`` and ``prev_i`` last
       step's gradient of task ``i``. Smooth logic (default): remap the cosine to an angle
       (:func:`_gcond_angle_factors`) and move both at once, ``g_w -= s_w (g_w.g_l / ||g_l||^2) g_l``,
       ``g_l -= s_l (g_w.g_l / ||g_w||^2) g_w``: below ``critical`` the loser is projected onto the winner's
       normal plane (PCGrad) and the winner is untouched; between ``critical`` and ``main`` the winner moves
       partly; above ``main`` both move symmetrically, less and less up to ``weak``. The 4-zone logic
       (``use_smooth_logic=False``) zeroes the loser below ``critical``, projects it between ``critical``
       and ``main``, projects both symmetrically up to ``weak``.
    3. Sum the resolved task gradients; return the bias-corrected momentum ``m / (1 - beta^t)`` with
       ``m <- beta m + (1 - beta) g`` (``momentum_beta=0`` returns the resolved sum itself, the reference's
       ``return_raw_grad=True``). The reference's README advises setting the optimizer's ``beta1`` to 0 then.

    Departures and ambiguities:

    * The latest reference makes a dominant task LOSE (``return name_j, name_i`` when ``i`` is dominant)
      while its comment and README say it wins, and an earlier version let it win. We follow the latest code:
      letting it win would lock the arbitration once a task has won ``dominance_window`` times in a row.
    * The stability score compares with last step's RAW task gradients, as the reference's comment says; its
      code swaps in the buffers after they were modified in place, i.e. the resolved gradients.
    * Conflict detection, cosines and projections guard only exact zeros (and gradients below 1e-10 of the
      largest norm), where the reference adds an absolute ``1e-8``, which switches GCond off for gradients
      of norm below about 1e-4. Accumulators are float32, not bfloat16.
    * Decisions ignore differences below ``tol`` relative to the norms (:data:`COSINE_TOL` = 1e-9 for float64
      task gradients, :data:`COSINE_TOL_FLOAT32` = 1e-5 for float32 and below, far above the rounding of
      the Gramian): a pair is in conflict when its cosine is below ``weak - tol`` (so a pair just resolved by
      a projection, cosine 0 up to rounding of either sign, is not re-arbitrated), cosines within ``tol`` of
      the lowest are ties (broken by index), and the challenger wins only with a score higher by more than
      ``tol``. No decision depends on the direction of rounding, where the reference's exact comparisons do.
      A resolved gradient whose squared norm fell below :data:`RESOLVED_FLOOR` (1e-5) of its own before the
      loop is out of the arbitration in every dtype (:func:`_gcond_floors`); the reference keeps arbitrating
      what is by then rounding noise, so its float32 and float64 decisions can differ.
    * The stochastic mode ("stochastic accumulation": each loss accumulated over its own share of the
      micro-batches) concerns how the per-task gradients are computed, not how they are combined: it is the
      caller's business (the callback's), not this function's. The Lion/LARS update (``use_lion``) needs the
      parameters and is an optimizer, not an aggregation: not implemented.

    Invariant to the order of the tasks up to ties (equal cosines or scores are broken by task index). The
    conflict loop runs on the host on ``(T, T)`` coefficients (:func:`_gcond_coefficients`): one float64
    pass over the task gradients (their Gramian and their inner products with last step's), one transfer of
    that ``T x 2T`` matrix, and one combination of the task gradients on the device per step.
    """
    check_grads(grads)
    check_gcond_args(
        conflict_thresholds, remap_power, dominance_window, tie_breaking_weights, norm_ema_beta, momentum_beta,
        projection_max_iters, norm_cap, use_smooth_logic,
    )
    critical, main, weak = conflict_thresholds
    w_stability, w_strength = tie_breaking_weights
    options = _GCondOptions(
        (critical, main, weak), remap_power, dominance_window, (w_stability, w_strength), norm_ema_beta,
        momentum_beta, projection_max_iters, norm_cap, use_smooth_logic,
    )
    g = _compute(grads)
    num_tasks, num_params = g.shape
    _prepare_gcond_state(state, num_tasks, num_params)
    prev = None if state.prev is None else state.prev.to(g.device, g.dtype)
    host = _gram_pair(g, prev).cpu()  # [G G^T | G prev^T]: one pass over the gradients, one transfer
    raw_gram, cross = host[:, :num_tasks], (host[:, num_tasks:] if prev is not None else None)
    raw_norms = [math.sqrt(max(x, 0.0)) for x in raw_gram.diagonal().tolist()]
    state.norm_ema = [
        max(norm_ema_beta * ema + (1.0 - norm_ema_beta) * norm, _TINY) for ema, norm in zip(state.norm_ema, raw_norms)
    ]
    arbiter = _Arbiter(
        state.norm_ema, state.history, dominance_window, options.tie_breaking_weights,
        cross, state.prev_norms, decision_tolerance(grads),
    )
    coeffs = _gcond_coefficients(raw_gram, arbiter, raw_norms, options)
    resolved = _combine(coeffs.sum(dim=0), g)
    if prev is not None and prev.data_ptr() == state.prev.data_ptr():  # type: ignore[union-attr]
        prev.copy_(g)  # reuse last step's buffer
    else:
        state.prev = g.clone()
    state.history, state.prev_norms = arbiter.history, raw_norms
    state.momentum = _prepare_state_tensor(state.momentum, g, (num_params,), "GCond state `momentum`")
    state.step += 1
    state.momentum.lerp_(resolved, 1.0 - momentum_beta)  # beta m + (1 - beta) g, one pass
    return (state.momentum / (1.0 - momentum_beta**state.step)).to(grads.dtype)
