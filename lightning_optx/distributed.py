"""Rank-consistent decisions, an accounting of every collective, and a network model.

Strategies and compressors never call ``torch.distributed`` directly: they go through a
:class:`Communicator`, which issues the collective and records it in a :class:`CommLedger` (kind, payload
bytes, whether it blocked or overlapped compute). :class:`LinkModel` turns each record into the time it
would take on a link of a given bandwidth and latency, and :func:`lightning_optx.planning.exposed_seconds`
decides how much of it stays exposed, so a CPU run can say what a run over slow links would cost.

With no process group (a single process) every collective is a local no-op and nothing is recorded.

Every record carries the class of link it crossed (``"intra_node"`` or ``"inter_node"``), so the ledger can
say how many bytes went over the fast links inside a node and how many over the slow ones between nodes,
and :class:`LinkModel` prices each class at its own speed.

NCCL takes only CUDA tensors. A :class:`Communicator` knows the device its group's backend takes
(``device``); with ``check_devices=True`` (or the environment variable ``LIGHTNING_OPTX_STRICT_COLLECTIVES=1``)
every collective given a tensor on another device fails, naming the tag and both devices. See
:func:`strict_collectives` for how CPU tests turn a stray host tensor into such a failure.

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

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "STRICT_ENV",
    "CollectiveKind",
    "CollectiveRecord",
    "CommLedger",
    "Communicator",
    "LinkClass",
    "LinkModel",
    "agree",
    "all_reduce_mean_coalesced_",
    "strict_collectives",
    "strict_collectives_enabled",
    "tensor_bytes",
    "wire_bytes",
]

CollectiveKind = Literal["all_reduce", "all_gather", "broadcast", "all_to_all"]
LinkClass = Literal["intra_node", "inter_node"]
ReduceOp = Literal["sum", "mean"]
STRICT_ENV = "LIGHTNING_OPTX_STRICT_COLLECTIVES"
# Where host-side tensors land in strict mode: no data, so any use of one in a collective or in arithmetic
# with real tensors fails loudly, as a CPU tensor handed to an NCCL group would.
_STRAY_DEVICE = "meta"


def strict_collectives_enabled() -> bool:
    """Whether the device check of collectives is on (environment variable ``LIGHTNING_OPTX_STRICT_COLLECTIVES``)."""
    return os.environ.get(STRICT_ENV, "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def strict_collectives(enabled: bool | None = None) -> Iterator[None]:
    """Run a block that prepares collectives so that tensors created without a device are caught.

    Under NCCL the backend takes only accelerator tensors, while ``torch.tensor([...])`` without ``device=``
    lands on the host: the classic "works on gloo, crashes on NCCL" bug. On a CPU test machine both are CPU
    tensors, so the bug is invisible. In strict mode this block makes the *default* device an imaginary one
    (``meta``): a tensor built without an explicit device is no longer on the device the group takes, and the
    communicator's device check rejects it exactly where NCCL would. Tensors derived from the model's own
    tensors (``clone``, ``zeros_like``, ``cat``) keep their device and pass.

    ``enabled=None`` follows :func:`strict_collectives_enabled`.
    """
    on = strict_collectives_enabled() if enabled is None else enabled
    if not on:
        yield
        return
    with torch.device(_STRAY_DEVICE):
        yield


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
        link: ``"intra_node"`` if every rank of the group sits on one node, else ``"inter_node"``.
    """

    kind: CollectiveKind
    payload_bytes: int
    world_size: int
    overlapped: bool = False
    tag: str = ""
    step: int = 0
    link: LinkClass = "intra_node"

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sends plus receives (see :func:`wire_bytes`)."""
        return wire_bytes(self.kind, self.payload_bytes, self.world_size)


@dataclass
class CommLedger:
    """Every collective a strategy issued, with running totals that survive checkpoints.

    ``records`` holds the individual collectives of the current run (for the network model); ``total_bytes``,
    ``total_collectives`` and ``bytes_by_link`` are cumulative and are what :meth:`state_dict` saves.
    Adding a record and asking for a recent step's bytes cost O(1), whatever the length of the run: per-step
    sums are kept for the last ``STEP_WINDOW`` steps only.
    """

    STEP_WINDOW = 64

    records: list[CollectiveRecord] = field(default_factory=list)
    total_bytes: int = 0
    total_collectives: int = 0
    keep_records: bool = True
    total_wire_bytes: int = 0
    bytes_by_link: dict[str, int] = field(default_factory=lambda: {"intra_node": 0, "inter_node": 0})
    _step_bytes: dict[int, int] = field(default_factory=dict, repr=False)

    def add(self, record: CollectiveRecord) -> None:
        self.total_bytes += record.payload_bytes
        self.total_wire_bytes += record.wire_bytes
        self.total_collectives += 1
        self.bytes_by_link[record.link] = self.bytes_by_link.get(record.link, 0) + record.payload_bytes
        self._step_bytes[record.step] = self._step_bytes.get(record.step, 0) + record.payload_bytes
        if len(self._step_bytes) > self.STEP_WINDOW:
            del self._step_bytes[min(self._step_bytes)]  # a window of 64 keys: O(1)
        if self.keep_records:
            self.records.append(record)

    def bytes_for_step(self, step: int) -> int:
        """Bytes recorded for ``step`` (one of the last ``STEP_WINDOW`` steps that communicated)."""
        return self._step_bytes.get(step, 0)

    @property
    def intra_node_bytes(self) -> int:
        return self.bytes_by_link.get("intra_node", 0)

    @property
    def inter_node_bytes(self) -> int:
        return self.bytes_by_link.get("inter_node", 0)

    def state_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "total_collectives": self.total_collectives,
                "total_wire_bytes": self.total_wire_bytes, "bytes_by_link": dict(self.bytes_by_link)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_bytes = int(state["total_bytes"])
        self.total_collectives = int(state["total_collectives"])
        self.total_wire_bytes = int(state.get("total_wire_bytes", 0))
        # checkpoints from before link classes counted everything as one class
        self.bytes_by_link = {"intra_node": 0, "inter_node": 0, **state.get("bytes_by_link", {})}

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


class Communicator:
    """``torch.distributed`` collectives that record themselves in a :class:`CommLedger`.

    Args:
        group: the process group; ``None`` uses the default group if one is initialised, else runs as a
            single process (every collective a no-op).
        ledger: where collectives are recorded; a fresh one if not given.
        overlapped: the default for records of collectives that do not say (a communicator used from a
            background thread, behind computation, sets it).
        link: the link class its records are counted under (``"inter_node"`` for a group spanning nodes).
        device: the device the group's backend takes; ``None``: CUDA's current device under NCCL, else CPU.
        check_devices: fail any collective given a tensor on another device; ``None`` follows the
            environment variable ``LIGHTNING_OPTX_STRICT_COLLECTIVES``.

    ``step`` is set by the owner (a strategy) so that each record carries the optimizer step it belongs to.
    """

    def __init__(self, group: Any = None, ledger: CommLedger | None = None, overlapped: bool = False,
                 link: LinkClass = "intra_node", device: torch.device | str | None = None,
                 check_devices: bool | None = None) -> None:
        self.group = group
        self.ledger = ledger if ledger is not None else CommLedger()
        self.step = 0
        self.overlapped = overlapped
        self.link: LinkClass = link
        self._device = torch.device(device) if device is not None else None
        self.check_devices = strict_collectives_enabled() if check_devices is None else check_devices

    @property
    def backend(self) -> str:
        if not (dist.is_available() and dist.is_initialized()):
            return "none"
        return str(dist.get_backend(self.group))

    @property
    def device(self) -> torch.device:
        """The device tensors handed to this group's collectives must live on."""
        if self._device is not None:
            return self._device
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @device.setter
    def device(self, device: torch.device | str | None) -> None:
        self._device = torch.device(device) if device is not None else None

    def _check_device(self, tensor: Tensor, kind: str, tag: str) -> None:
        if self.check_devices and tensor.device != self.device:
            raise RuntimeError(
                f"{kind} (tag {tag!r}) was given a tensor on {tensor.device}, but the {self.backend!r} group of this "
                f"communicator takes tensors on {self.device} only (NCCL takes no host tensors): create it with "
                "`device=comm.device` or derive it from the model's tensors."
            )

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

    def _record(self, kind: CollectiveKind, tensor: Tensor, overlapped: bool | None, tag: str) -> None:
        flag = self.overlapped if overlapped is None else overlapped
        self.ledger.add(CollectiveRecord(kind, tensor_bytes(tensor), self.world_size, flag, tag, self.step,
                                         self.link))

    def all_reduce_(self, tensor: Tensor, op: ReduceOp = "sum", tag: str = "", overlapped: bool | None = None) -> None:
        """In-place all-reduce; ``op="mean"`` divides by the world size after summing."""
        self._check_device(tensor, "all_reduce", tag)
        if not self.active:
            return
        self._record("all_reduce", tensor, overlapped, tag)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        if op == "mean":
            tensor.div_(self.world_size)

    def all_reduce_async(self, tensor: Tensor, tag: str = "") -> Any:
        """Start a summing all-reduce and return its work handle (``None`` for one process).

        Recorded as overlapped: the caller computes while it runs and ``wait()``\\ s later.
        """
        self._check_device(tensor, "all_reduce", tag)
        if not self.active:
            return None
        self._record("all_reduce", tensor, True, tag)
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def all_reduce_extreme_(self, tensor: Tensor, how: Literal["min", "max"], tag: str = "control") -> None:
        """In-place element-wise min or max across ranks (rank-consistent decisions)."""
        self._check_device(tensor, "all_reduce", tag)
        if not self.active:
            return
        self._record("all_reduce", tensor, None, tag)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN if how == "min" else dist.ReduceOp.MAX, group=self.group)

    def all_gather(self, tensor: Tensor, tag: str = "", overlapped: bool | None = None) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on every rank), in rank order."""
        self._check_device(tensor, "all_gather", tag)
        if not self.active:
            return [tensor]
        self._record("all_gather", tensor, overlapped, tag)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def all_to_all_single(self, tensor: Tensor, tag: str = "", overlapped: bool | None = None) -> Tensor:
        """Split ``tensor`` (first dimension a multiple of the world size) into one chunk per rank, send chunk
        ``j`` to rank ``j`` and return what every rank sent to this one, in rank order (same shape).

        Recorded with this rank's whole input as its payload (its own chunk included).
        """
        self._check_device(tensor, "all_to_all", tag)
        if not self.active:
            return tensor.clone()
        self._record("all_to_all", tensor, overlapped, tag)
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor.contiguous(), group=self.group)
        return out

    def broadcast_(self, tensor: Tensor, src: int = 0, tag: str = "") -> None:
        self._check_device(tensor, "broadcast", tag)
        if not self.active:
            return
        self._record("broadcast", tensor, None, tag)
        dist.broadcast(tensor, src=src, group=self.group)


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

    A 1-element all-reduce on the group's device, recorded in the ledger with tag ``"control"``.
    """
    if not comm.active:
        return bool(decision)
    flag = torch.tensor([1.0 if decision else 0.0], device=comm.device)
    comm.all_reduce_extreme_(flag, "min" if how == "all" else "max")
    return bool(flag.item() > 0.5)


@dataclass(frozen=True)
class LinkModel:
    """A network: per-link bandwidth in Gbit/s and per-message latency in seconds, for two classes of link.

    ``bandwidth_gbit`` / ``latency_s`` price collectives inside a node (and every collective when no
    inter-node figures are given); ``inter_node_bandwidth_gbit`` / ``inter_node_latency_s`` price collectives
    whose group spans nodes (records with ``link="inter_node"``).

    All-reduce is modeled as a ring (reduce-scatter + all-gather): ``2 (n-1)/n * bytes / B + 2 (n-1) * lat``;
    all-gather of a ``b``-byte shard per rank: ``(n-1) * b / B + (n-1) * lat``; all-to-all of ``b`` bytes
    per rank: ``(n-1)/n * b / B + (n-1) * lat``; broadcast as a pipelined
    ring: ``bytes / B + (n-1) * lat``.

    Examples:
        >>> link = LinkModel(bandwidth_gbit=800.0, inter_node_bandwidth_gbit=8.0, latency_s=0.0,
        ...                  inter_node_latency_s=0.0)
        >>> slow = CollectiveRecord("all_reduce", 10**9, world_size=2, link="inter_node")
        >>> link.seconds(slow), link.seconds(CollectiveRecord("all_reduce", 10**9, world_size=2))
        (1.0, 0.01)
    """

    bandwidth_gbit: float
    latency_s: float = 50e-6
    inter_node_bandwidth_gbit: float | None = None
    inter_node_latency_s: float | None = None

    def link_params(self, link: str) -> tuple[float, float]:
        """``(bandwidth_gbit, latency_s)`` of a link class."""
        if link == "inter_node":
            bandwidth = self.inter_node_bandwidth_gbit if self.inter_node_bandwidth_gbit is not None else None
            latency = self.inter_node_latency_s if self.inter_node_latency_s is not None else self.latency_s
            return (bandwidth if bandwidth is not None else self.bandwidth_gbit), latency
        return self.bandwidth_gbit, self.latency_s

    def seconds(self, record: CollectiveRecord) -> float:
        n = record.world_size
        if n <= 1:
            return 0.0
        bandwidth_gbit, latency_s = self.link_params(record.link)
        bytes_per_s = bandwidth_gbit * 1e9 / 8
        b = record.payload_bytes
        if record.kind == "all_reduce":
            return 2 * (n - 1) / n * b / bytes_per_s + 2 * (n - 1) * latency_s
        if record.kind == "all_gather":
            return (n - 1) * b / bytes_per_s + (n - 1) * latency_s
        if record.kind == "all_to_all":
            return (n - 1) / n * b / bytes_per_s + (n - 1) * latency_s
        return b / bytes_per_s + (n - 1) * latency_s

