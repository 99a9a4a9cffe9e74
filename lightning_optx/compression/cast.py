"""Half-precision all-reduce: cast to fp16 or bf16 for the wire, like torch's ``fp16_compress_hook``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from lightning_optx.compression.base import Compressor, check_inputs, residual_for, world_size_of
from lightning_optx.distributed import Communicator

__all__ = ["Cast"]

_DTYPES = (torch.float16, torch.bfloat16)


class Cast(Compressor):
    """All-reduce in half precision: ``mean = cast_back(sum_i cast(m_i / world))``, 2 bytes per entry.

    Every tensor (biases included: casting always halves the bytes and costs no computation) is divided by
    the world size in fp32 *before* the cast, so the sum cannot overflow fp16 unless the mean itself does
    (an overflow gives ``inf``, which an AMP grad scaler detects). All tensors travel in ONE flat all-reduce
    in ``dtype``; the sum over ranks is accumulated in ``dtype`` by the backend.

    With error feedback, ``e <- m - world * cast(m / world)`` (this rank's own rounding error, computed in
    fp32). The rounding of the half-precision *sum* is not captured by any rank, so error
    feedback conserves the total only up to that rounding when several ranks take part.

    Args:
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        error_feedback: keep each rank's rounding error and add it to the next input.

    Examples:
        >>> from lightning_optx.distributed import Communicator
        >>> t = torch.tensor([1.0 + 2**-12, 3.0])
        >>> Cast(torch.float16).reduce_([t], ["w"], Communicator())   # rounded to fp16 even on one process
        >>> t
        tensor([1., 3.])
        >>> Cast(torch.bfloat16).payload_bytes([t], world_size=2)
        4
    """

    name = "cast"

    def __init__(self, dtype: torch.dtype = torch.float16, error_feedback: bool = False) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be torch.float16 or torch.bfloat16, got dtype={dtype!r}.")
        super().__init__(error_feedback=error_feedback)
        self.dtype = dtype

    @property
    def level(self) -> float:
        """Bits sent per entry relative to fp32: ``0.5``."""
        return 0.5

    def payload_bytes(self, tensors: Sequence[Tensor], world_size: int) -> int:
        """``2 * numel`` (0 for one process)."""
        return 0 if world_size < 2 else 2 * sum(t.numel() for t in tensors)

    def reduce_(self, tensors: Sequence[Tensor], keys: Sequence[Hashable], comm: Communicator,
                tag: str = "grad") -> None:
        """Replace every tensor in place by the half-precision mean over ranks (see the class docstring)."""
        check_inputs(tensors, keys)
        if sum(t.numel() for t in tensors) == 0:
            return
        world = world_size_of(comm)
        wire = torch.cat([self._encode(t, k, world) for t, k in zip(tensors, keys)])
        comm.all_reduce_(wire, op="sum", tag=tag)
        offset = 0
        for t in tensors:
            t.copy_(wire[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()

    def _encode(self, t: Tensor, key: Hashable, world: int) -> Tensor:
        """This rank's flat half-precision share ``cast(m / world)``; updates the residual."""
        m = t.detach().to(torch.float32)
        if self.error_feedback:
            m = m + residual_for(self, key, m)
        share = (m / world).to(self.dtype)
        if self.error_feedback:
            self.residuals[key] = m - share.to(torch.float32) * world
        return share.reshape(-1)
