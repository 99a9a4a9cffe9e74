"""Error-feedback signSGD: 1-bit scaled-sign compression with error feedback (Seide et al.; Karimireddy et al.),
averaged with a two-stage compressed all-reduce (:mod:`lightning_optx.compression.two_stage`)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from torch import Tensor

from lightning_optx.compression.base import Compressor, check_inputs, clone_state, mean_flat_, residual_for
from lightning_optx.compression.two_stage import (
    pack_bits,
    server_residual_for,
    sign_two_stage_,
    sign_two_stage_bytes,
    sign_two_stage_wire_bytes,
    unpack_bits,
)
from lightning_optx.distributed import Communicator, wire_bytes

__all__ = ["Sign", "pack_bits", "unpack_bits"]


class Sign(Compressor):
    """Send one bit per entry, the sign, and one fp32 scale per tensor: ``C(m) = sign(m) * mean(|m|)``.

    Error-feedback signSGD (not 1-bit Adam, which applies the same code to Adam's momentum). Each
    compressed tensor ``m = tensor + residual`` is encoded as its sign bits (``m >= 0`` is ``+``, so a zero
    is sent as ``+scale``) and the scale ``mean(|m|)``; with error feedback the residual is ``m - C(m)``.
    The ranks' codes are averaged by a two-stage compressed all-reduce
    (:func:`~lightning_optx.compression.two_stage.sign_two_stage_`): rank ``j`` receives chunk ``j`` of every
    rank's bits (one ``all_to_all``) and the scales (one ``all_gather``), averages its chunk in rank order,
    adds its *server* residual, compresses that average again with its own scale (the server residual keeps
    ``average - C(average)``) and the compressed chunks are all-gathered, so the result is bit-identical on
    every rank and each rank sends and receives about ``2 (n-1)/n`` bits per entry whatever the number of
    ranks ``n``. Worker residuals (``residuals``) and server residuals (``server_residuals``, this rank's
    chunk, so their shape depends on the world size) are per-rank state.

    Raw (exact mean, one flat fp32 all-reduce for all of them): 1-D tensors, and tensors with fewer than
    ``min_numel`` entries: in bytes a 1-bit code pays from 2 entries on, but below a few dozen entries the
    saving is negligible next to the per-message latency while one shared scale is a crude code for them.

    Args:
        error_feedback: keep ``m - C(m)`` and add it to the next input (strongly recommended: scaled sign
            is biased).
        min_numel: tensors with fewer entries than this go raw (``>= 1``; default 64).

    Examples:
        >>> import torch
        >>> from lightning_optx.distributed import Communicator
        >>> g = torch.tensor([[1.0, -2.0, 3.0, -6.0]] * 16)   # 64 entries, mean |g| = 3
        >>> sign = Sign()
        >>> t = g.clone()
        >>> sign.reduce_([t], ["w"], Communicator())
        >>> t[0]
        tensor([ 3., -3.,  3., -3.])
        >>> sign.residuals["w"][0]
        tensor([-2.,  1.,  0., -3.])
        >>> sign.payload_bytes([g], world_size=2)    # 2 x 4 bytes of signs out, a scale, 4 bytes + a scale back
        20
    """

    name = "sign"

    def __init__(self, error_feedback: bool = True, min_numel: int = 64) -> None:
        super().__init__(error_feedback=error_feedback)
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 1:
            raise ValueError(f"`min_numel` must be an integer >= 1, got min_numel={min_numel!r}.")
        self.min_numel = min_numel
        self.server_residuals: dict[Hashable, Tensor] = {}

    @property
    def level(self) -> float:
        """Bits sent per entry relative to fp32: ``1 / 32``."""
        return 1.0 / 32.0

    def _compressible(self, t: Tensor) -> bool:
        return t.dim() >= 2 and t.numel() >= self.min_numel

    def payload_bytes(self, tensors: Sequence[Tensor], world_size: int) -> int:
        """``4 numel`` per raw tensor plus the two stages' bytes (0 for one process).

        Two stages: an ``all_to_all`` of ``n * chunk`` bytes (``chunk = ceil(numel / 8n)`` rounded up, per
        tensor), an ``all_gather`` of the ``4``-byte worker scales and one of the server's scales and chunk.
        """
        if world_size < 2:
            return 0
        raw = sum(4 * t.numel() for t in tensors if not self._compressible(t))
        numels = [t.numel() for t in tensors if self._compressible(t)]
        return raw + (sign_two_stage_bytes(numels, world_size) if numels else 0)

    def wire_bytes(self, tensors: Sequence[Tensor], world_size: int) -> float:
        """Bytes one rank sends plus receives: about ``2 (n-1)/n`` bits per compressed entry each way."""
        if world_size < 2:
            return 0.0
        raw = sum(4 * t.numel() for t in tensors if not self._compressible(t))
        numels = [t.numel() for t in tensors if self._compressible(t)]
        return wire_bytes("all_reduce", raw, world_size) + (sign_two_stage_wire_bytes(numels, world_size)
                                                            if numels else 0)

    def reduce_(self, tensors: Sequence[Tensor], keys: Sequence[Hashable], comm: Communicator,
                tag: str = "grad") -> None:
        """Replace every tensor in place by the two-stage mean of the ranks' scaled signs (see the class docstring)."""
        check_inputs(tensors, keys)
        chosen = [i for i, t in enumerate(tensors) if self._compressible(t)]
        picked = set(chosen)
        mean_flat_([t for i, t in enumerate(tensors) if i not in picked], comm, tag)
        if chosen:
            sign_two_stage_([tensors[i] for i in chosen], [keys[i] for i in chosen], comm, tag,
                            worker_residual=self._worker_residual, server_residual=self._server_residual)

    def _worker_residual(self, key: Hashable, m: Tensor) -> Tensor | None:
        return residual_for(self, key, m) if self.error_feedback else None

    def _server_residual(self, key: Hashable, chunk: Tensor) -> Tensor | None:
        return server_residual_for(self.server_residuals, key, chunk) if self.error_feedback else None

    def state_dict(self) -> dict[str, Any]:
        """Iteration, worker residuals and this rank's server residuals."""
        state = super().state_dict()
        state["server_residuals"] = clone_state(self.server_residuals)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.server_residuals = clone_state(state.get("server_residuals", {}))
