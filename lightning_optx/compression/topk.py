"""Top-k sparsification with error feedback and DGC momentum correction (Lin et al., 2018)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_optx.compression.base import (
    Compressor,
    check_inputs,
    clone_state,
    mean_flat_,
    residual_for,
)
from lightning_optx.compression.two_stage import (
    server_residual_for,
    topk_two_stage_,
    topk_two_stage_bytes,
    topk_two_stage_wire_bytes,
)
from lightning_optx.distributed import Communicator, wire_bytes

__all__ = ["TopK"]

_MAX_INDEX = 2**31 - 1  # indices travel as int32


class TopK(Compressor):
    """Send only the ``k`` largest-magnitude entries of each tensor (Deep Gradient Compression style).

    For each compressed tensor about ``k = max(1, ceil(density * numel))`` entries of largest ``|m|`` are
    sent (``m = tensor + residual``), through a two-stage sparse all-reduce
    (:func:`~lightning_optx.compression.two_stage.topk_two_stage_`) whose bytes per rank do not grow with the
    number of ranks ``n``: the tensor is split into ``n`` chunks, each rank sends the ``ceil(k / n)`` largest
    entries of chunk ``j`` as ``(value fp32, index int32)`` pairs to rank ``j`` (one ``all_to_all``); rank
    ``j`` sums them in rank order, divides by ``n``, adds its *server* residual and keeps the ``ceil(k / n)``
    largest (the server residual keeps the rest), and those pairs are all-gathered, so the result is
    bit-identical everywhere. With one process this is the plain top-k of ``m``. With error feedback the
    worker residual keeps the entries that were not sent. A tensor goes raw (exact mean, one flat fp32 all-reduce
    for all of them) when it is 1-D or when the sparse payload is not smaller (``8 k >= 4 numel``).

    ``momentum_correction=mu`` enables DGC's momentum correction and momentum factor masking: per tensor a
    velocity ``u <- mu * u + g`` and an accumulator ``v <- v + u`` (the residual) are kept, the top-k of
    ``v`` are sent and the selected entries of both ``u`` and ``v`` are zeroed. The momentum then lives in
    the compressor, so **the optimizer must not have momentum** (use plain SGD). Raw tensors get the same
    velocity without masking (their mean is momentum SGD on the mean gradient), matching DGC's reference
    implementation where uncompressed tensors keep ordinary momentum. Requires ``error_feedback=True``.

    Args:
        density: fraction of entries sent, in ``(0, 1]`` (``level``; may be changed between calls).
        error_feedback: keep the unsent entries and add them to the next input.
        momentum_correction: DGC momentum ``mu`` in ``[0, 1)``, or ``None`` for plain top-k.

    Examples:
        >>> from lightning_optx.distributed import Communicator
        >>> g = torch.tensor([[0.1, -3.0, 0.2, 0.0], [2.0, 0.0, -0.5, 0.3]])
        >>> topk = TopK(density=0.25)          # k = 2 of 8 entries
        >>> t = g.clone()
        >>> topk.reduce_([t], ["w"], Communicator())
        >>> t
        tensor([[ 0., -3.,  0.,  0.],
                [ 2.,  0.,  0.,  0.]])
        >>> topk.residuals["w"]
        tensor([[ 0.1000,  0.0000,  0.2000,  0.0000],
                [ 0.0000,  0.0000, -0.5000,  0.3000]])
        >>> topk.payload_bytes([g], world_size=2)     # 1 pair per chunk: 2 x 8 bytes out, 8 bytes back
        24
    """

    name = "topk"

    def __init__(self, density: float = 0.01, error_feedback: bool = True,
                 momentum_correction: float | None = None) -> None:
        super().__init__(error_feedback=error_feedback)
        self.density = density
        if momentum_correction is not None:
            if not 0 <= momentum_correction < 1:
                raise ValueError(
                    f"`momentum_correction` must be None or in [0, 1), got momentum_correction={momentum_correction!r}."
                )
            if not error_feedback:
                raise ValueError(
                    "`momentum_correction` needs `error_feedback=True` (the accumulator is the residual), got "
                    f"momentum_correction={momentum_correction!r} with error_feedback=False."
                )
        self.momentum_correction = None if momentum_correction is None else float(momentum_correction)
        self.velocities: dict[Hashable, Tensor] = {}
        self.server_residuals: dict[Hashable, Tensor] = {}

    @property
    def density(self) -> float:
        """Fraction of entries sent."""
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"`density` must be in (0, 1], got density={value!r}.")
        self._density = float(value)

    @property
    def level(self) -> float:
        """The density."""
        return self._density

    # ------------------------------------------------------------------ planning

    def k_for(self, numel: int) -> int:
        """``max(1, ceil(density * numel))`` (rounded to 9 decimals first, so ``0.07 * 100`` gives 7)."""
        return max(1, math.ceil(round(self._density * numel, 9)))

    def _compressible(self, t: Tensor) -> bool:
        return t.dim() >= 2 and 8 * self.k_for(t.numel()) < 4 * t.numel()

    def payload_bytes(self, tensors: Sequence[Tensor], world_size: int) -> int:
        """``4 numel`` per raw tensor plus, per compressed tensor, ``8 (n + 1) ceil(k / n)``: the all-to-all
        of every chunk's pairs and the all-gather of this rank's server pairs (0 for one process)."""
        if world_size < 2:
            return 0
        raw = sum(4 * t.numel() for t in tensors if not self._compressible(t))
        chosen = [t.numel() for t in tensors if self._compressible(t)]
        return raw + topk_two_stage_bytes(chosen, [self.k_for(n) for n in chosen], world_size)

    def wire_bytes(self, tensors: Sequence[Tensor], world_size: int) -> float:
        """Bytes one rank sends plus receives: about ``4 (n-1)/n * 8 k`` per compressed tensor."""
        if world_size < 2:
            return 0.0
        raw = sum(4 * t.numel() for t in tensors if not self._compressible(t))
        chosen = [t.numel() for t in tensors if self._compressible(t)]
        return wire_bytes("all_reduce", raw, world_size) + topk_two_stage_wire_bytes(
            chosen, [self.k_for(n) for n in chosen], world_size)

    # ------------------------------------------------------------------ reduction

    def reduce_(self, tensors: Sequence[Tensor], keys: Sequence[Hashable], comm: Communicator,
                tag: str = "grad") -> None:
        """Replace every tensor in place by the mean over ranks of their top-k (see the class docstring)."""
        check_inputs(tensors, keys)
        chosen = [i for i, t in enumerate(tensors) if self._compressible(t)]
        raw = sorted(set(range(len(tensors))) - set(chosen))
        sources = None
        if self.momentum_correction is not None:  # raw tensors get plain (unmasked) momentum
            sources = [self._velocity(tensors[i], keys[i]) for i in raw]
        mean_flat_([tensors[i] for i in raw], comm, tag, sources=sources)
        if chosen:
            self._sparse_mean_([tensors[i] for i in chosen], [keys[i] for i in chosen], comm, tag)

    def _velocity(self, t: Tensor, key: Hashable) -> Tensor:
        """DGC velocity ``u <- mu * u + g`` (fp32, shaped like ``t``), stored under ``key``."""
        u = self.velocities.get(key)
        if u is None or u.shape != t.shape:
            u = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        u = u.to(t.device).mul_(self.momentum_correction or 0.0).add_(t.detach())
        self.velocities[key] = u
        return u

    def _worker_input(self, t: Tensor, key: Hashable) -> Tensor:
        """``m``: the error-compensated fp32 input of ``t`` (with DGC, the accumulator ``v + u``)."""
        if t.numel() > _MAX_INDEX:
            raise ValueError(f"TopK indexes with int32: tensor {key!r} has {t.numel()} > 2**31 - 1 entries.")
        if self.momentum_correction is not None:
            u = self._velocity(t, key)
            return residual_for(self, key, u).add_(u)
        m = t.detach().to(torch.float32, copy=True)
        if self.error_feedback:
            m.add_(residual_for(self, key, m))
        return m

    def _on_selected(self, key: Hashable, padded: Tensor, idx: Tensor) -> None:
        """The worker stage sent ``padded[idx]``: the residual keeps the rest; DGC masks the velocity there."""
        numel = self.residuals[key].numel() if key in self.residuals else 0
        if self.error_feedback:
            kept = padded.clone().index_fill_(0, idx, 0.0)[:numel]
            self.residuals[key] = kept.view(self.residuals[key].shape)
        if self.momentum_correction is not None:
            velocity = self.velocities[key].view(-1)
            velocity.index_fill_(0, idx[idx < velocity.numel()], 0.0)

    def _server_residual(self, key: Hashable, chunk: Tensor) -> Tensor | None:
        return server_residual_for(self.server_residuals, key, chunk) if self.error_feedback else None

    def _sparse_mean_(self, tensors: list[Tensor], keys: list[Hashable], comm: Communicator, tag: str) -> None:
        inputs = [self._worker_input(t, k) for t, k in zip(tensors, keys)]
        if self.error_feedback:
            for m, k in zip(inputs, keys):
                self.residuals[k] = m  # _on_selected reads its shape, then replaces it
        topk_two_stage_(tensors, [m.reshape(-1) for m in inputs], keys, [self.k_for(t.numel()) for t in tensors],
                        comm, tag, on_selected=self._on_selected, server_residual=self._server_residual)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Iteration, residuals (the DGC accumulators) and, with momentum correction, the velocities."""
        state = super().state_dict()
        state["velocities"] = clone_state(self.velocities)
        state["server_residuals"] = clone_state(self.server_residuals)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.velocities = clone_state(state.get("velocities", {}))
        self.server_residuals = clone_state(state.get("server_residuals", {}))
