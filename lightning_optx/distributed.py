"""Rank-consistent decisions, an accounting of every collective, and a network model.

Strategies and compressors never call ``torch.distributed`` directly: they go through a
:class:`Communicator`, which issues the collective and records it in a :class:`CommLedger` (kind, payload
bytes, whether it blocked or overlapped compute). :class:`LinkModel` turns each record into the time it
would take on a link of a given bandwidth and latency, and :func:`lightning_optx.planning.exposed_seconds`
decides how much of it stays exposed, so a CPU run can say what a run over slow links would cost.

With no process group (a single process) every collective is a local no-op and nothing is recorded.

Examples:
    >>> comm = Communicator()            # single process: no group
    >>> t = torch.ones(4)
    >>> comm.all_reduce_(t, op="mean", tag="grad")
    >>> t
    tensor([1., 1., 1., 1.])
    >>> comm.ledger.total_bytes
    0
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CollectiveKind",
    "CollectiveRecord",
    "CommLedger",
    "Communicator",
    "LinkModel",
    "agree",
    "all_reduce_mean_coalesced_",
    "tensor_bytes",
    "wire_bytes",
]

CollectiveKind = Literal["all_reduce", "all_gather", "broadcast", "all_to_all"]
ReduceOp = Literal["sum", "mean"]


def tensor_bytes(tensors: Tensor | Iterable[Tensor]) -> int:
    """Payload size in bytes of a tensor or of several."""
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(t.numel() * t.element_size() for t in tensors)


def wire_bytes(kind: CollectiveKind, payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends plus receives in one collective, under the algorithms :class:`LinkModel` assumes.

    Ring all-reduce of ``b`` bytes: ``2 (n-1)/n b`` each way; ring all-gather of a ``b``-byte shard:
    ``(n-1) b`` each way; all-to-all of ``b`` bytes per rank: ``(n-1)/n b`` each way; pipelined broadcast:
    ``b`` each way. ``0`` for one rank.

    Examples:
        >>> wire_bytes("all_reduce", 400, 4), wire_bytes("all_gather", 100, 4), wire_bytes("all_to_all", 400, 4)
        (1200, 600, 600)
    """
    n = world_size
    if n <= 1:
        return 0
    if kind == "all_reduce":
        return 4 * (n - 1) * payload_bytes // n
    if kind == "all_gather":
        return 2 * (n - 1) * payload_bytes
    if kind == "all_to_all":
        return 2 * (n - 1) * payload_bytes // n
    return 2 * payload_bytes


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective as seen by one rank.

    Attributes:
        kind: ``"all_reduce"``, ``"all_gather"``, ``"all_to_all"`` or ``"broadcast"``.
        payload_bytes: bytes this rank puts in (the input tensor's size; for all-gather, its own shard; for
            all-to-all, its whole input, own chunk included).
        world_size: number of ranks taking part.
        overlapped: ``True`` if it ran asynchronously behind computation rather than blocking it.
        tag: what was communicated (``"grad"``, ``"params"``, ``"pseudo_grad"``, ...).
        step: the optimizer step it belongs to.
    """

    kind: CollectiveKind
    payload_bytes: int
    world_size: int
    overlapped: bool = False
    tag: str = ""
    step: int = 0

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sends plus receives (see :func:`wire_bytes`)."""
        return wire_bytes(self.kind, self.payload_bytes, self.world_size)


@dataclass
class CommLedger:
    """Every collective a strategy issued, with running totals that survive checkpoints.

    ``records`` holds the individual collectives of the current run (for the network model); ``total_bytes``
    and ``total_collectives`` are cumulative and are what :meth:`state_dict` saves.
    """

    records: list[CollectiveRecord] = field(default_factory=list)
    total_bytes: int = 0
    total_collectives: int = 0
    keep_records: bool = True
    total_wire_bytes: int = 0

    def add(self, record: CollectiveRecord) -> None:
        self.total_bytes += record.payload_bytes
        self.total_wire_bytes += record.wire_bytes
        self.total_collectives += 1
        if self.keep_records:
            self.records.append(record)

    def bytes_for_step(self, step: int) -> int:
        return sum(r.payload_bytes for r in self.records if r.step == step)

    def state_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "total_collectives": self.total_collectives,
                "total_wire_bytes": self.total_wire_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_bytes = int(state["total_bytes"])
        self.total_collectives = int(state["total_collectives"])
        self.total_wire_bytes = int(state.get("total_wire_bytes", 0))

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


class Communicator:
    """``torch.distributed`` collectives that record themselves in a :class:`CommLedger`.

    Args:
        group: the process group; ``None`` uses the default group if one is initialised, else runs as a
            single process (every collective a no-op).
        ledger: where collectives are recorded; a fresh one if not given.

    ``step`` is set by the owner (a strategy) so that each record carries the optimizer step it belongs to;
    ``overlapped`` is the default for records of collectives that do not say (a communicator used from a
    background thread, behind computation, sets it).
    """

    def __init__(self, group: Any = None, ledger: CommLedger | None = None, overlapped: bool = False) -> None:
        self.group = group
        self.ledger = ledger if ledger is not None else CommLedger()
        self.step = 0
        self.overlapped = overlapped

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    @property
    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    def _record(self, kind: CollectiveKind, payload: int, overlapped: bool | None, tag: str) -> None:
        flag = self.overlapped if overlapped is None else overlapped
        self.ledger.add(CollectiveRecord(kind, payload, self.world_size, flag, tag, self.step))

    def all_reduce_(self, tensor: Tensor, op: ReduceOp = "sum", tag: str = "", overlapped: bool | None = None) -> None:
        """In-place all-reduce; ``op="mean"`` divides by the world size after summing."""
        if not self.active:
            return
        self._record("all_reduce", tensor_bytes(tensor), overlapped, tag)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        if op == "mean":
            tensor.div_(self.world_size)

    def all_reduce_async(self, tensor: Tensor, tag: str = "") -> Any:
        """Start a summing all-reduce and return its work handle (``None`` for one process).

        Recorded as overlapped: the caller computes while it runs and ``wait()``\\ s later.
        """
        if not self.active:
            return None
        self._record("all_reduce", tensor_bytes(tensor), True, tag)
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def all_gather(self, tensor: Tensor, tag: str = "", overlapped: bool | None = None) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on every rank), in rank order."""
        if not self.active:
            return [tensor]
        self._record("all_gather", tensor_bytes(tensor), overlapped, tag)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def all_to_all_single(self, tensor: Tensor, tag: str = "", overlapped: bool | None = None) -> Tensor:
        """Split ``tensor`` (first dimension a multiple of the world size) into one chunk per rank, send chunk
        ``j`` to rank ``j`` and return what every rank sent to this one, in rank order (same shape).

        Recorded with this rank's whole input as its payload (its own chunk included).
        """
        if not self.active:
            return tensor.clone()
        self._record("all_to_all", tensor_bytes(tensor), overlapped, tag)
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor.contiguous(), group=self.group)
        return out

    def broadcast_(self, tensor: Tensor, src: int = 0, tag: str = "") -> None:
        if not self.active:
            return
        self._record("broadcast", tensor_bytes(tensor), None, tag)
        dist.broadcast(tensor, src=src, group=self.group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather a picklable object from every rank (checkpoint bookkeeping; not recorded)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def all_reduce_mean_coalesced_(tensors: Sequence[Tensor], comm: Communicator, tag: str = "") -> None:
    """Average tensors across ranks in place with ONE all-reduce over a flat buffer (one collective, not many).

    Floating tensors only; the result is bit-identical on every rank.
    """
    if not comm.active or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        comm.all_reduce_(flat, op="mean", tag=tag)
        offset = 0
        for t in group:
            t.detach().copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def agree(decision: bool, comm: Communicator, how: Literal["all", "any"] = "all") -> bool:
    """Make one rank-consistent decision: ``how="all"`` is true only if every rank says true.

    Not recorded in the ledger (a 1-element control message).
    """
    if not comm.active:
        return bool(decision)
    flag = torch.tensor([1.0 if decision else 0.0])
    backend = dist.get_backend(comm.group)
    if backend == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN if how == "all" else dist.ReduceOp.MAX, group=comm.group)
    return bool(flag.item() > 0.5)


@dataclass(frozen=True)
class LinkModel:
    """A network: per-link bandwidth in Gbit/s and per-message latency in seconds.

    All-reduce is modeled as a ring (reduce-scatter + all-gather): ``2 (n-1)/n * bytes / B + 2 (n-1) * lat``;
    all-gather of a ``b``-byte shard per rank: ``(n-1) * b / B + (n-1) * lat``; all-to-all of ``b`` bytes
    per rank: ``(n-1)/n * b / B + (n-1) * lat``; broadcast as a pipelined
    ring: ``bytes / B + (n-1) * lat``.
    """

    bandwidth_gbit: float
    latency_s: float = 50e-6

    def seconds(self, record: CollectiveRecord) -> float:
        n = record.world_size
        if n <= 1:
            return 0.0
        bytes_per_s = self.bandwidth_gbit * 1e9 / 8
        b = record.payload_bytes
        if record.kind == "all_reduce":
            return 2 * (n - 1) / n * b / bytes_per_s + 2 * (n - 1) * self.latency_s
        if record.kind == "all_gather":
            return (n - 1) * b / bytes_per_s + (n - 1) * self.latency_s
        if record.kind == "all_to_all":
            return (n - 1) / n * b / bytes_per_s + (n - 1) * self.latency_s
        return b / bytes_per_s + (n - 1) * self.latency_s

