"""Gradient compressors with error feedback, shared by compressed DDP and DiLoCo.

Every compressor averages a list of named tensors across ranks in place through a compressed
representation (see :class:`~lightning_optx.compression.base.Compressor`):

=============  ===========================================  ==============================================
name           compressor                                   payload per compressed tensor (collective)
=============  ===========================================  ==============================================
``powersgd``   :class:`PowerSGD` (rank-r power iteration)   ``4 (n + m) r`` (all-reduce)
``topk``       :class:`TopK` (DGC sparsification)           about ``8 k``, ``k = ceil(density numel)``,
                                                            out and back (two-stage)
``sign``       :class:`Sign` (error-feedback signSGD)       about ``numel / 8``, out and back (two-stage)
``fp16``       :class:`Cast` with ``torch.float16``         ``2 numel`` (all-reduce)
``bf16``       :class:`Cast` with ``torch.bfloat16``        ``2 numel`` (all-reduce)
=============  ===========================================  ==============================================

Two-stage: :mod:`lightning_optx.compression.two_stage`, whose bytes per rank do not grow with the number of
ranks. ``Compressor.wire_bytes`` gives the bytes one rank sends plus receives.

Examples:
    >>> from lightning_optx.compression import get_compressor
    >>> get_compressor("topk", density=0.1).level
    0.1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_optx.compression.base import Compressor, residual_for
from lightning_optx.compression.cast import Cast
from lightning_optx.compression.powersgd import PowerSGD
from lightning_optx.compression.sign import Sign
from lightning_optx.compression.topk import TopK

__all__ = ["COMPRESSORS", "Cast", "Compressor", "PowerSGD", "Sign", "TopK", "get_compressor", "residual_for"]


def _fp16(**options: Any) -> Compressor:
    return Cast(dtype=torch.float16, **options)


def _bf16(**options: Any) -> Compressor:
    return Cast(dtype=torch.bfloat16, **options)


COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "powersgd": PowerSGD,
    "topk": TopK,
    "sign": Sign,
    "fp16": _fp16,
    "bf16": _bf16,
}


def get_compressor(name: str, **options: Any) -> Compressor:
    """Build a compressor by name (case-insensitive), passing ``options`` to its constructor.

    Args:
        name: one of ``"powersgd"``, ``"topk"``, ``"sign"``, ``"fp16"``, ``"bf16"``.
        **options: constructor arguments, e.g. ``rank=2`` for ``"powersgd"``.

    Raises:
        ValueError: for an unknown name.

    Examples:
        >>> get_compressor("powersgd", rank=2).rank
        2
        >>> get_compressor("bf16").dtype
        torch.bfloat16
    """
    factory = COMPRESSORS.get(name.lower()) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"`name` must be one of {sorted(COMPRESSORS)}, got name={name!r}.")
    return factory(**options)
