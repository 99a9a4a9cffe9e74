"""A communication planner: bytes, modeled time and speed-up of every strategy for a model on a cluster.

Plain Python and torch: neither this package nor the modules it imports (:mod:`lightning_optx.compression`,
:mod:`lightning_optx.distributed`, :mod:`lightning_optx.functional`) import Lightning. Python runs the parent
package's ``__init__`` first, though, and ``import lightning_optx`` imports Lightning on purpose: it registers
the strategy flags in Lightning's ``StrategyRegistry``, which has no plug-in hook to do that later (see
docs/planning.md).

For a workload (the parameter shapes and the compute time of one optimizer step) and a cluster (nodes x GPUs per
node, intra- and inter-node bandwidth, latency), it lists the collectives each strategy issues per round, as the
same :class:`~lightning_optx.distributed.CollectiveRecord` objects the strategies' ledgers hold, and times them
with :class:`~lightning_optx.distributed.LinkModel` (one network model for the planner, the ledgers and the
benchmark). The bytes of a compressed collective come from the compressor's own ``payload_bytes`` on
shape-only (``meta``) tensors, so the planner and the strategies cannot disagree on an encoding.

Topology. Collectives are hierarchical: inside a node over the intra-node link, across nodes over the
inter-node link, where a node's GPUs each handle ``1/G`` of the payload (so a node sends what one rank of a
flat collective among the nodes would). Compression runs across nodes only; inside a node the reduction is
at full precision. Each node's inter-node link is independent (no congestion).

Exposure. DDP's gradient all-reduce hides behind the backward pass (:data:`BACKWARD_FRACTION` of the step's
compute); an overlapped DiLoCo round hides behind the next round's compute (``H`` steps); everything else
(compressed DDP, Local SGD, DiLoCo without overlap) blocks.

Modules: :mod:`~lightning_optx.planning.options` (strategy specs, defaults, option checks) and
:mod:`~lightning_optx.planning.model` (workload, cluster, collectives, timing).

Examples:
    >>> workload = Workload.from_params(1_300_000_000, step_compute_s=0.5)
    >>> cluster = Cluster(nodes=4, gpus_per_node=8, inter_gbps=10.0)
    >>> rows = {r.strategy: r for r in plan(["ddp", "diloco"], workload, cluster)}
    >>> round(rows["ddp"].inter_node_bytes_per_step / 1e9, 2)    # 2 (n-1)/n x 5.2 GB per node
    7.8
    >>> round(rows["ddp"].inter_node_bytes_per_step / rows["diloco"].inter_node_bytes_per_step)   # H = 500
    500
"""

from lightning_optx.planning.model import (
    BACKWARD_FRACTION,
    DTYPE_BYTES,
    MAX_PARAMS,
    Cluster,
    PlannedCollective,
    StrategyPlan,
    Workload,
    collectives_for,
    compute_seconds,
    exposed_seconds,
    plan,
    run_collectives,
    transformer_shapes,
    wire_bytes,
)
from lightning_optx.planning.options import (
    IGNORED_OPTIONS,
    OPTION_KINDS,
    SPARSE_COLLECTIVES,
    STRATEGY_DEFAULTS,
    StrategySpec,
)

__all__ = [
    "BACKWARD_FRACTION",
    "DTYPE_BYTES",
    "IGNORED_OPTIONS",
    "MAX_PARAMS",
    "OPTION_KINDS",
    "SPARSE_COLLECTIVES",
    "STRATEGY_DEFAULTS",
    "Cluster",
    "PlannedCollective",
    "StrategyPlan",
    "StrategySpec",
    "Workload",
    "collectives_for",
    "compute_seconds",
    "exposed_seconds",
    "plan",
    "run_collectives",
    "transformer_shapes",
    "wire_bytes",
]
