"""Where and how GradientSurgery averages per-task gradients across ranks, for every supported strategy.

GradientSurgery switches DDP's own all-reduce off and averages what the aggregation needs itself:

- single device: nothing to average;
- Lightning's ``DDPStrategy``: each task's gradient (and every task-specific one) in one coalesced fp32
  all-reduce over the world, through the callback's own :class:`~lightning_optx.distributed.Communicator`;
- lightning_optx's local strategies (Local SGD, DiLoCo, DiLoCoX): over the group the strategy's DDP hook
  would average over at the coming step (``strategy.gradient_averaging_comm()``: the world during Local SGD's
  warm-up, the node replica with ``replica_size > 1``), or not at all (gradients stay local between syncs);
  recorded in the strategy's ledger;
- compressed DDP: through the strategy's compressor (``strategy.average_gradients_``), each task's gradient
  under its own key ``"<task>/<parameter>"`` so every task keeps its own error-feedback state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.nn import Parameter

from lightning_optx.distributed import Communicator, all_reduce_mean_coalesced_, strict_collectives

SyncMode = Literal["single", "ddp", "local", "compressed"]
TAG = "task_grads"


def sync_mode(strategy: Any) -> SyncMode | None:
    """How GradientSurgery averages under ``strategy``; ``None`` for a strategy it does not support."""
    if type(strategy) is SingleDeviceStrategy:
        return "single"
    if type(strategy) is DDPStrategy:
        return "ddp"
    if callable(getattr(strategy, "average_gradients_", None)):
        return "compressed"
    if callable(getattr(strategy, "gradient_averaging_comm", None)) and isinstance(strategy, DDPStrategy):
        return "local"
    return None


class TaskGradientSync:
    """Averages a step's per-task gradients as the strategy requires (see the module docstring).

    Examples:
        >>> import torch
        >>> sync = TaskGradientSync(Communicator())
        >>> sync.comm() is None    # not attached to a strategy yet: single process
        True
        >>> rows = torch.ones(2, 3)
        >>> sync.average_(rows, ["a", "b"], [], set(), [])   # nothing to send on one process
        0
    """

    def __init__(self, own: Communicator) -> None:
        self.own = own
        self.mode: SyncMode = "single"
        self.strategy: Any = None

    def attach(self, strategy: Any, mode: SyncMode) -> None:
        self.strategy, self.mode = strategy, mode
        if mode == "ddp":
            self.own.device = strategy.root_device

    @property
    def per_rank(self) -> bool:
        """Whether the callback's state (method state, layout) differs per rank: local strategies."""
        return self.mode == "local"

    @property
    def ledger_comm(self) -> Communicator:
        """The communicator whose ledger records the callback's collectives."""
        return self.strategy.comm if self.mode in ("local", "compressed") else self.own

    def comm(self) -> Communicator | None:
        """The group the ranks agree over and (except under compression) average over at this step."""
        if self.mode == "ddp":
            return self.own if self.own.active else None
        if self.mode == "local":
            comm = self.strategy.gradient_averaging_comm()
            return comm if comm is not None and comm.active else None
        if self.mode == "compressed":
            comm = self.strategy.world_comm
            return comm if comm.active else None
        return None

    def agree_any_(self, flags: Tensor) -> Tensor:
        """``flags > 0`` on any rank of :meth:`comm` (a float tensor of 0/1), on the host."""
        comm = self.comm()
        if comm is None:
            return flags > 0
        with strict_collectives(comm.check_devices):
            agreed = flags.to(comm.device)
            all_reduce_mean_coalesced_([agreed], comm, tag="reached")
        return agreed.cpu() > 0

    def average_(self, rows: Tensor | None, task_names: Sequence[str], shared: Sequence[tuple[str, Parameter]],
                 reached: set[int], specific: Sequence[tuple[str, Tensor]]) -> int:
        """Average in place the per-task rows of the shared parameters (``rows[t]``: task ``t``, flattened, in
        the loss scale) and the task-specific gradients; returns the bytes the ledger recorded."""
        before = self.ledger_comm.ledger.total_bytes
        if self.mode == "compressed":  # also on one process: the strategy compresses there too (no traffic)
            tensors, keys = _named_pieces(rows, task_names, shared, reached)
            tensors += [g for _, g in specific]
            keys += [n for n, _ in specific]
            if tensors:
                self.strategy.average_gradients_(tensors, keys, tag=TAG)
            return self.ledger_comm.ledger.total_bytes - before
        comm = self.comm()
        if comm is not None:
            with strict_collectives(comm.check_devices):
                all_reduce_mean_coalesced_([*([rows] if rows is not None else []), *(g for _, g in specific)],
                                           comm, tag=TAG)
        return self.ledger_comm.ledger.total_bytes - before


def _named_pieces(rows: Tensor | None, task_names: Sequence[str], shared: Sequence[tuple[str, Parameter]],
                  reached: set[int]) -> tuple[list[Tensor], list[str]]:
    """Views of each task's row in the shape of each reached shared parameter, keyed ``"<task>/<name>"``
    (a compressor sees matrices, not a flat row; every rank passes the same agreed set)."""
    tensors: list[Tensor] = []
    keys: list[str] = []
    if rows is None:
        return tensors, keys
    for t, task in enumerate(task_names):
        offset = 0
        for name, p in shared:
            if id(p) in reached:
                tensors.append(rows[t, offset:offset + p.numel()].view(p.shape))
                keys.append(f"{task}/{name}")
            offset += p.numel()
    return tensors, keys
