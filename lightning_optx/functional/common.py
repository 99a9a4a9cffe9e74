"""Small tensor utilities shared by several methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "global_norm"]


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all tensors taken together (one fused pass, no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(list(tensors))]))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one fused pass and one host sync)."""
    return bool(torch.isfinite(global_norm(tensors)))
