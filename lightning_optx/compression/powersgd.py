"""PowerSGD (Vogels et al., 2019): rank-``r`` gradient compression by one step of power iteration.

This is PyTorch's ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` re-expressed on a list of
named tensors instead of a DDP bucket, step for step (same matrix view, same compress rule, same random Q
initialisation, same orthogonalisation, same collectives), so that state is keyed by parameter name and
the same compressor serves compressed DDP and DiLoCo. The differences are listed in :class:`PowerSGD`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_optx.compression.base import (
    Compressor,
    check_inputs,
    clone_state,
    mean_flat_,
    residual_for,
)
from lightning_optx.distributed import Communicator

__all__ = ["PowerSGD", "orthogonalize_", "should_compress"]

_SEED_BOUND = 1_000_000_000  # torch's hook draws each Q seed as ``rng.randint(1_000_000_000)``


def should_compress(num_rows: int, num_cols: int, rank: int, min_compression_rate: float) -> bool:
    """PyTorch's rule: compress an ``n x m`` matrix iff ``(n + m) * r * min_compression_rate < n * m``.

    Examples:
        >>> should_compress(32, 16, rank=2, min_compression_rate=2.0)   # 192 < 512
        True
        >>> should_compress(8, 4, rank=4, min_compression_rate=2.0)     # r = min(8, 4, 4) = 4: 96 >= 32
        False
    """
    r = min(num_rows, num_cols, rank)
    return (num_rows + num_cols) * r * min_compression_rate < num_rows * num_cols


def orthogonalize_(matrices: Tensor, epsilon: float = 0.0) -> None:
    """Orthonormalise the columns of each matrix of a ``(batch, rows, cols)`` stack in place, as torch does.

    Gram-Schmidt for ``cols <= 2`` or half precision, Householder QR (``torch.linalg.qr``) otherwise; with
    ``epsilon > 0`` Gram-Schmidt divides by ``norm + epsilon``. One deliberate difference from torch: with
    ``epsilon == 0`` an all-zero column stays zero instead of becoming NaN (torch's intended behaviour, which
    its ``try/except ZeroDivisionError`` never triggers for tensors); every other column is bit-identical.

    Examples:
        >>> m = torch.tensor([[[3.0, 1.0], [4.0, 2.0]]])
        >>> orthogonalize_(m)
        >>> torch.allclose(m[0].T @ m[0], torch.eye(2), atol=1e-6)
        True
    """
    if matrices.dim() != 3 or matrices.shape[2] > matrices.shape[1]:
        raise ValueError(f"expected a (batch, rows, cols) stack with cols <= rows, got shape {tuple(matrices.shape)}")
    if matrices.shape[2] <= 2 or matrices.dtype in (torch.float16, torch.bfloat16):
        _gram_schmidt_(matrices, epsilon)
    else:
        q, _ = torch.linalg.qr(matrices)
        matrices.copy_(q)


def _gram_schmidt_(matrices: Tensor, epsilon: float) -> None:
    num_cols = matrices.shape[2]
    for i in range(num_cols):
        col = matrices[:, :, i:i + 1]
        norm = torch.norm(col, dim=1, keepdim=True)
        if epsilon == 0:
            col /= norm.masked_fill(norm == 0, 1.0)
        else:
            col /= norm + epsilon
        if i + 1 < num_cols:
            rest = matrices[:, :, i + 1:]
            rest -= torch.sum(col * rest, dim=1, keepdim=True) * col


class PowerSGD(Compressor):
    """Low-rank compression by power iteration, with error feedback and warm start (PyTorch's PowerSGD hook).

    Every tensor is viewed as the matrix ``(shape[0], -1)``; with ``r = min(n, m, rank)`` it is compressed iff
    ``(n + m) * r * min_compression_rate < n * m`` and it is not 1-D. Uncompressed tensors are averaged
    exactly in one flat fp32 all-reduce. For each compressed tensor, ``M = tensor (+ error)``; ``Q`` is the
    warm-started previous ``Q`` or a fresh Gaussian, orthogonalised; ``P = M Q`` (all ``P`` s summed in one
    flat all-reduce), ``P`` orthogonalised, ``Q = M^T P`` (all ``Q`` s averaged in one flat all-reduce), and
    the tensor becomes ``P Q^T``; the error kept is ``M - P Q^T`` (the averaged approximation, as torch).
    For the first ``start_iter`` iterations (see :meth:`end_iteration`) it does a plain all-reduce mean.

    Fresh ``Q`` s: when a call needs any, one seed ``np.random.RandomState(seed).randint(1_000_000_000)``
    is drawn and every needed ``Q`` is drawn in order from a CPU ``torch.Generator`` seeded with it (the same
    numbers as torch's ``fork_rng`` + ``manual_seed``), then moved to the tensor's device.

    Args:
        rank: the approximation rank ``r >= 1`` (``level``); can be changed between calls (``Q`` s of the old
            rank are then drawn afresh).
        start_iter: number of initial iterations reduced with a plain all-reduce mean, ``>= 0``.
        warm_start: reuse each tensor's last ``Q`` instead of drawing a new one every call.
        min_compression_rate: ``> 0``; a tensor is compressed only if it shrinks by at least this factor.
        error_feedback: add the previous compression error to the input.
        orthogonalization_epsilon: ``>= 0``, added to the column norms in Gram-Schmidt.
        seed: seed of the generator that draws the ``Q`` seeds; identical on every rank.

    Differences from ``powerSGD_hook`` (all outside the common path, which is reproduced bit for bit; see
    ``tests/compression/test_powersgd.py``):

    - state is per tensor (keyed by name), not per DDP bucket; one seed is drawn per call that needs fresh
      ``Q`` s (torch: per bucket, also when the bucket has no compressed tensor);
    - 1-D tensors are never compressed (torch compresses them when ``min_compression_rate < 1``);
    - error feedback covers the compressed tensors only. Torch adds the error to the whole bucket, so for an
      uncompressed tensor it keeps ``m_i - mean(m)``: zero on average over ranks, it changes the result
      only by rounding, while it random-walks in size; here those tensors are averaged exactly, with no
      residual;
    - everything is computed and communicated in fp32 (torch: in the bucket's dtype), so half precision
      inputs use QR for ``r > 2``;
    - an all-zero column is orthogonalised to zero, not NaN (see :func:`orthogonalize_`);
    - ``start_iter`` may be 0 or 1 (torch requires ``> 1`` with error feedback or warm start only because
      DDP rebuilds its buckets after the first iteration; keys make that irrelevant here).

    Examples:
        >>> from lightning_optx.distributed import Communicator
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> grad = torch.randn(64, 32) + 1.0
        >>> psgd = PowerSGD(rank=2)
        >>> t = grad.clone()
        >>> psgd.reduce_([t], ["layer.weight"], Communicator())   # one process: compression, no traffic
        >>> torch.linalg.matrix_rank(t).item()
        2
        >>> torch.allclose(t + psgd.residuals["layer.weight"], grad, atol=1e-5)   # error feedback
        True
        >>> psgd.payload_bytes([grad], world_size=2)    # 4 bytes * (64 * 2 + 32 * 2)
        768
    """

    name = "powersgd"

    def __init__(
        self,
        rank: int = 4,
        start_iter: int = 0,
        warm_start: bool = True,
        min_compression_rate: float = 2.0,
        error_feedback: bool = True,
        orthogonalization_epsilon: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(error_feedback=error_feedback)
        self.rank = rank
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"`start_iter` must be an integer >= 0, got start_iter={start_iter!r}.")
        if not min_compression_rate > 0:
            raise ValueError(f"`min_compression_rate` must be > 0, got min_compression_rate={min_compression_rate!r}.")
        if not orthogonalization_epsilon >= 0:
            raise ValueError(
                "`orthogonalization_epsilon` must be >= 0, "
                f"got orthogonalization_epsilon={orthogonalization_epsilon!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"`seed` must be an integer in [0, 2**32), got seed={seed!r}.")
        self.start_iter = start_iter
        self.warm_start = bool(warm_start)
        self.min_compression_rate = float(min_compression_rate)
        self.orthogonalization_epsilon = float(orthogonalization_epsilon)
        self.seed = seed
        self.q_memories: dict[Hashable, Tensor] = {}
        self._rng = np.random.RandomState(seed)

    @property
    def rank(self) -> int:
        """The approximation rank."""
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`rank` must be an integer >= 1, got rank={value!r}.")
        self._rank = value

    @property
    def level(self) -> float:
        """The approximation rank, as a float."""
        return float(self._rank)

    # ------------------------------------------------------------------ planning

    def _shape(self, t: Tensor) -> tuple[int, int, int]:
        """``(n, m, r)`` of ``t`` viewed as a matrix."""
        n = t.shape[0] if t.dim() > 0 else 1
        m = t.numel() // n if n else 0
        return n, m, min(n, m, self._rank)

    def _compressible(self, t: Tensor) -> bool:
        n, m, _ = self._shape(t)
        return t.dim() >= 2 and should_compress(n, m, self._rank, self.min_compression_rate)

    def _compressing(self) -> bool:
        return self.iteration >= self.start_iter

    def payload_bytes(self, tensors: Sequence[Tensor], world_size: int) -> int:
        """``4 * (sum of P sizes + sum of Q sizes + uncompressed numel)``; ``4 * numel`` before ``start_iter``."""
        if world_size < 2:
            return 0
        if not self._compressing():
            return 4 * sum(t.numel() for t in tensors)
        total = 0
        for t in tensors:
            n, m, r = self._shape(t)
            total += (n + m) * r if self._compressible(t) else t.numel()
        return 4 * total

    # ------------------------------------------------------------------ reduction

    def reduce_(self, tensors: Sequence[Tensor], keys: Sequence[Hashable], comm: Communicator,
                tag: str = "grad") -> None:
        """Replace every tensor in place by its PowerSGD mean over the ranks (see the class docstring)."""
        check_inputs(tensors, keys)
        if not self._compressing():
            mean_flat_(tensors, comm, tag, divide_first=True)  # as torch's vanilla allreduce
            return
        compressed = [i for i, t in enumerate(tensors) if self._compressible(t)]
        chosen = set(compressed)
        mean_flat_([t for i, t in enumerate(tensors) if i not in chosen], comm, tag)
        if compressed:
            self._compress_([tensors[i] for i in compressed], [keys[i] for i in compressed], comm, tag)

    def _compress_(self, tensors: list[Tensor], keys: list[Hashable], comm: Communicator, tag: str) -> None:
        device = tensors[0].device
        shapes = [self._shape(t) for t in tensors]
        mats = [self._compensated(t, k, n, m) for t, k, (n, m, _) in zip(tensors, keys, shapes)]
        p_flat = torch.empty(sum(n * r for n, _, r in shapes), device=device, dtype=torch.float32)
        q_flat = torch.empty(sum(m * r for _, m, r in shapes), device=device, dtype=torch.float32)
        ps = _views(p_flat, [(n, r) for n, _, r in shapes])
        qs = _views(q_flat, [(m, r) for _, m, r in shapes])
        self._init_qs(qs, keys)

        for mat, q, p in zip(mats, qs, ps):
            torch.bmm(mat, q, out=p)
        comm.all_reduce_(p_flat, op="sum", tag=tag)  # no division: P is orthogonalised next
        for p in ps:
            orthogonalize_(p, self.orthogonalization_epsilon)
        for mat, p, q in zip(mats, ps, qs):
            torch.bmm(mat.transpose(1, 2), p, out=q)
        comm.all_reduce_(q_flat, op="mean", tag=tag)

        for t, k, mat, p, q in zip(tensors, keys, mats, ps, qs):
            approx = torch.bmm(p, q.transpose(1, 2))
            t.copy_(approx.view(t.shape))
            if self.error_feedback:
                self.residuals[k] = (mat - approx).view(t.shape)
            if self.warm_start:
                self.q_memories[k] = q[0].clone()
        if not self.warm_start:
            self.q_memories.clear()

    def _compensated(self, t: Tensor, key: Hashable, n: int, m: int) -> Tensor:
        """``M = tensor + error`` as a fresh fp32 ``(1, n, m)`` stack."""
        mat = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        mat.copy_(t.detach())
        if self.error_feedback:
            mat.add_(residual_for(self, key, mat))
        return mat.view(1, n, m)

    def _init_qs(self, qs: list[Tensor], keys: list[Hashable]) -> None:
        """Fill every ``Q``: the orthogonalised warm-start memory, else a fresh Gaussian, orthogonalised."""
        fresh = []
        for q, k in zip(qs, keys):
            memory = self.q_memories.get(k) if self.warm_start else None
            if memory is not None and memory.shape == q.shape[1:]:
                q.copy_(memory.view_as(q))
                orthogonalize_(q, self.orthogonalization_epsilon)
            else:
                fresh.append(q)
        if not fresh:
            return
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(self._rng.randint(_SEED_BOUND)))
        for q in fresh:
            q.copy_(torch.randn(*q.shape, generator=generator, dtype=torch.float32, device="cpu"))  # host RNG
            orthogonalize_(q, self.orthogonalization_epsilon)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Iteration, residuals, ``Q`` memories and the seed generator's state (tensors and python scalars)."""
        state = super().state_dict()
        state["q_memories"] = clone_state(self.q_memories)
        state["rng"] = _rng_state(self._rng)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.q_memories = clone_state(state["q_memories"])
        _set_rng_state(self._rng, state["rng"])


def _views(flat: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Consecutive ``(1, rows, cols)`` views of ``flat``."""
    views, offset = [], 0
    for rows, cols in shapes:
        views.append(flat[offset:offset + rows * cols].view(1, rows, cols))
        offset += rows * cols
    return views


def _rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    """A ``RandomState``'s state as a tensor and python scalars (loadable with ``weights_only=True``)."""
    _, keys, pos, has_gauss, cached_gaussian = rng.get_state(legacy=True)
    return {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_rng_state(rng: np.random.RandomState, state: dict[str, Any]) -> None:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    rng.set_state(("MT19937", keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])))
