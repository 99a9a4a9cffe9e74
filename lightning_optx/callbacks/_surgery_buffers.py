"""GradientSurgery's buffers: flattening per-task gradients into rows, writing the aggregate back, and the
torch.compile setting a per-task backward needs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import Parameter


def disable_donated_buffers() -> bool:
    """Switch off AOTAutograd's donated buffers; returns the previous value.

    torch.compile donates the saved tensors of a compiled backward it expects to run once; a region whose
    backward is first built by the last task's ``autograd.grad`` (``retain_graph=False``) and later run with
    ``retain_graph=True`` by an earlier task then raises. The flag is read when the backward is compiled and
    again when it runs, so it is switched off for the whole fit.
    """
    import torch._functorch.config as functorch_config

    before = bool(functorch_config.donated_buffer)
    functorch_config.donated_buffer = False
    return before


def restore_donated_buffers(value: bool) -> None:
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = value


def flatten_into(row: Tensor, grads: Sequence[Tensor | None], params: Sequence[Parameter], accumulate: bool) -> None:
    """Write (or add) the flattened ``grads`` into ``row``; a missing gradient is zero."""
    offset = 0
    for g, p in zip(grads, params):
        piece = row[offset : offset + p.numel()]
        if g is not None and accumulate:
            piece.add_(g.reshape(-1))
        elif g is not None:
            piece.copy_(g.reshape(-1))
        elif not accumulate:
            piece.zero_()
        offset += p.numel()


def width_of(params: Sequence[Parameter]) -> int:
    return sum(p.numel() for p in params)


def common_dtype(params: Sequence[Parameter]) -> torch.dtype:
    return functools.reduce(torch.promote_types, [p.dtype for p in params])


def unflatten_into_grads(flat: Tensor, params: Sequence[Parameter], reached: set[int]) -> None:
    """Write ``flat`` (a fresh tensor nobody else holds) into the ``.grad`` of the ``reached`` parameters: a
    missing ``.grad`` becomes a view of it (no copy, as DDP's ``gradient_as_bucket_view``), an existing one is
    overwritten. The others' ``.grad`` is left alone."""
    offset = 0
    for p in params:
        if id(p) not in reached:
            offset += p.numel()
            continue
        piece = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece
        else:
            p.grad.copy_(piece)
        offset += p.numel()
