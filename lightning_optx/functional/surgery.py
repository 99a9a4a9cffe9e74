"""Gradient surgery for multi-task learning: combine T task gradients of the shared parameters into one.

Every function takes ``grads`` of shape ``(T, n)``: row ``t`` is task ``t``'s gradient of the shared
parameters, flattened. The result has shape ``(n,)`` and the dtype of ``grads``; the arithmetic runs in
float32 (or float64 for float64 input) on the device of ``grads``.

* ``pcgrad``: PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): each task gradient is
  projected onto the normal plane of every other task gradient it conflicts with, in a random order.
* ``cagrad``: CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"): the
  update that maximises the worst task's improvement within a ball around the mean gradient.
* ``sam_gs``: SAM-GS (Borsani et al. 2025, "Gradient Similarity Surgery in Multi-Task Deep Learning"):
  gradient magnitude similarity decides between gradient equalisation and momentum modulation.
* ``gcond``: GCond (Gradient Conductor, "GCond: Gradient Conflict Resolution via Accumulation-based
  Stabilization for Large-Scale Multi-Task Learning"): iterative PCGrad-style resolution of the worst
  conflicting pair, with an arbitrator that picks which task yields, and momentum on the result.
* ``sum`` and ``mean``: the plain row sum and row mean, the baselines.

``make_aggregator(method, **options)`` returns an ``Aggregator`` that owns the options and the state of
the stateful methods (SAM-GS, GCond) and derives PCGrad's per-step random order from ``(seed, step)``, so
that every rank and a resumed run draw the same order. Each method's docstring names the reference code it
follows and where it departs from it.

Examples:
    >>> import torch
    >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> conflict_rate(grads)
    tensor(1.)
    >>> pcgrad(grads)
    tensor([0.5000, 1.5000])
    >>> aggregator = make_aggregator("mean")
    >>> aggregator(grads, step=0)
    tensor([0.0000, 0.5000])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "Aggregator",
    "GCondState",
    "SamGsState",
    "aggregate_mean",
    "aggregate_sum",
    "cagrad",
    "cagrad_objective",
    "cagrad_weights",
    "check_cagrad_args",
    "check_gcond_args",
    "check_grads",
    "check_sam_gs_args",
    "conflict_rate",
    "gcond",
    "gradient_magnitude_similarity",
    "gramian",
    "init_gcond_state",
    "init_sam_gs_state",
    "make_aggregator",
    "mean_",
    "pcgrad",
    "pcgrad_orders",
    "sam_gs",
    "sum_",
    "task_norms",
]

METHODS = ("pcgrad", "cagrad", "sam_gs", "gcond", "sum", "mean")

# Floor of GCond's norm EMAs (the reference floors them at 1e-8; we only keep them away from zero).
_TINY = 1e-30


# --------------------------------------------------------------------------------------------------------
# Input checks and shared statistics
# --------------------------------------------------------------------------------------------------------


def check_grads(grads: Tensor) -> None:
    """Raise ``ValueError`` unless ``grads`` is a floating-point tensor of shape ``(T, n)``, T >= 2, n >= 1."""
    if not isinstance(grads, Tensor):
        raise ValueError(f"`grads` must be a torch.Tensor of shape (T, n), got {type(grads).__name__}.")
    if grads.dim() != 2:
        raise ValueError(
            f"`grads` must be a 2-D tensor of shape (T, n) (one flattened gradient per task), "
            f"got shape {tuple(grads.shape)}."
        )
    if grads.shape[0] < 2:
        raise ValueError(f"`grads` must hold at least 2 task gradients (T >= 2), got T={grads.shape[0]}.")
    if grads.shape[1] < 1:
        raise ValueError(f"`grads` must have at least one parameter (n >= 1), got shape {tuple(grads.shape)}.")
    if not grads.dtype.is_floating_point:
        raise ValueError(f"`grads` must have a floating-point dtype, got dtype={grads.dtype}.")


def _compute(grads: Tensor) -> Tensor:
    """``grads`` detached and promoted to at least float32 (no copy when already float32/float64)."""
    return grads.detach().to(torch.promote_types(grads.dtype, torch.float32))


# Parameters per block when forming a Gramian in float64 (bounds the float64 copy to 128 MiB).
_GRAM_BLOCK = 1 << 24


def _gram(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a @ b.T`` (``b`` defaults to ``a``) accumulated in float64, block by block over the parameters.

    float64 keeps the Gramian exact enough for the solvers (and is never computed in TF32 or bf16, whatever
    ``torch.backends.*.fp32_precision`` says); blocks bound the temporary float64 copy.
    """
    b = a if b is None else b
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    width = max(1, _GRAM_BLOCK // max(a.shape[0], b.shape[0]))
    for start in range(0, a.shape[1], width):
        part_a = a[:, start : start + width].double()
        part_b = part_a if b is a else b[:, start : start + width].double()
        out += part_a @ part_b.T
    return out


def _combine(coeffs: list[float], g: Tensor) -> Tensor:
    """``sum_i coeffs[i] g[i]`` with element-wise kernels (host coefficients: no sync, no reduced-precision
    matmul)."""
    out = g[0] * coeffs[0]
    for c, row in zip(coeffs[1:], g[1:]):
        out.add_(row, alpha=c)
    return out


def gramian(grads: Tensor) -> Tensor:
    """The ``(T, T)`` matrix of inner products ``<g_i, g_j>``, accumulated and returned in float64."""
    check_grads(grads)
    return _gram(_compute(grads))


def task_norms(grads: Tensor) -> Tensor:
    """The L2 norm of each task gradient, shape ``(T,)`` (at least float32)."""
    check_grads(grads)
    return torch.linalg.vector_norm(_compute(grads), dim=1)


def conflict_rate(grads: Tensor) -> Tensor:
    """The fraction of task pairs ``i < j`` whose gradients conflict (negative cosine), a float32 scalar."""
    gram = gramian(grads)
    rows, cols = torch.triu_indices(gram.shape[0], gram.shape[0], offset=1, device=gram.device)
    return (gram[rows, cols] < 0).to(torch.float32).mean()


def conflict_stats(grads: Tensor) -> tuple[Tensor, Tensor]:
    """``(conflict rate, task norms)`` from ONE float32 ``T x T`` product: the cheap monitoring path.

    Signs of inner products near zero may differ from :func:`conflict_rate`'s float64 Gramian; for logging.
    """
    check_grads(grads)
    g = grads.float()
    gram = g @ g.T
    rows, cols = torch.triu_indices(gram.shape[0], gram.shape[0], offset=1, device=gram.device)
    return (gram[rows, cols] < 0).to(torch.float32).mean(), gram.diagonal().clamp_min(0).sqrt()


def aggregate_sum(grads: Tensor) -> Tensor:
    """The plain sum of the task gradients (``grads.sum(0)``), the baseline of linear scalarisation."""
    check_grads(grads)
    return grads.detach().sum(dim=0)


def aggregate_mean(grads: Tensor) -> Tensor:
    """The plain mean of the task gradients (``grads.mean(0)``)."""
    check_grads(grads)
    return grads.detach().mean(dim=0)


sum_ = aggregate_sum
mean_ = aggregate_mean


def _check_unit_interval(name: str, value: Any, *, closed: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"`{name}` must be a float in {interval}, got {name}={value!r}.")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a float > 0, got {name}={value!r}.")


# --------------------------------------------------------------------------------------------------------
# PCGrad
# --------------------------------------------------------------------------------------------------------


def pcgrad_orders(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
    """For each task ``i``, a random order of the other tasks: an int64 CPU tensor of shape ``(T, T - 1)``.

    Row ``i`` is drawn with ``torch.randperm(T - 1, generator=generator)`` after the rows before it, so the
    same generator state gives the same orders on every rank.
    """
    rows = []
    device = generator.device if generator is not None else torch.device("cpu")
    for i in range(num_tasks):
        others = torch.tensor([j for j in range(num_tasks) if j != i], dtype=torch.long)
        perm = torch.randperm(num_tasks - 1, generator=generator, device=device).cpu()
        rows.append(others[perm])
    return torch.stack(rows)


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad: project each task gradient off the gradients it conflicts with, then sum.

    For each task ``i``, ``g_i'`` starts at ``g_i``; for each other task ``j`` in a random order (drawn from
    ``generator``, see :func:`pcgrad_orders`), if ``g_i' . g_j < 0`` then
    ``g_i' <- g_i' - (g_i' . g_j) / ||g_j||^2 * g_j``. The ``g_j`` are the ORIGINAL task gradients. Returns
    ``sum_i g_i'``.

    Follows Algorithm 1 of Yu et al. (2020) and the authors' ``PCGrad_tf.py`` (tianheyu927/PCGrad:
    ``grad_task - tf.minimum(proj_direction, 0.) * grads_task[k]``, projections against the original
    gradients, projected gradients SUMMED per variable). WeiChengTseng/Pytorch-PCGrad's ``pcgrad.py`` draws
    one shuffle per task the same way but averages by default (``reduction='mean'``), and shuffles the task
    itself in (a no-op projection); we exclude it, as Cranial-XIX/CAGrad ``nyuv2/utils.py`` ``pcgrad`` does.
    Divide by ``T`` for the mean variant. A zero ``g_j`` projects nothing (no 0/0).

    The loop over ``j`` is vectorised over ``i``: ``T - 1`` passes over a ``(T, n)`` tensor, no host sync.
    """
    check_grads(grads)
    g = _compute(grads)
    num_tasks = g.shape[0]
    orders = pcgrad_orders(num_tasks, generator).to(g.device)
    sq_norms = (g * g).sum(dim=1)
    safe_sq = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms))
    projected = g.clone()
    for k in range(num_tasks - 1):
        j = orders[:, k]
        other = g[j]
        dots = (projected * other).sum(dim=1)
        projected -= (dots.clamp(max=0.0) / safe_sq[j]).unsqueeze(1) * other
    return projected.sum(dim=0).to(grads.dtype)


# --------------------------------------------------------------------------------------------------------
# CAGrad
# --------------------------------------------------------------------------------------------------------

_CAGRAD_RESCALES = (0, 1, 2)


def check_cagrad_args(c: float, rescale: int) -> None:
    """Raise ``ValueError`` naming the argument if ``c`` or ``rescale`` is out of range."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 or math.isinf(c):
        raise ValueError(f"`c` must be a finite float >= 0, got c={c!r}.")
    if isinstance(rescale, bool) or rescale not in _CAGRAD_RESCALES:
        raise ValueError(f"`rescale` must be one of {_CAGRAD_RESCALES}, got rescale={rescale!r}.")


def cagrad_objective(gram: Tensor, weights: Tensor, c: float) -> Tensor:
    """CAGrad's dual objective ``F(w) = w^T G g0 + c ||g0|| ||G^T w||`` from the Gramian ``G G^T`` (float64).

    ``weights`` may be one weight vector ``(T,)`` or a batch ``(B, T)``; ``g0`` is the mean gradient.
    """
    k = gram.detach().double()
    w = weights.detach().to(device=k.device, dtype=torch.float64)
    b = k.mean(dim=1)
    g0_norm = k.mean().clamp_min(0).sqrt()
    quad = ((w @ k) * w).sum(dim=-1).clamp_min(0)
    return w @ b + c * g0_norm * quad.sqrt()


def _cagrad_parts(k: Tensor, c: float) -> tuple[Tensor, Tensor, float]:
    """The normalised Gramian, ``b = K 1/T`` and the radius ``r = c ||g0||`` in normalised units."""
    kn = k / k.diagonal().mean()
    kn = (kn + kn.T) / 2
    b = kn.mean(dim=1)
    return kn, b, c * math.sqrt(max(float(b.mean()), 0.0))


def _cagrad_values(kn: Tensor, b: Tensor, r: float, w: Tensor) -> Tensor:
    """``F`` for a batch of weight vectors ``w`` (B, T), in normalised units."""
    return w @ b + r * ((w @ kn) * w).sum(dim=1).clamp_min(0).sqrt()


def _cagrad_gap(kn: Tensor, b: Tensor, r: float, w: Tensor) -> float:
    """The duality gap ``F(w) - min_i <g_i, d(w)>`` with ``d(w) = g0 + r g_w / ||g_w||`` (inf if g_w = 0).

    ``d(w)`` is feasible for CAGrad's primal problem, so ``min_i <g_i, d(w)> <= F* <= F(w)``.
    """
    kw = kn @ w
    rho = math.sqrt(max(float(w @ kw), 0.0))
    if rho <= 0.0:
        return math.inf
    value = float(w @ b) + r * rho
    return value - float((b + (r / rho) * kw).min())


def _cagrad_face_points(kn: Tensor, b: Tensor, r: float, faces: Tensor) -> Tensor:
    """Stationary points of ``F`` on the affine hulls of the given faces of the simplex (rows of task ids).

    On the face spanned by tasks ``S`` (affinely independent gradients), write ``x = g_w`` as the point
    ``p`` of the face's affine hull closest to the origin (at distance ``h``) plus ``y`` in the hull's
    direction space. With ``a`` the norm of ``g0`` projected onto that space, ``F = p.g0 + y.g0 +
    r sqrt(h^2 + ||y||^2)`` is minimised by ``y = -a h / sqrt(r^2 - a^2) * g0_dir / a`` when ``r > a`` (and
    unbounded below otherwise: then the face holds no optimum). Returns the points that lie in the
    simplex, as rows of full weight vectors.
    """
    num_tasks = kn.shape[0]
    i0, rest = faces[:, 0], faces[:, 1:]
    k00 = kn[i0, i0]
    k0r = kn[rest, i0.unsqueeze(1)]
    m = kn[rest.unsqueeze(2), rest.unsqueeze(1)] - k0r.unsqueeze(2) - k0r.unsqueeze(1) + k00[:, None, None]
    q = k0r - k00.unsqueeze(1)
    beta = b[rest] - b[i0].unsqueeze(1)
    eigvals, eigvecs = torch.linalg.eigh(m)
    independent = eigvals[:, 0] > 1e-12 * eigvals[:, -1].clamp_min(1e-300)
    inv = torch.where(independent.unsqueeze(1), 1.0 / eigvals.clamp_min(1e-300), torch.zeros_like(eigvals))

    def solve(v: Tensor) -> Tensor:
        return torch.einsum("bij,bj,bkj,bk->bi", eigvecs, inv, eigvecs, v)

    z_near = -solve(q)
    h = (k00 + (q * z_near).sum(dim=1)).clamp_min(0).sqrt()
    m_beta = solve(beta)
    a = (beta * m_beta).sum(dim=1).clamp_min(0).sqrt()
    bounded = r * r > a * a
    tau = a * h / (r * r - a * a).clamp_min(1e-300).sqrt()
    shift = torch.where(a > 0, tau / a.clamp_min(1e-300), torch.zeros_like(a))
    z = z_near - shift.unsqueeze(1) * m_beta
    w_face = torch.cat([1 - z.sum(dim=1, keepdim=True), z], dim=1)
    valid = independent & bounded & (w_face >= -1e-12).all(dim=1)
    weights = torch.zeros(int(valid.sum()), num_tasks, dtype=torch.float64)
    weights.scatter_(1, faces[valid], w_face[valid].clamp_min(0))
    return weights / weights.sum(dim=1, keepdim=True)


def _cagrad_face_candidates(kn: Tensor, b: Tensor, r: float, size: int) -> Tensor:
    """:func:`_cagrad_face_points` of every face of the simplex with ``size`` vertices."""
    faces = torch.tensor(list(itertools.combinations(range(kn.shape[0]), size)), dtype=torch.long)
    return _cagrad_face_points(kn, b, r, faces)


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` onto the probability simplex (sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, dim=0) - 1
    ks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / ks > 0).max())
    return (v - css[rho] / (rho + 1)).clamp_min(0)


def _cagrad_fista(kn: Tensor, b: Tensor, r: float, w: Tensor, tol: float, max_iters: int) -> Tensor:
    """Accelerated projected gradient (FISTA, backtracking, restart) from ``w``, for when faces are too many.

    Every 25 iterations the face spanned by the current support is solved in closed form ("polish"), which
    ends the search exactly once the support is right; it also stops after 500 iterations without progress.
    """

    def value(v: Tensor) -> float:
        return float(_cagrad_values(kn, b, r, v.unsqueeze(0)))

    def gradient(v: Tensor) -> Tensor:
        kv = kn @ v
        rho = math.sqrt(max(float(v @ kv), 0.0))
        return b + (r / rho) * kv if rho > 0 else b.clone()

    best, best_value, improved_at = w, value(w), 0
    y, momentum, lipschitz, current = w.clone(), 1.0, 1.0, best_value
    for it in range(max_iters):
        if it % 25 == 0:
            support = torch.nonzero(w > 1e-12).flatten()
            if support.numel() >= 2:
                polished = _cagrad_face_points(kn, b, r, support.unsqueeze(0))
                if polished.shape[0] and value(polished[0]) <= best_value:
                    best, best_value = polished[0], value(polished[0])
            if _cagrad_gap(kn, b, r, best) <= tol * (1.0 + abs(best_value)) or it - improved_at > 500:
                break
        grad, y_value = gradient(y), value(y)
        while True:
            nxt = _project_simplex(y - grad / lipschitz)
            step = nxt - y
            bound = y_value + float(grad @ step) + 0.5 * lipschitz * float(step @ step)
            if value(nxt) <= bound + 1e-15 * (1.0 + abs(y_value)) or lipschitz > 1e30:
                break
            lipschitz *= 2.0
        nxt_value = value(nxt)
        if nxt_value > current:  # adaptive restart
            y, momentum = w.clone(), 1.0
            continue
        nxt_momentum = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        y = nxt + ((momentum - 1) / nxt_momentum) * (nxt - w)
        w, current, momentum, lipschitz = nxt, nxt_value, nxt_momentum, lipschitz * 0.9
        if current < best_value - tol * (1.0 + abs(best_value)):
            improved_at = it
        if current < best_value:
            best, best_value = w, current
    return best


def cagrad_weights(
    gram: Tensor, c: float, *, max_faces: int = 1 << 15, tol: float = 1e-10, max_iters: int = 5000
) -> Tensor:
    """Solve CAGrad's dual ``min_{w in simplex} w^T G g0 + c ||g0|| ||G^T w||`` from the Gramian only.

    Returns the weights ``w`` as a float64 CPU tensor of shape ``(T,)``. ``gram`` is moved to the host in
    float64 (the one device sync of CAGrad) and normalised by its mean diagonal, which leaves ``w`` unchanged.

    Solver: exact. The optimum lies in the relative interior of some face of the simplex whose task
    gradients are affinely independent, where it is the unique stationary point of ``F`` on the face's
    affine hull, in closed form (:func:`_cagrad_face_candidates`). Faces are enumerated by increasing size;
    the search stops as soon as the best point so far has a zero duality gap (``F(w) - min_i <g_i, d(w)>
    <= tol (1 + |F|)``), which is usually after the vertices and edges. Enumerating every face is exact
    (at most ``2^T - 1`` faces: T <= 15 always fits in ``max_faces``); beyond ``max_faces`` faces the best
    point so far is refined by FISTA (accelerated projected gradient, :func:`_cagrad_fista`), whose
    support is solved exactly as a face every 25 iterations, with the same gap test (at most ``max_iters``
    iterations). ``c = 0`` (any ``w`` is optimal) and an all-zero Gramian return uniform weights.
    """
    k = gram.detach().to(device="cpu", dtype=torch.float64)
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 2:
        raise ValueError(f"`gram` must be a square (T, T) matrix with T >= 2, got shape {tuple(k.shape)}.")
    num_tasks = k.shape[0]
    uniform = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
    if c == 0 or not float(k.diagonal().mean()) > 0:
        return uniform
    kn, b, r = _cagrad_parts(k, c)
    candidates = torch.eye(num_tasks, dtype=torch.float64)
    values = _cagrad_values(kn, b, r, candidates)
    best = candidates[int(values.argmin())]
    faces = num_tasks
    for size in range(2, num_tasks + 1):
        if _cagrad_gap(kn, b, r, best) <= tol * (1.0 + abs(float(_cagrad_values(kn, b, r, best[None])))):
            return best
        faces += math.comb(num_tasks, size)
        if faces > max_faces:
            return _cagrad_fista(kn, b, r, best, tol, max_iters)
        found = _cagrad_face_candidates(kn, b, r, size)
        if found.shape[0]:
            candidates = torch.cat([best[None], found])
            best = candidates[int(_cagrad_values(kn, b, r, candidates).argmin())]
    return best


# Below this norm of g_w (relative to the RMS task-gradient norm) the optimum is taken to be g_w = 0: g_w is
# formed in float32, whose rounding (~1e-7 of the task gradients' norms) leaves smaller norms meaningless.
_CAGRAD_ZERO_GW = 1e-4


def _nonneg_qp(k: Tensor, b: Tensor, iters: int = 2000) -> Tensor:
    """``argmin_{lam >= 0} lam^T K lam / 2 + b.lam`` by accelerated projected gradient (K PSD, T x T)."""
    lipschitz = float(torch.linalg.eigvalsh(k)[-1])
    lam = torch.zeros_like(b)
    if not lipschitz > 0:
        return lam
    y, momentum = lam.clone(), 1.0
    for it in range(iters):
        nxt = (y - (k @ y + b) / lipschitz).clamp_min(0)
        nxt_momentum = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        y = nxt + ((momentum - 1) / nxt_momentum) * (nxt - lam)
        moved = float((nxt - lam).abs().max())
        lam, momentum = nxt, nxt_momentum
        if it % 50 == 49 and moved <= 1e-15 * (1.0 + float(lam.abs().max())):
            break
    return lam


def _cagrad_cone_step(gram: Tensor) -> Tensor:
    """``lam`` such that ``g0 + G^T lam`` is the projection of ``g0`` onto ``{d : <g_i, d> >= 0 for all i}``."""
    k = gram.detach().to(device="cpu", dtype=torch.float64)
    kn = k / k.diagonal().mean()
    return _nonneg_qp((kn + kn.T) / 2, kn.mean(dim=1))


def cagrad(grads: Tensor, c: float = 0.5, rescale: int = 1) -> Tensor:
    """CAGrad: the update that maximises the worst task's improvement in a ball around the mean gradient.

    With ``g0`` the mean task gradient and ``phi = c^2 ||g0||^2``, solve the dual
    ``min_{w in simplex} g_w^T g0 + sqrt(phi) ||g_w||`` (``g_w = sum_i w_i g_i``, :func:`cagrad_weights`),
    then ``d = g0 + sqrt(phi) / ||g_w|| * g_w``. ``d`` is the solution of the primal
    ``max_d min_i <g_i, d>`` subject to ``||d - g0|| <= c ||g0||`` (Liu et al. 2021, Eq. (3) and
    Algorithm 1). Returns ``d / (1 + c^2)`` for ``rescale=1`` (default), ``d`` for ``rescale=0`` and
    ``d / (1 + c)`` for ``rescale=2``, as ``cagrad(grads, alpha, rescale)`` in Cranial-XIX/CAGrad
    ``nyuv2/utils.py`` (the authors' ``toy.py`` divides by ``1 + c``). ``c = 0`` gives the mean.

    Matches the reference's objective (``x^T A b + c sqrt(x^T A x)`` with ``A`` the Gramian, ``b`` uniform,
    ``c = alpha ||g0||``) but solves it exactly instead of with ``scipy.optimize.minimize`` (SLSQP), and
    drops the reference's absolute ``1e-8`` terms (which are not scale invariant). The Gramian is accumulated
    in float64 (never TF32) and ``g_w`` is formed with host weights, element-wise. The result is on the mean
    scale: the reference's training loop multiplies it by ``T`` ("to match the sum loss") before writing it
    to ``.grad``; do that yourself (or scale the learning rate) to reproduce it.

    Degenerate case, not covered by the paper: when the optimum has ``g_w = 0`` (the origin is in the
    gradients' convex hull, a Pareto-stationary point, and ``c`` is large enough), ``d`` is undefined by the
    formula (the reference then returns rounding noise amplified by ``1 / 1e-8``) and every ``d`` of the ball
    with ``<g_i, d> >= 0`` for all ``i`` is optimal. We return the one closest to ``g0``: the projection of
    ``g0`` onto that cone (a small non-negative QP on the Gramian), pulled back into the ball if rounding put
    it outside. "``g_w = 0``" means ``||g_w||`` below ``1e-4`` of the RMS task-gradient norm.
    """
    check_grads(grads)
    check_cagrad_args(c, rescale)
    g = _compute(grads)
    g0 = g.mean(dim=0)
    if c == 0:
        return g0.to(grads.dtype)
    host = _gram(g).cpu()
    w = cagrad_weights(host, c)
    radius = c * torch.linalg.vector_norm(g0)
    scale = float(host.diagonal().mean())
    if scale > 0 and float(w @ host @ w) <= (_CAGRAD_ZERO_GW**2) * scale:
        step = _combine(_cagrad_cone_step(host).tolist(), g)
        step_norm = torch.linalg.vector_norm(step)
        d = g0 + step * torch.where(step_norm > radius, radius / torch.where(step_norm > 0, step_norm, 1.0), 1.0)
    else:
        g_w = _combine(w.tolist(), g)
        g_w_norm = torch.linalg.vector_norm(g_w)
        lam = torch.where(g_w_norm > 0, radius / torch.where(g_w_norm > 0, g_w_norm, 1.0), 0.0)
        d = g0 + lam * g_w
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    return (d / divisor).to(grads.dtype)


# --------------------------------------------------------------------------------------------------------
# SAM-GS
# --------------------------------------------------------------------------------------------------------


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


def _prepare_state_tensor(tensor: Tensor | None, like: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    if tensor is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)} but `grads` needs {shape}: the number of tasks or "
            f"parameters changed; start from a fresh state."
        )
    return tensor.to(device=like.device, dtype=like.dtype)


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

    Both branches are computed and selected with ``torch.where``, so there is no host sync.
    """
    check_grads(grads)
    check_sam_gs_args(gamma, beta1, beta2, eps)
    g = _compute(grads)
    state.m = _prepare_state_tensor(state.m, g, tuple(g.shape), "SAM-GS state `m`")
    state.v = _prepare_state_tensor(state.v, g, (), "SAM-GS state `v`")
    state.step += 1
    norms = torch.linalg.vector_norm(g, dim=1)
    similarity = gradient_magnitude_similarity(norms)
    state.m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    state.v.mul_(beta2).add_((1.0 - beta2) * (1.0 - similarity) ** 2 + eps)
    m_hat = state.m / (1.0 - beta1**state.step)
    v_hat = state.v / (1.0 - beta2**state.step)
    modulated = (g * m_hat.abs() / v_hat.sqrt()).sum(dim=0)
    safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    equalised = (g / safe_norms.unsqueeze(1) * norms.mean()).sum(dim=0)
    return torch.where(similarity < gamma, equalised, modulated).to(grads.dtype)


# --------------------------------------------------------------------------------------------------------
# GCond
# --------------------------------------------------------------------------------------------------------


@dataclass
class GCondState:
    """GCond state: what the arbitrator remembers between steps, and the momentum of the result.

    Attributes:
        norm_ema: EMA of each task's raw gradient norm (starts at 1.0, as in the reference).
        history: the last ``dominance_window`` arbitration winners (task indices), across steps.
        prev: ``(T, n)`` raw task gradients of the previous step (stability score), ``None`` at first.
        prev_norms: their norms.
        momentum: ``(n,)`` EMA of the resolved gradient, ``None`` at first.
        step: number of calls so far (momentum bias correction).
    """

    norm_ema: list[float] = field(default_factory=list)
    history: list[int] = field(default_factory=list)
    prev: Tensor | None = None
    prev_norms: list[float] = field(default_factory=list)
    momentum: Tensor | None = None
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Copies of the tensors and plain values."""
        return {
            "norm_ema": list(self.norm_ema),
            "history": list(self.history),
            "prev": _clone(self.prev),
            "prev_norms": list(self.prev_norms),
            "momentum": _clone(self.momentum),
            "step": self.step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are copied)."""
        self.norm_ema = [float(x) for x in state_dict["norm_ema"]]
        self.history = [int(x) for x in state_dict["history"]]
        self.prev = _clone(state_dict["prev"])
        self.prev_norms = [float(x) for x in state_dict["prev_norms"]]
        self.momentum = _clone(state_dict["momentum"])
        self.step = int(state_dict["step"])


def init_gcond_state() -> GCondState:
    """An empty GCond state; :func:`gcond` sizes it on its first call."""
    return GCondState()


def check_gcond_args(
    conflict_thresholds: tuple[float, float, float],
    remap_power: float,
    dominance_window: int,
    tie_breaking_weights: tuple[float, float],
    norm_ema_beta: float,
    momentum_beta: float,
    projection_max_iters: int | None,
    norm_cap: float | None,
    use_smooth_logic: bool,
) -> None:
    """Raise ``ValueError`` naming the argument if a GCond option is out of range."""
    thresholds = tuple(conflict_thresholds) if isinstance(conflict_thresholds, (tuple, list)) else ()
    if (
        len(thresholds) != 3
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and -1 <= t <= 1 for t in thresholds)
        or not thresholds[0] <= thresholds[1] <= thresholds[2]
    ):
        raise ValueError(
            "`conflict_thresholds` must be 3 cosines (critical, main, weak) in [-1, 1] with "
            f"critical <= main <= weak, got conflict_thresholds={conflict_thresholds!r}."
        )
    _check_positive("remap_power", remap_power)
    if isinstance(dominance_window, bool) or not isinstance(dominance_window, int) or dominance_window < 0:
        raise ValueError(f"`dominance_window` must be an integer >= 0, got dominance_window={dominance_window!r}.")
    weights = tuple(tie_breaking_weights) if isinstance(tie_breaking_weights, (tuple, list)) else ()
    if (
        len(weights) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in weights)
        or not sum(weights) > 0
    ):
        raise ValueError(
            "`tie_breaking_weights` must be 2 non-negative floats (stability, strength) with a positive sum, "
            f"got tie_breaking_weights={tie_breaking_weights!r}."
        )
    _check_unit_interval("norm_ema_beta", norm_ema_beta)
    _check_unit_interval("momentum_beta", momentum_beta)
    if projection_max_iters is not None and (
        isinstance(projection_max_iters, bool) or not isinstance(projection_max_iters, int) or projection_max_iters < 1
    ):
        raise ValueError(
            "`projection_max_iters` must be None or an integer >= 1, "
            f"got projection_max_iters={projection_max_iters!r}."
        )
    if norm_cap is not None:
        _check_positive("norm_cap", norm_cap)
    if not isinstance(use_smooth_logic, bool):
        raise ValueError(f"`use_smooth_logic` must be a bool, got use_smooth_logic={use_smooth_logic!r}.")


@dataclass(frozen=True)
class _GCondOptions:
    """The validated options of :func:`gcond`, passed to its helpers."""

    conflict_thresholds: tuple[float, float, float]
    remap_power: float
    dominance_window: int
    tie_breaking_weights: tuple[float, float]
    norm_ema_beta: float
    momentum_beta: float
    projection_max_iters: int | None
    norm_cap: float | None
    use_smooth_logic: bool


def _gcond_worst_pair(gram: list[list[float]], weak: float, floor: float) -> tuple[int, int, float] | None:
    """The pair ``i < j`` with the lowest cosine below ``weak`` (first in index order on ties), or None.

    Gradients with squared norm ``<= floor`` are skipped.
    """
    best: tuple[int, int, float] | None = None
    lowest = weak
    for i in range(len(gram)):
        for j in range(i + 1, len(gram)):
            if gram[i][i] <= floor or gram[j][j] <= floor:
                continue
            cosine = gram[i][j] / math.sqrt(gram[i][i] * gram[j][j])
            if cosine < lowest:
                best, lowest = (i, j, cosine), cosine
    return best


@dataclass
class _Arbiter:
    """What GCond's arbitrator reads: norm EMAs, the winner history, last step's raw gradients."""

    norm_ema: list[float]
    history: list[int]
    window: int
    weights: tuple[float, float]
    cross: Tensor | None  # cross[k, i] = <g_k (raw, this step), prev_i>
    prev_norms: list[float]

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
        return (j, i) if score_j > score_i else (i, j)

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
    floor = 1e-20 * max(max(raw_norms) ** 2, 1e-300)
    weak = options.conflict_thresholds[2]
    for _ in range(options.projection_max_iters or 2 * num_tasks):
        gram = (coeffs @ raw_gram @ coeffs.T).tolist()
        found = _gcond_worst_pair(gram, weak, floor)
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
    * The stochastic mode ("stochastic accumulation": each loss accumulated over its own share of the
      micro-batches) concerns how the per-task gradients are computed, not how they are combined: it is the
      caller's business (the callback's), not this function's. The Lion/LARS update (``use_lion``) needs the
      parameters and is an optimizer, not an aggregation: not implemented.

    Invariant to the order of the tasks up to ties (equal cosines or scores are broken by task index). The
    conflict loop runs on the host on ``(T, T)`` coefficients (:func:`_gcond_coefficients`): one transfer of
    the (float64) Gramian and one combination of the task gradients on the device per step.
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
    blocks = [_gram(g)] if state.prev is None else [_gram(g), _gram(g, state.prev.to(g.device, g.dtype))]
    host = torch.stack(blocks).cpu()
    raw_gram = host[0]
    raw_norms = [math.sqrt(max(x, 0.0)) for x in raw_gram.diagonal().tolist()]
    state.norm_ema = [
        max(norm_ema_beta * ema + (1.0 - norm_ema_beta) * norm, _TINY) for ema, norm in zip(state.norm_ema, raw_norms)
    ]
    arbiter = _Arbiter(
        state.norm_ema, state.history, dominance_window, options.tie_breaking_weights,
        host[1] if state.prev is not None else None, state.prev_norms,
    )
    coeffs = _gcond_coefficients(raw_gram, arbiter, raw_norms, options)
    resolved = _combine(coeffs.sum(dim=0).tolist(), g)
    state.history, state.prev, state.prev_norms = arbiter.history, g.clone(), raw_norms
    state.momentum = _prepare_state_tensor(state.momentum, g, (num_params,), "GCond state `momentum`")
    state.step += 1
    state.momentum.mul_(momentum_beta).add_(resolved, alpha=1.0 - momentum_beta)
    return (state.momentum / (1.0 - momentum_beta**state.step)).to(grads.dtype)


def _prepare_gcond_state(state: GCondState, num_tasks: int, num_params: int) -> None:
    if not state.norm_ema:
        state.norm_ema = [1.0] * num_tasks
    if len(state.norm_ema) != num_tasks or any(h >= num_tasks for h in state.history):
        raise ValueError(
            f"GCond state was built for {len(state.norm_ema)} tasks but `grads` has {num_tasks}; "
            f"start from a fresh state."
        )
    if state.prev is not None and tuple(state.prev.shape) != (num_tasks, num_params):
        raise ValueError(
            f"GCond state `prev` has shape {tuple(state.prev.shape)} but `grads` has shape "
            f"{(num_tasks, num_params)}; start from a fresh state."
        )


def _clone(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().clone()


# --------------------------------------------------------------------------------------------------------
# Aggregator
# --------------------------------------------------------------------------------------------------------

_DEFAULTS: dict[str, dict[str, Any]] = {
    "pcgrad": {"seed": 0},
    "cagrad": {"c": 0.5, "rescale": 1},
    "sam_gs": {"gamma": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8},
    "gcond": {
        "conflict_thresholds": (-0.8, -0.5, 0.0),
        "remap_power": 2.0,
        "dominance_window": 3,
        "tie_breaking_weights": (0.8, 0.2),
        "norm_ema_beta": 0.95,
        "momentum_beta": 0.85,
        "projection_max_iters": None,
        "norm_cap": None,
        "use_smooth_logic": True,
    },
    "sum": {},
    "mean": {},
}


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got seed={seed!r}.")


_CHECKS: dict[str, Callable[..., None]] = {
    "pcgrad": _check_seed,
    "cagrad": check_cagrad_args,
    "sam_gs": check_sam_gs_args,
    "gcond": check_gcond_args,
    "sum": lambda: None,
    "mean": lambda: None,
}


def _step_seed(seed: int, step: int) -> int:
    """PCGrad's per-step generator seed: a function of (seed, step) only, in the range manual_seed accepts."""
    return (seed * 1_000_003 + step) % (1 << 63)


class Aggregator:
    """One gradient-surgery method with its options and state: ``aggregator(grads, step) -> (n,)``.

    Build it with :func:`make_aggregator`. ``step`` is the optimizer step: PCGrad draws its random order
    from ``torch.Generator().manual_seed(seed * 1_000_003 + step)`` (CPU), so every rank, and a run resumed
    at that step, draws the same order; the other methods ignore it (SAM-GS and GCond count their own
    calls). ``state_dict()`` holds everything needed to resume bit for bit (tensors and plain values);
    ``load_state_dict`` restores the method's state (the options stay those given to the constructor).
    """

    def __init__(self, method: str, **options: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got method={method!r}.")
        unknown = sorted(set(options) - set(_DEFAULTS[method]))
        if unknown:
            allowed = tuple(_DEFAULTS[method]) or "none"
            raise ValueError(f"Options {unknown} are not accepted by method={method!r}; it accepts {allowed}.")
        self.method = method
        self.options: dict[str, Any] = {**_DEFAULTS[method], **options}
        _CHECKS[method](**self.options)
        self._sam_gs = SamGsState() if method == "sam_gs" else None
        self._gcond = GCondState() if method == "gcond" else None

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Aggregator({self.method!r}{', ' if opts else ''}{opts})"

    def __call__(self, grads: Tensor, step: int) -> Tensor:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0 (the optimizer step), got step={step!r}.")
        if self.method == "pcgrad":
            generator = torch.Generator().manual_seed(_step_seed(self.options["seed"], step))
            return pcgrad(grads, generator)
        if self.method == "cagrad":
            return cagrad(grads, **self.options)
        if self._sam_gs is not None:
            return sam_gs(grads, self._sam_gs, **self.options)
        if self._gcond is not None:
            return gcond(grads, self._gcond, **self.options)
        return aggregate_sum(grads) if self.method == "sum" else aggregate_mean(grads)

    def reset(self) -> None:
        """Forget the method's state (SAM-GS moments, GCond history and momentum)."""
        self._sam_gs = SamGsState() if self.method == "sam_gs" else None
        self._gcond = GCondState() if self.method == "gcond" else None

    def state_dict(self) -> dict[str, Any]:
        """``{"method", "options", "state"}``; ``state`` is empty for the stateless methods."""
        stateful = self._sam_gs or self._gcond
        return {
            "method": self.method,
            "options": dict(self.options),
            "state": stateful.state_dict() if stateful is not None else {},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` of an aggregator of the same method."""
        if state_dict.get("method") != self.method:
            raise ValueError(
                f"Cannot load the state of method={state_dict.get('method')!r} into an aggregator of "
                f"method={self.method!r}."
            )
        stateful = self._sam_gs or self._gcond
        if stateful is not None:
            stateful.load_state_dict(state_dict["state"])


def make_aggregator(method: str, **options: Any) -> Aggregator:
    """An :class:`Aggregator` for ``method`` (one of :data:`METHODS`) with the given options.

    Options by method (defaults): ``pcgrad``: ``seed=0``; ``cagrad``: ``c=0.5, rescale=1``; ``sam_gs``:
    ``gamma=0.1, beta1=0.9, beta2=0.99, eps=1e-8``; ``gcond``: the keyword arguments of :func:`gcond`;
    ``sum``, ``mean``: none. An unknown method, an option the method does not take, or a value out of range
    raises ``ValueError`` naming it.
    """
    return Aggregator(method, **options)
