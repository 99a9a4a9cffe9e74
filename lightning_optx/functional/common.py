"""Small tensor utilities shared by several methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "global_norm"]


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all tensors taken together (one fused pass, no host sync), accumulated in float32.

    float32 accumulation matters for fp16 tensors: their own-dtype norm overflows to inf from 65504 on,
    which would make large but finite fp16 gradients look like an overflow to :func:`all_finite`.
    """
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(list(torch._foreach_norm(list(tensors), dtype=torch.float32))))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one fused pass and one host sync)."""
    return bool(torch.isfinite(global_norm(tensors)))
