"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"), in the Gram space."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ._gram_space import _combine, _compute, _gram, check_grads

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
        # V diag(inv) V^T v, as two batched products (a 4-operand einsum would search a contraction path per call)
        projected = (eigvecs.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)
        return (eigvecs @ (inv * projected).unsqueeze(-1)).squeeze(-1)

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
    in float64 (never TF32); ``d`` is a combination of the task gradients whose weights come from the Gramian
    alone, formed with one matrix-vector product. The result is on the mean
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
    num_tasks = g.shape[0]
    if c == 0:
        return g.mean(dim=0).to(grads.dtype)
    host = _gram(g).cpu()
    w = cagrad_weights(host, c)
    radius = c * math.sqrt(max(float(host.sum()), 0.0)) / num_tasks  # c ||g0||
    scale = float(host.diagonal().mean())
    if scale > 0 and float(w @ host @ w) <= (_CAGRAD_ZERO_GW**2) * scale:
        direction = _cagrad_cone_step(host)  # g0 + G^T lam, pulled back into the ball if rounding left it
        norm = math.sqrt(max(float(direction @ host @ direction), 0.0))
        factor = radius / norm if norm > radius else 1.0
    else:
        direction = w  # g0 + radius g_w / ||g_w||
        norm = math.sqrt(max(float(w @ host @ w), 0.0))
        factor = radius / norm if norm > 0 else 0.0
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    weights = (torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64) + factor * direction) / divisor
    return _combine(weights, g).to(grads.dtype)
