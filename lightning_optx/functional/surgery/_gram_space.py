"""Shared Gram-space helpers: input checks, the float64 Gramian, combinations, statistics.

Every method of the package aggregates in the ``T x T`` Gram space: one Gramian of the stacked task
gradients (:func:`gram`, accumulated in float64), the method's logic on ``T x T`` coefficients, and one
combination of the task gradients (:func:`combine`). Only SAM-GS's momentum modulation, element-wise by
definition, works on the ``(T, n)`` gradients themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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


# Entries (tasks x parameters) per block when a block is converted to float64 (bounds the copy to 128 MiB).
_GRAM_BLOCK = 1 << 24
# Parameters per block when a float32 Gramian is formed on the CPU: each block's float32 product is added
# in float64, which bounds the float32 accumulation (about 1e-6 of the norms, typically).
_F32_BLOCK = 1 << 16

# Decisions taken on the Gramian (is a pair in conflict, is a score higher) ignore differences below this,
# relative to the norms, by the precision of the task gradients: the rounding of the Gramian (and of
# everything computed from it) stays far below it, so no decision depends on the direction of rounding.
COSINE_TOL = 1e-9
COSINE_TOL_FLOAT32 = 1e-5


def decision_tolerance(g: Tensor) -> float:
    """:data:`COSINE_TOL` for float64 task gradients, :data:`COSINE_TOL_FLOAT32` for lower precisions."""
    return COSINE_TOL if g.dtype == torch.float64 else COSINE_TOL_FLOAT32


def _float32_products(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _gram(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a @ b.T`` (``b`` defaults to ``a``), returned in float64, block by block over the parameters.

    float64 input, and any input on an accelerator, is multiplied in float64 (never in TF32 or bf16, whatever
    ``torch.backends.*.fp32_precision`` says; blocks bound the temporary float64 copy). float32 input on the
    CPU is multiplied in float32 (4x faster than float64 there, and no copy), block by block with the blocks'
    products summed in float64: relative error about 1e-6 of the norms, below :data:`COSINE_TOL_FLOAT32`.
    """
    other = a if b is None else b
    out = torch.zeros(a.shape[0], other.shape[0], dtype=torch.float64, device=a.device)
    f32 = _float32_products(a, other)
    width = _F32_BLOCK if f32 else max(1, _GRAM_BLOCK // max(a.shape[0], other.shape[0]))
    for start in range(0, a.shape[1], width):
        part_a = a[:, start : start + width]
        part_a = part_a if f32 else part_a.double()
        part_b = part_a if b is None else other[:, start : start + width]
        part_b = part_b if f32 or b is None else part_b.double()
        out += (part_a @ part_b.T).double()
    return out


def _gram_pair(a: Tensor, b: Tensor | None) -> Tensor:
    """``[a a^T | a b^T]`` (``(T, T)``, or ``(T, 2T)`` with ``b``) in float64, as :func:`_gram` computes them,
    reading each block of ``a`` (and converting it, on the float64 path) once."""
    if b is None:
        return _gram(a)
    num = a.shape[0]
    out = torch.zeros(num, 2 * num, dtype=torch.float64, device=a.device)
    f32 = _float32_products(a, b)
    width = _F32_BLOCK if f32 else max(1, _GRAM_BLOCK // num)
    for start in range(0, a.shape[1], width):
        part_a, part_b = a[:, start : start + width], b[:, start : start + width]
        if not f32:
            part_a, part_b = part_a.double(), part_b.double()
        out[:, :num] += (part_a @ part_a.T).double()
        out[:, num:] += (part_a @ part_b.T).double()
    return out


def _combine(weights: Tensor | list[float], g: Tensor) -> Tensor:
    """``sum_i weights[i] g[i]``: ONE matrix-vector product in ``g``'s dtype, on ``g``'s device.

    ``weights`` (``(T,)``, host or device, any float dtype) are rounded to ``g``'s dtype first.
    """
    return torch.as_tensor(weights, dtype=g.dtype).to(g.device) @ g


def gramian(grads: Tensor) -> Tensor:
    """The ``(T, T)`` matrix of inner products ``<g_i, g_j>``, returned in float64 (see :func:`_gram`)."""
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


def _prepare_state_tensor(tensor: Tensor | None, like: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    if tensor is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{what} has shape {tuple(tensor.shape)} but `grads` needs {shape}: the number of tasks or "
            f"parameters changed; start from a fresh state."
        )
    return tensor.to(device=like.device, dtype=like.dtype)


def _clone(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().clone()

