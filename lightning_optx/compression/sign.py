"""1-bit (scaled sign) compression with error feedback, as in 1-bit SGD / 1-bit Adam."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_optx.compression.base import Compressor, check_inputs, mean_flat_, residual_for, world_size_of
from lightning_optx.distributed import Communicator

__all__ = ["Sign", "pack_bits", "unpack_bits"]


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a flat boolean tensor 8 per byte (first element in the most significant bit), zero-padded.

    Examples:
        >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True]))
        tensor([129, 128], dtype=torch.uint8)
    """
    padded = F.pad(bits.reshape(-1).to(torch.uint8), (0, (-bits.numel()) % 8)).view(-1, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return torch.bitwise_left_shift(padded, shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a boolean tensor.

    Examples:
        >>> unpack_bits(torch.tensor([129, 128], dtype=torch.uint8), 9)
        tensor([ True, False, False, False, False, False, False,  True,  True])
    """
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_right_shift(packed.unsqueeze(1), shifts).bitwise_and_(1)
    return bits.view(-1)[:numel].bool()


class Sign(Compressor):
    """Send one bit per entry, the sign, and one fp32 scale per tensor: ``C(m) = sign(m) * mean(|m|)``.

    Each compressed tensor ``m = tensor + residual`` is encoded as its sign bits (``m >= 0`` is ``+``, so a
    zero is sent as ``+scale``) packed 8 per byte and the scale ``mean(|m|)``. All scales and all bits of a
    call travel in ONE uint8 ``all_gather`` (``4`` bytes per scale, then ``ceil(numel / 8)`` bytes per
    tensor); every rank decodes every rank's ``sign * scale``, sums them in rank order (bit-identical on
    every rank) and divides by the world size. With error feedback the residual is ``m - sign(m) * scale``.

    Raw (exact mean, one flat fp32 all-reduce for all of them): 1-D tensors, and tensors with fewer than
    ``min_numel`` entries: in bytes a 1-bit code pays from 2 entries on, but below a few dozen entries the
    saving is negligible next to the per-message latency while one shared scale is a crude code for them.

    Args:
        error_feedback: keep ``m - C(m)`` and add it to the next input (strongly recommended: scaled sign
            is biased).
        min_numel: tensors with fewer entries than this go raw (``>= 1``; default 64).

    Examples:
        >>> from lightning_optx.distributed import Communicator
        >>> g = torch.tensor([[1.0, -2.0, 3.0, -6.0]] * 16)   # 64 entries, mean |g| = 3
        >>> sign = Sign()
        >>> t = g.clone()
        >>> sign.reduce_([t], ["w"], Communicator())
        >>> t[0]
        tensor([ 3., -3.,  3., -3.])
        >>> sign.residuals["w"][0]
        tensor([-2.,  1.,  0., -3.])
        >>> sign.payload_bytes([g], world_size=2)    # 64 / 8 bytes of signs + a 4-byte scale
        12
    """

    name = "sign"

    def __init__(self, error_feedback: bool = True, min_numel: int = 64) -> None:
        super().__init__(error_feedback=error_feedback)
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 1:
            raise ValueError(f"`min_numel` must be an integer >= 1, got min_numel={min_numel!r}.")
        self.min_numel = min_numel

    @property
    def level(self) -> float:
        """Bits sent per entry relative to fp32: ``1 / 32``."""
        return 1.0 / 32.0

    def _compressible(self, t: Tensor) -> bool:
        return t.dim() >= 2 and t.numel() >= self.min_numel

    def payload_bytes(self, tensors: Sequence[Tensor], world_size: int) -> int:
        """``ceil(numel / 8) + 4`` per compressed tensor plus ``4 numel`` per raw tensor (0 for one process)."""
        if world_size < 2:
            return 0
        return sum(math.ceil(t.numel() / 8) + 4 if self._compressible(t) else 4 * t.numel() for t in tensors)

    def reduce_(self, tensors: Sequence[Tensor], keys: Sequence[Hashable], comm: Communicator,
                tag: str = "grad") -> None:
        """Replace every tensor in place by the mean over ranks of their scaled signs (see the class docstring)."""
        check_inputs(tensors, keys)
        chosen = [i for i, t in enumerate(tensors) if self._compressible(t)]
        picked = set(chosen)
        mean_flat_([t for i, t in enumerate(tensors) if i not in picked], comm, tag)
        if chosen:
            self._sign_mean_([tensors[i] for i in chosen], [keys[i] for i in chosen], comm, tag)

    def _encode(self, t: Tensor, key: Hashable) -> tuple[Tensor, Tensor]:
        """``(scale, packed sign bits)`` of ``m = t + residual``; updates the residual."""
        m = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        m.copy_(t.detach())
        if self.error_feedback:
            m.add_(residual_for(self, key, m))
        scale = m.abs().mean()
        positive = m >= 0
        if self.error_feedback:
            self.residuals[key] = m - _decode(positive, scale)
        return scale.reshape(1), pack_bits(positive)

    def _sign_mean_(self, tensors: list[Tensor], keys: list[Hashable], comm: Communicator, tag: str) -> None:
        encoded = [self._encode(t, k) for t, k in zip(tensors, keys)]
        scales = torch.cat([scale for scale, _ in encoded])
        payload = torch.cat([scales.view(torch.uint8)] + [bits for _, bits in encoded])
        gathered = comm.all_gather(payload, tag=tag)
        sums = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
        for contribution in gathered:  # rank order: the same sums on every rank
            rank_scales = contribution[:4 * len(tensors)].view(torch.float32)
            offset = 4 * len(tensors)
            for i, acc in enumerate(sums):
                nbytes = math.ceil(acc.numel() / 8)
                positive = unpack_bits(contribution[offset:offset + nbytes], acc.numel()).view(acc.shape)
                acc.add_(_decode(positive, rank_scales[i]))
                offset += nbytes
        world = world_size_of(comm)
        for t, acc in zip(tensors, sums):
            t.copy_(acc.div_(world))


def _decode(positive: Tensor, scale: Tensor) -> Tensor:
    """``+scale`` where ``positive``, ``-scale`` elsewhere."""
    return torch.where(positive, scale, -scale)
