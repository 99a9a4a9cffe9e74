"""Two-stage compressed all-reduce: bytes per rank that do not grow with the number of ranks.

Gathering every rank's compressed payload makes each rank receive ``(n - 1)`` payloads: at 64 ranks a
1-bit code moves about as much as an fp32 ring all-reduce. The two-stage scheme of DeepSpeed's compressed
all-reduce (used by its 1-bit Adam) instead splits every tensor into ``n`` chunks, one per rank:

1. *worker stage*: each rank compresses its tensor (with its worker error feedback) and sends chunk ``j``
   of the code to rank ``j`` (one ``all_to_all``);
2. *server stage*: rank ``j`` decodes the ``n`` codes of its chunk, averages them in rank order, adds its
   server residual, compresses the average again (server error feedback keeps what this drops) and the
   compressed chunks are all-gathered; every rank decodes all chunks identically.

Each rank sends and receives about ``2 (n-1)/n`` code sizes, like a ring all-reduce, instead of
``(n - 1)`` code sizes. The two stages are written here for scaled sign (:func:`sign_two_stage_`) and
top-k (:func:`topk_two_stage_`); worker residuals are keyed by tensor key, server residuals by tensor key
too (they cover this rank's chunk only, so they depend on the world size).

Examples:
    >>> chunk_numel(100, world_size=4, multiple=8)    # 4 chunks of 32 entries cover 100 (+28 padding)
    32
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_optx.distributed import Communicator

__all__ = ["chunk_numel", "pack_bits", "server_residual_for", "sign_two_stage_", "topk_two_stage_", "unpack_bits"]


def chunk_numel(numel: int, world_size: int, multiple: int = 1) -> int:
    """Entries in each rank's chunk of a ``numel``-entry tensor: ``ceil(numel / world)``, a multiple of ``multiple``."""
    per_rank = math.ceil(numel / world_size)
    return max(multiple, math.ceil(per_rank / multiple) * multiple)


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
    bits = torch.bitwise_right_shift(packed.reshape(-1).unsqueeze(1), shifts).bitwise_and_(1)
    return bits.view(-1)[:numel].bool()


def server_residual_for(store: dict[Hashable, Tensor], key: Hashable, chunk: Tensor) -> Tensor:
    """The server-side error-feedback residual of ``key``'s chunk in ``store`` (zeros when new or resized)."""
    r = store.get(key)
    if r is None or r.shape != chunk.shape:
        r = torch.zeros_like(chunk)
    store[key] = r.to(chunk)
    return store[key]


def _world(comm: Communicator) -> tuple[int, int]:
    return (comm.world_size, comm.rank) if comm.active else (1, 0)


def _padded(m: Tensor, length: int) -> Tensor:
    flat = m.reshape(-1)
    return F.pad(flat, (0, length - flat.numel()))


def _valid_mask(numel: int, chunk: int, rank: int, device: torch.device) -> Tensor:
    """Which entries of rank ``rank``'s chunk are real entries (not padding)."""
    return torch.arange(rank * chunk, (rank + 1) * chunk, device=device) < numel


# ---------------------------------------------------------------------- scaled sign

def _sign_code(m: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, positive, decoded)`` of the scaled sign of ``m`` (scale: mean |m| over the ``valid`` entries)."""
    if valid is None:
        scale = m.abs().mean()
        positive = m >= 0
        return scale, positive, torch.where(positive, scale, -scale)
    scale = torch.where(valid, m.abs(), 0.0).sum() / valid.sum().clamp(min=1)
    positive = m >= 0
    return scale, positive, torch.where(positive, scale, -scale) * valid


def sign_two_stage_(
    tensors: Sequence[Tensor],
    keys: Sequence[Hashable],
    comm: Communicator,
    tag: str,
    worker_residual: Callable[[Hashable, Tensor], Tensor | None],
    server_residual: Callable[[Hashable, Tensor], Tensor | None],
) -> None:
    """Replace every tensor in place by the two-stage scaled-sign mean over ranks (error feedback on both sides).

    ``worker_residual(key, m)`` returns the residual to add to ``m`` (``tensor`` in fp32, same shape), or
    ``None`` without error feedback; it is then updated in place to ``m - C(m)``. ``server_residual(key,
    chunk)`` does the same for this rank's averaged chunk. Collectives: one uint8 ``all_to_all`` of the
    sign bits, one fp32 ``all_gather`` of the worker scales and one uint8 ``all_gather`` of the server's
    scales and bits.
    """
    world, rank = _world(comm)
    device = tensors[0].device
    chunks = [chunk_numel(t.numel(), world, multiple=8) for t in tensors]
    scales, sends = [], []
    for t, key, chunk in zip(tensors, keys, chunks):
        m = t.detach().to(torch.float32, copy=True)
        residual = worker_residual(key, m)
        if residual is not None:
            m.add_(residual)
        scale, positive, decoded = _sign_code(m)
        if residual is not None:
            residual.copy_(m - decoded)
        if world == 1:  # nothing to send, and the server stage would re-encode the same code
            t.copy_(decoded)
            continue
        scales.append(scale.reshape(1))
        sends.append(pack_bits(_padded(positive, chunk * world)).view(world, chunk // 8))
    if world == 1:
        return
    received = comm.all_to_all_single(torch.cat(sends, dim=1).reshape(-1), tag=tag).view(world, -1)
    worker_scales = torch.stack(comm.all_gather(torch.cat(scales), tag=tag))  # (world, tensors)

    server_scales, server_bits, offset = [], [], 0
    for i, (t, key, chunk) in enumerate(zip(tensors, keys, chunks)):
        valid = _valid_mask(t.numel(), chunk, rank, device)
        acc = torch.zeros(chunk, dtype=torch.float32, device=device)
        for r in range(world):  # rank order: the same sum on every rank
            positive = unpack_bits(received[r, offset:offset + chunk // 8], chunk)
            acc.add_(torch.where(positive, worker_scales[r, i], -worker_scales[r, i]))
        offset += chunk // 8
        acc.div_(world).mul_(valid)
        residual = server_residual(key, acc)
        if residual is not None:
            acc.add_(residual)
        scale, positive, decoded = _sign_code(acc, valid)
        if residual is not None:
            residual.copy_(acc - decoded)
        server_scales.append(scale.reshape(1))
        server_bits.append(pack_bits(positive))
    payload = torch.cat([torch.cat(server_scales).view(torch.uint8), *server_bits])
    gathered = comm.all_gather(payload, tag=tag)

    header = 4 * len(tensors)
    for i, (t, chunk) in enumerate(zip(tensors, chunks)):
        start = header + sum(c // 8 for c in chunks[:i])
        parts = []
        for contribution in gathered:
            scale = contribution[:header].view(torch.float32)[i]
            positive = unpack_bits(contribution[start:start + chunk // 8], chunk)
            parts.append(torch.where(positive, scale, -scale))
        t.copy_(torch.cat(parts)[:t.numel()].view(t.shape))


def sign_two_stage_bytes(numels: Sequence[int], world_size: int) -> int:
    """Payload bytes one rank records for :func:`sign_two_stage_` (all-to-all + two all-gathers)."""
    chunk_bytes = sum(chunk_numel(n, world_size, multiple=8) // 8 for n in numels)
    return world_size * chunk_bytes + 4 * len(numels) + 4 * len(numels) + chunk_bytes


def sign_two_stage_wire_bytes(numels: Sequence[int], world_size: int) -> int:
    """Bytes one rank sends plus receives for :func:`sign_two_stage_` (see ``distributed.wire_bytes``)."""
    n = world_size
    if n <= 1:
        return 0
    chunk_bytes = sum(chunk_numel(x, n, multiple=8) // 8 for x in numels)
    return 2 * (n - 1) * chunk_bytes + 2 * (n - 1) * 4 * len(numels) + 2 * (n - 1) * (4 * len(numels) + chunk_bytes)


# ---------------------------------------------------------------------- top-k

def _topk_rows(m: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of ``m`` (``rows x chunk``): the ``k`` entries of largest magnitude, ``(values, column indices)``."""
    _, idx = torch.topk(m.abs(), k, dim=1, sorted=False)
    return torch.gather(m, 1, idx), idx


def topk_two_stage_(
    tensors: Sequence[Tensor],
    worker_inputs: Sequence[Tensor],
    keys: Sequence[Hashable],
    ks: Sequence[int],
    comm: Communicator,
    tag: str,
    on_selected: Callable[[Hashable, Tensor, Tensor], None],
    server_residual: Callable[[Hashable, Tensor], Tensor | None],
) -> None:
    """Replace every tensor in place by the two-stage top-k mean over ranks.

    ``worker_inputs[i]`` is the error-compensated fp32 input of ``tensors[i]`` (flat). Worker stage: each
    rank keeps the ``ceil(k / n)`` largest entries of every chunk of it and sends chunk ``j``'s
    ``(value, index)`` pairs to rank ``j`` (one int32 ``all_to_all``); ``on_selected(key, padded_input,
    flat_indices)`` lets the caller update its state (residual, DGC velocity) from the selection. Server
    stage: rank ``j`` sums its chunk's pairs from every rank in rank order, divides by ``n``, adds its
    server residual, keeps the ``ceil(k / n)`` largest entries (the rest stays in the server residual) and
    the pairs are all-gathered (one int32 ``all_gather``).
    """
    world, rank = _world(comm)
    device = tensors[0].device
    chunks = [chunk_numel(t.numel(), world) for t in tensors]
    per_chunk = [min(math.ceil(k / world), c) for k, c in zip(ks, chunks)]
    sends, outputs = [], []
    for m, key, chunk, k in zip(worker_inputs, keys, chunks, per_chunk):
        padded = _padded(m, chunk * world).view(world, chunk)
        values, idx = _topk_rows(padded, k)
        base = torch.arange(world, device=device).unsqueeze(1) * chunk
        on_selected(key, padded.view(-1), (idx + base).reshape(-1))
        if world == 1:  # nothing to send, and the server stage would select the same entries again
            t_out = torch.zeros_like(padded.view(-1)).index_copy_(0, idx.view(-1), values.view(-1))
            outputs.append(t_out)
            continue
        sends.append(torch.cat([values.view(torch.int32), idx.to(torch.int32)], dim=1))
    if world == 1:
        for t, out in zip(tensors, outputs):
            t.copy_(out[:t.numel()].view(t.shape))
        return
    received = comm.all_to_all_single(torch.cat(sends, dim=1).reshape(-1), tag=tag).view(world, -1)

    server, offset = [], 0
    for t, key, chunk, k in zip(tensors, keys, chunks, per_chunk):
        acc = torch.zeros(chunk, dtype=torch.float32, device=device)
        for r in range(world):  # rank order: the same sum on every rank
            values = received[r, offset:offset + k].view(torch.float32)
            acc.index_add_(0, received[r, offset + k:offset + 2 * k].to(torch.int64), values)
        offset += 2 * k
        acc.div_(world).mul_(_valid_mask(t.numel(), chunk, rank, device))
        residual = server_residual(key, acc)
        if residual is not None:
            acc.add_(residual)
        values, idx = _topk_rows(acc.unsqueeze(0), k)
        if residual is not None:
            residual.copy_(acc.index_fill_(0, idx.view(-1), 0.0))
        server.append(torch.cat([values.view(-1).view(torch.int32), idx.view(-1).to(torch.int32)]))
    gathered = comm.all_gather(torch.cat(server), tag=tag)

    offset = 0
    for t, chunk, k in zip(tensors, chunks, per_chunk):
        out = torch.zeros(chunk * world, dtype=torch.float32, device=device)
        for r, contribution in enumerate(gathered):
            values = contribution[offset:offset + k].view(torch.float32)
            out.index_add_(0, contribution[offset + k:offset + 2 * k].to(torch.int64) + r * chunk, values)
        offset += 2 * k
        t.copy_(out[:t.numel()].view(t.shape))


def topk_per_chunk(numel: int, k: int, world_size: int) -> int:
    """Entries each chunk of a tensor sends in :func:`topk_two_stage_` (both stages)."""
    return min(math.ceil(k / world_size), chunk_numel(numel, world_size))


def topk_two_stage_bytes(numels: Sequence[int], ks: Sequence[int], world_size: int) -> int:
    """Payload bytes one rank records for :func:`topk_two_stage_` (all-to-all + all-gather)."""
    pairs = sum(8 * topk_per_chunk(n, k, world_size) for n, k in zip(numels, ks))
    return world_size * pairs + pairs


def topk_two_stage_wire_bytes(numels: Sequence[int], ks: Sequence[int], world_size: int) -> int:
    """Bytes one rank sends plus receives for :func:`topk_two_stage_`."""
    n = world_size
    if n <= 1:
        return 0
    pairs = sum(8 * topk_per_chunk(x, k, n) for x, k in zip(numels, ks))
    return 2 * (n - 1) * pairs + 2 * (n - 1) * pairs
