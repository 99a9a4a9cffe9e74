"""Small tensor utilities shared by several methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "all_finite", "foreach_norms", "global_norm"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms of ``dtype`` tensors are accumulated in: at least float32, never narrower than ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def foreach_norms(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The ``ord``-norm of each tensor, as one vector in the widest accumulation dtype (fused per dtype).

    fp16/bf16 tensors are accumulated in float32 (their own-dtype sums overflow from 65504 on); float64
    tensors stay float64 (``torch._foreach_norm`` refuses to narrow them).

    Examples:
        >>> foreach_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0], dtype=torch.float64)])
        tensor([5., 1.], dtype=torch.float64)
    """
    tensors = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(accumulation_dtype(t.dtype), []).append(i)
    out_dtype = torch.float32
    for dtype in by_dtype:
        out_dtype = torch.promote_types(out_dtype, dtype)
    norms: list[Tensor] = [torch.empty(0)] * len(tensors)
    for dtype, indices in by_dtype.items():
        for i, n in zip(indices, torch._foreach_norm([tensors[i] for i in indices], ord=ord, dtype=dtype)):
            norms[i] = n.to(out_dtype)
    return torch.stack(norms)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all tensors taken together (fused per dtype, no host sync), accumulated in >= float32.

    float32 accumulation matters for fp16 tensors: their own-dtype norm overflows to inf from 65504 on,
    which would make large but finite fp16 gradients look like an overflow to :func:`all_finite`.
    """
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(foreach_norms(tensors))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one fused pass and one host sync)."""
    return bool(torch.isfinite(global_norm(tensors)))
