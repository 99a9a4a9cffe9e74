"""The planner's model: workload, cluster, the collectives of each strategy, their time and exposure.

Collectives are the same :class:`~lightning_optx.distributed.CollectiveRecord` objects the strategies' ledgers
hold, timed with :class:`~lightning_optx.distributed.LinkModel` (one network model for the planner, the ledgers
and the benchmark). See :mod:`lightning_optx.planning` and docs/planning.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from lightning_optx.compression import get_compressor
from lightning_optx.compression.two_stage import chunk_numel, topk_per_chunk
from lightning_optx.distributed import CollectiveRecord, LinkModel
from lightning_optx.planning.options import StrategySpec

__all__ = [
    "BACKWARD_FRACTION",
    "DTYPE_BYTES",
    "Cluster",
    "PlannedCollective",
    "StrategyPlan",
    "Workload",
    "collectives_for",
    "compute_seconds",
    "exposed_seconds",
    "plan",
    "run_collectives",
    "transformer_shapes",
    "wire_bytes",
]

LinkClass = Literal["intra", "inter"]
Hiding = Literal["none", "backward", "round"]

BACKWARD_FRACTION = 2.0 / 3.0  # backward is 4 of a step's 6 N D FLOPs: the window DDP's all-reduce hides in
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

MAX_PARAMS = 10**14


def wire_bytes(record: CollectiveRecord) -> float:
    """Bytes one participant sends for ``record``: its time on a 1 byte/s link without latency.

    ``2 (n-1)/n b`` for an all-reduce (ring), ``(n-1) b`` for an all-gather, ``b`` for a broadcast; from
    :meth:`LinkModel.seconds`, so bytes and time come from one formula.
    """
    return _BYTE_PER_SECOND.seconds(record)


_BYTE_PER_SECOND = LinkModel(bandwidth_gbit=8e-9, latency_s=0.0)


@dataclass(frozen=True)
class Workload:
    """What one GPU computes per optimizer step, and what the strategies communicate about it.

    Args:
        shapes: shapes of the trainable parameters (compressors decide per tensor).
        step_compute_s: forward + backward + optimizer time of one step on one GPU, communication excluded.
        grad_bytes: bytes per gradient / parameter entry on the wire for DDP and Local SGD (4: DDP all-reduces
            fp32 gradients under mixed precision). DiLoCo and the compressors always work in fp32.
        frozen_numel: entries of frozen parameters (Local SGD averages every parameter).
        buffer_numel: entries of floating-point buffers (Local SGD averages them with ``average_buffers``).

    Examples:
        >>> Workload(shapes=((4, 3), (4,)), step_compute_s=0.1).params
        16
    """

    shapes: tuple[tuple[int, ...], ...]
    step_compute_s: float
    grad_bytes: int = 4
    frozen_numel: int = 0
    buffer_numel: int = 0

    def __post_init__(self) -> None:
        if not self.shapes or self.params <= 0:
            raise ValueError(f"`shapes` must hold at least one non-empty parameter, got shapes={self.shapes!r}.")
        if not self.step_compute_s > 0:
            raise ValueError(f"`step_compute_s` must be > 0, got step_compute_s={self.step_compute_s!r}.")
        if self.grad_bytes not in DTYPE_BYTES.values():
            raise ValueError(f"`grad_bytes` must be 4 or 2, got grad_bytes={self.grad_bytes!r}.")

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @classmethod
    def from_params(cls, params: int, step_compute_s: float, **kwargs: Any) -> Workload:
        """A decoder-only transformer of ``params`` parameters (see :func:`transformer_shapes`)."""
        return cls(shapes=transformer_shapes(params), step_compute_s=step_compute_s, **kwargs)

    @classmethod
    def from_module(cls, module: torch.nn.Module, step_compute_s: float, **kwargs: Any) -> Workload:
        """The trainable parameters, frozen entries and floating buffers of ``module`` (``meta`` tensors work)."""
        trainable = tuple(tuple(p.shape) for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
        return cls(shapes=trainable, step_compute_s=step_compute_s, frozen_numel=frozen, buffer_numel=buffers,
                   **kwargs)


# (least parameter count, width) of GPT-3's family, with Llama/Qwen-like widths for 60B and up
WIDTHS = ((12 * 12 * 768**2, 768), (300e6, 1024), (700e6, 1536), (1.2e9, 2048), (2.5e9, 2560), (6e9, 4096),
          (12e9, 5120), (25e9, 7168), (60e9, 8192), (150e9, 12288))


def transformer_shapes(params: int) -> tuple[tuple[int, ...], ...]:
    """Parameter shapes of a GPT-style model with exactly ``params`` entries.

    Width ``d`` as in GPT-3's family (:data:`WIDTHS`: 2048 from 1.2B, 4096 from 6B, 8192 from 60B), layers
    ``L = floor(params / 12 d^2)`` each of q, k, v, o ``(d, d)``, MLP ``(4d, d)`` and ``(d, 4d)`` and two
    LayerNorm weights ``(d,)``; the rest is an embedding ``(vocab, d)`` and one 1-D remainder.

    Examples:
        >>> shapes = transformer_shapes(1_300_000_000)
        >>> shapes[0], sum(math.prod(s) for s in shapes)
        ((2048, 2048), 1300000000)
    """
    if not 1 <= params <= MAX_PARAMS:
        raise ValueError(f"`params` must be in [1, {MAX_PARAMS:.0e}], got params={params!r}.")
    widths = [w for least, w in WIDTHS if params >= least]
    d = widths[-1] if widths else max(1, math.isqrt(max(1, params // 144)))
    layer = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (d,), (d,)]
    per_layer = 12 * d * d + 2 * d
    layers = params // per_layer
    shapes: list[tuple[int, ...]] = [s for _ in range(layers) for s in layer]
    rest = params - layers * per_layer
    if rest // d:
        shapes.append((rest // d, d))
    if rest % d:
        shapes.append((rest % d,))
    return tuple(shapes)


@dataclass(frozen=True)
class Cluster:
    """Nodes of GPUs: bandwidths in Gbit/s per direction, latency per message in seconds.

    Examples:
        >>> Cluster(nodes=2, gpus_per_node=8).world_size
        16
    """

    nodes: int = 1
    gpus_per_node: int = 1
    intra_gbps: float = 3600.0
    inter_gbps: float = 10.0
    latency_s: float = 50e-6

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {name}={value!r}.")
        for name in ("intra_gbps", "inter_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {name}={getattr(self, name)!r}.")
        if not self.latency_s >= 0:
            raise ValueError(f"`latency_s` must be >= 0, got latency_s={self.latency_s!r}.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, link: LinkClass) -> LinkModel:
        return LinkModel(self.intra_gbps if link == "intra" else self.inter_gbps, self.latency_s)


@dataclass(frozen=True)
class PlannedCollective:
    """One collective of a strategy: the record (payload per participant, participants), on which link, how
    often (once every ``every`` optimizer steps) and what may hide it."""

    record: CollectiveRecord
    link: LinkClass
    every: int = 1
    hidden_behind: Hiding = "none"


@dataclass(frozen=True)
class StrategyPlan:
    """The planner's answer for one strategy; times in seconds, per optimizer step (averaged over a round)."""

    strategy: str
    flag: str
    options: dict[str, Any]
    inter_node_bytes_per_step: float
    intra_node_bytes_per_step: float
    comm_time_s: float
    exposed_comm_s: float
    compute_s: float
    step_time_s: float
    speedup_vs_ddp: float
    compute_utilisation: float
    collectives: tuple[PlannedCollective, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "collectives"}
        out["collectives_per_round"] = len(self.collectives)
        return out


# ---------------------------------------------------------------------------------------------- collectives


def _record(kind: str, payload: float, world: int, tag: str) -> CollectiveRecord:
    return CollectiveRecord(kind, round(payload), world, tag=tag)  # type: ignore[arg-type]


def _compressor_messages(settings: dict[str, Any], shapes: Sequence[tuple[int, ...]], sparse: str, world: int
                         ) -> list[tuple[str, int]]:
    """``(kind, payload bytes)`` of one ``reduce_`` of the compressor over ``shapes`` among ``world`` ranks
    (steady state), one entry per collective the compressor issues, payloads as its ledger records them.

    Sign and top-k: ``two_stage`` is what the compressors do (:mod:`lightning_optx.compression.two_stage`:
    an all-to-all of every rank's chunks, then all-gathers of the reduced chunks; chunks shrink as ``world``
    grows); ``all_gather`` models gathering every rank's whole code instead (what they did before).
    """
    name = settings["compressor"]
    compressor: Any = get_compressor(name, **settings["compressor_options"])
    compressor.iteration = getattr(compressor, "start_iter", 0)  # past PowerSGD's uncompressed warm-up
    raw = packed = 0
    p_bytes = 0
    stages: Counter[str] = Counter()
    for shape, count in Counter(tuple(s) for s in shapes).items():
        t = torch.empty(shape, device="meta")
        if name in ("topk", "sign"):
            if not compressor._compressible(t):
                raw += count * 4 * t.numel()
                continue
            for kind, nbytes in _sparse_stages(compressor, name, t.numel(), sparse, world):
                stages[kind] += count * nbytes
            continue
        nbytes = compressor.payload_bytes([t], 2)
        if name not in ("fp16", "bf16") and nbytes == 4 * t.numel():
            raw += count * nbytes
            continue
        packed += count * nbytes
        if name == "powersgd":  # P (n x r) and Q (m x r) travel in two all-reduces
            n = shape[0]
            p_bytes += count * 4 * n * min(n, t.numel() // n, compressor.rank)
    messages = [("all_reduce", raw)] if raw else []
    if name == "powersgd" and packed:
        messages += [("all_reduce", p_bytes), ("all_reduce", packed - p_bytes)]
    elif packed:
        messages.append(("all_reduce", packed))
    return messages + [(kind.split(":")[0], nbytes) for kind, nbytes in stages.items()]


def _sparse_stages(compressor: Any, name: str, numel: int, sparse: str, world: int) -> list[tuple[str, int]]:
    """The collectives (``"kind:stage"``, payload bytes) one compressed tensor of sign / top-k takes part in."""
    if name == "sign":
        if sparse == "all_gather":  # a 4-byte scale and one bit per entry, gathered from every rank
            return [("all_gather:code", 4 + math.ceil(numel / 8))]
        chunk_bytes = chunk_numel(numel, world, multiple=8) // 8
        return [("all_to_all:bits", world * chunk_bytes), ("all_gather:scales", 4),
                ("all_gather:server", 4 + chunk_bytes)]
    k = compressor.k_for(numel)
    if sparse == "all_gather":  # (value, index) pairs
        return [("all_gather:code", 8 * k)]
    pairs = 8 * topk_per_chunk(numel, k, world)
    return [("all_to_all:pairs", world * pairs), ("all_gather:server", pairs)]


Messages = Callable[[int], list[tuple[str, int]]]


def _within_replica(payload: float, replica: int, cluster: Cluster, tag: str
                    ) -> list[tuple[CollectiveRecord, LinkClass]]:
    """An all-reduce among the ``replica`` ranks of one replica (hierarchical when it spans nodes)."""
    g = cluster.gpus_per_node
    out: list[tuple[CollectiveRecord, LinkClass]] = []
    if min(replica, g) > 1:
        out.append((_record("all_reduce", payload, min(replica, g), tag), "intra"))
    if replica > g:
        out.append((_record("all_reduce", payload, replica // g, tag), "inter"))
    return out


def _across_replicas(messages: Messages, full_bytes: int, replica: int, cluster: Cluster, tag: str
                     ) -> list[tuple[CollectiveRecord, LinkClass]]:
    """Average across replicas: ``messages(world)`` (a compressor's collectives among ``world`` ranks, or one
    fp32 all-reduce). Replicas of whole nodes: process ``i`` of every replica averages the whole payload with
    process ``i`` of the others (the strategies' groups of equal local index, see
    ``OptxDDPStrategy._build_groups``), so every process carries the full payload across nodes, in parallel on
    its own link, and no gather follows. Several replicas per node on several nodes (compressed DDP: one per
    process): a full-precision fp32 all-reduce of ``full_bytes`` inside the node, then ``messages`` across nodes
    among the processes of equal local index. All inside one node: ``messages`` among its replicas."""
    g, nodes = cluster.gpus_per_node, cluster.nodes
    replicas = cluster.world_size // replica
    if replicas == 1:
        return []
    if nodes == 1:
        return [(_record(k, b, replicas, tag), "intra") for k, b in messages(replicas)]
    if replica >= g:
        return [(_record(k, b, replicas, tag), "inter") for k, b in messages(replicas)]
    out: list[tuple[CollectiveRecord, LinkClass]] = [(_record("all_reduce", full_bytes, g // replica, tag), "intra")]
    return out + [(_record(k, b, nodes, tag), "inter") for k, b in messages(nodes)]


def _replica_size(settings: dict[str, Any], cluster: Cluster) -> int:
    size = settings.get("replica_size")
    if size is None:
        return cluster.gpus_per_node if cluster.nodes > 1 else 1
    g, world = cluster.gpus_per_node, cluster.world_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or not (
            g % size == 0 or (size % g == 0 and world % size == 0)):
        raise ValueError(f"replica_size must divide the GPUs per node ({g}) or be a multiple of it dividing the "
                         f"world size ({world}), got replica_size={size!r}")
    return size


def collectives_for(spec: StrategySpec | str, workload: Workload, cluster: Cluster) -> list[PlannedCollective]:
    """The collectives ``spec`` issues per round on ``cluster`` (payloads as the ledger records them)."""
    spec = StrategySpec.parse(spec) if isinstance(spec, str) else spec
    s = spec.resolved()
    params = workload.params
    fp32 = 4 * params
    shapes = workload.shapes
    flag = spec.flag
    if flag == "ddp":
        found = _within_replica(workload.grad_bytes * params, cluster.world_size, cluster, "grad")
        return [PlannedCollective(r, link, 1, "backward") for r, link in found]
    if "period" in s:  # local SGD
        replica = _replica_size(s, cluster)
        averaged = workload.grad_bytes * (params + workload.frozen_numel)
        averaged += 4 * workload.buffer_numel * bool(s["average_buffers"])
        averaged += 4 * s["optimizer_state_tensors"] * params * bool(s["average_optimizer_state"])
        per_step = _within_replica(workload.grad_bytes * params, replica, cluster, "grad")
        sync = _across_replicas(lambda world: [("all_reduce", averaged)], averaged, replica, cluster, "params")
        return ([PlannedCollective(r, link, 1, "backward") for r, link in per_step]
                + [PlannedCollective(r, link, s["period"]) for r, link in sync])
    def messages(world: int) -> list[tuple[str, int]]:
        if s["compressor"] is None:
            return [("all_reduce", fp32)]
        return _compressor_messages(s, shapes, spec.sparse_collective, world)

    if "inner_steps" in s:  # DiLoCo
        if s["fragments"] > len(shapes):
            raise ValueError(f"`fragments` must be at most the number of parameters ({len(shapes)}), got "
                             f"fragments={s['fragments']}.")
        replica = _replica_size(s, cluster)
        h, f = s["inner_steps"], s["fragments"]
        per_step = _within_replica(workload.grad_bytes * params, replica, cluster, "grad")
        sync = _across_replicas(messages, fp32, replica, cluster, "pseudo_grad")
        hiding: Hiding = "round" if s["overlap"] else "none"
        # F staggered fragments: F syncs per round, each about 1/F of the bytes
        split = [(replace(r, payload_bytes=round(r.payload_bytes / f)), link) for r, link in sync for _ in range(f)]
        return ([PlannedCollective(r, link, 1, "backward") for r, link in per_step]
                + [PlannedCollective(r, link, h, hiding) for r, link in split])
    found = _across_replicas(messages, fp32, 1, cluster, "grad")  # compressed DDP: blocking, every step
    return [PlannedCollective(r, link) for r, link in found]


# ---------------------------------------------------------------------------------------------- timing


def exposed_seconds(collectives: Iterable[PlannedCollective], cluster: Cluster, compute_s: float
                    ) -> tuple[float, float]:
    """``(comm seconds, exposed seconds)`` per optimizer step, averaged over a round.

    Blocking collectives are exposed in full; those hidden behind the backward pass share a window of
    ``BACKWARD_FRACTION x compute_s`` per step; those hidden behind a round share ``every x compute_s``.
    """
    total = blocking = backward = 0.0
    rounds: dict[int, float] = {}
    for c in collectives:
        t = cluster.link(c.link).seconds(c.record)
        total += t / c.every
        if c.hidden_behind == "backward":
            backward += t / c.every
        elif c.hidden_behind == "round":
            rounds[c.every] = rounds.get(c.every, 0.0) + t
        else:
            blocking += t / c.every
    exposed = blocking + max(0.0, backward - BACKWARD_FRACTION * compute_s)
    exposed += sum(max(0.0, t - every * compute_s) / every for every, t in rounds.items())
    return total, exposed


def run_collectives(records: Iterable[CollectiveRecord], steps: int, link: LinkClass = "inter"
                    ) -> list[PlannedCollective]:
    """A run's ledger records (``steps`` optimizer steps) as planned collectives, for :func:`exposed_seconds`.

    An overlapped ``"grad"`` record (DDP's bucket all-reduce) hides behind the backward pass, another overlapped
    one (an overlapped DiLoCo round) behind compute; each counts ``1 / steps`` per step, so the windows of a
    run's rounds add up to ``steps x compute`` (the same as per round when the rounds are alike).
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got steps={steps!r}.")
    out = []
    for r in records:
        hidden: Hiding = ("backward" if r.tag == "grad" else "round") if r.overlapped else "none"
        out.append(PlannedCollective(r, link, steps, hidden))
    return out


def plan(specs: Sequence[StrategySpec | str], workload: Workload, cluster: Cluster) -> list[StrategyPlan]:
    """One :class:`StrategyPlan` per spec, in order; speed-ups against plain DDP on the same cluster."""
    parsed = [StrategySpec.parse(s) if isinstance(s, str) else s for s in specs]
    compute = workload.step_compute_s
    _, ddp_exposed = exposed_seconds(collectives_for(StrategySpec("ddp"), workload, cluster), cluster, compute)
    ddp_step = compute + ddp_exposed
    out = []
    for spec in parsed:
        found = collectives_for(spec, workload, cluster)
        comm, exposed = exposed_seconds(found, cluster, compute)
        step = compute + exposed
        out.append(StrategyPlan(
            strategy=spec.label, flag=spec.flag, options=dict(spec.options),
            inter_node_bytes_per_step=sum(wire_bytes(c.record) / c.every for c in found if c.link == "inter"),
            intra_node_bytes_per_step=sum(wire_bytes(c.record) / c.every for c in found if c.link == "intra"),
            comm_time_s=comm, exposed_comm_s=exposed, compute_s=compute, step_time_s=step,
            speedup_vs_ddp=ddp_step / step, compute_utilisation=compute / step, collectives=tuple(found),
        ))
    return out


def compute_seconds(params: int, tokens_per_step: float, gpu_tflops: float, mfu: float) -> float:
    """``6 x params x tokens / (tflops x mfu)``: one GPU's step time for ``tokens_per_step`` tokens.

    Examples:
        >>> round(compute_seconds(1_300_000_000, 16_384, gpu_tflops=989, mfu=0.4), 3)
        0.323
    """
    return 6.0 * params * tokens_per_step / (gpu_tflops * 1e12 * mfu)
