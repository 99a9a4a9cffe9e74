"""Local SGD: each rank steps on its own gradients; parameters are averaged every ``period`` steps."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.nn import Parameter

from lightning_optx.distributed import Communicator, all_reduce_mean_coalesced_
from lightning_optx.functional.local_sgd import check_period_args, qsr_period
from lightning_optx.strategies._ddp_base import OptxDDPStrategy, check_replica_size, local_ddp_kwargs

VALIDATE_ON = ("local", "consensus")


class LocalSGDStrategy(OptxDDPStrategy):
    """Local SGD with post-local warm-up and the Quadratic Synchronization Rule, as a DDP strategy.

    For the first ``warmup_steps`` optimizer steps this is plain DDP (gradients all-reduced every step).
    After that, gradients stay local: there is no per-step all-reduce at all, and every ``period`` optimizer
    steps the parameters (and, by option, floating-point buffers and optimizer moments) are averaged
    across ranks in one coalesced all-reduce. Right after a sync every rank holds bit-identical parameters.

    With ``qsr_alpha`` the period follows the Quadratic Synchronization Rule: after each sync it is set to
    ``max(min_period, floor((qsr_alpha / lr)^2))`` from the learning rate of the first param group.

    Steps are counted per optimizer-step call on every rank, so an AMP step the grad scaler skips on one
    rank does not shift that rank's schedule. Between syncs the ranks' parameters and optimizer states
    differ; checkpoints store every rank's, so a resumed run continues bit for bit.

    **End of fit.** However fit stops (``max_steps``, ``max_time``, early stopping, a callback's
    ``should_stop``), it ends with one more averaging (in the strategy's ``on_train_end``, after the
    callbacks' ``on_train_end``) unless the last step was a sync, so every rank holds the consensus.

    **Validation** during fit sees this rank's local replica by default (``validate_on="local"``, no traffic);
    ``validate_on="consensus"`` averages the parameters (and buffers) for the validation run, one extra
    all-reduce per validation (tag ``"consensus"``) unless the ranks are in step, then restores the local
    replica. ``Trainer.validate/test/predict`` outside fit evaluate the module as it is.

    **Frozen parameters** (``requires_grad`` switched off mid-run, e.g. by GradES) are averaged once more at
    the next sync (each rank's copy still holds its own progress), then leave the averaging; parameters
    frozen from the start are never sent.

    DDP's ``broadcast_buffers`` is off: buffers are averaged at the syncs (``average_buffers``), never
    broadcast from rank 0 before every forward.

    Args:
        period: optimizer steps between two averagings (>= 1); ``period=1`` averages after every step.
        warmup_steps: optimizer steps of plain DDP before local steps start (post-local SGD).
        qsr_alpha: QSR's alpha; ``None`` keeps ``period`` fixed.
        min_period: QSR's lower bound on the period (``H_base`` in the paper).
        average_buffers: also average floating-point buffers (BatchNorm statistics) at each sync.
        average_optimizer_state: also average the optimizer's floating-point state (momentum, Adam moments).
        validate_on: ``"local"`` (this rank's replica) or ``"consensus"`` (the average) for validation during fit.
        replica_size: processes per replica; ``None`` (default): the devices of one node when ``num_nodes > 1``,
            else 1. Inside a replica gradients are all-reduced every step (DDP on the replica's group); the
            periodic averaging runs across replicas. Must divide the world size.
        **kwargs: passed to Lightning's ``DDPStrategy`` (e.g. ``find_unused_parameters``).

    Examples:
        >>> import lightning as L
        >>> import lightning_optx  # registers "local_sgd"
        >>> trainer = L.Trainer(strategy="local_sgd", accelerator="cpu", devices=1, max_steps=1, logger=False,
        ...                     enable_checkpointing=False)
        >>> strategy = LocalSGDStrategy(period=16, warmup_steps=100, qsr_alpha=0.02)
    """

    strategy_name = "local_sgd"

    def __init__(
        self,
        period: int = 8,
        warmup_steps: int = 0,
        qsr_alpha: float | None = None,
        min_period: int = 1,
        average_buffers: bool = True,
        average_optimizer_state: bool = False,
        validate_on: Literal["local", "consensus"] = "local",
        replica_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_period_args(period, warmup_steps, qsr_alpha, min_period)
        check_replica_size(replica_size)
        if validate_on not in VALIDATE_ON:
            raise ValueError(f"`validate_on` must be one of {VALIDATE_ON}, got validate_on={validate_on!r}.")
        super().__init__(**local_ddp_kwargs(kwargs, "LocalSGDStrategy"))
        self.validate_on = validate_on
        self._replica_size_arg = replica_size
        self.period = period
        self.warmup_steps = warmup_steps
        self.qsr_alpha = qsr_alpha
        self.min_period = min_period
        self.average_buffers = average_buffers
        self.average_optimizer_state = average_optimizer_state
        self.current_period = period
        self.last_sync_step = warmup_steps
        self.sync_steps: list[int] = []
        self.final_sync_step: int | None = None
        self._synced_names: set[str] = set()  # parameters the last sync averaged (see `_sync_entries`)

    def _check_supported(self, trainer: pl.Trainer) -> None:
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"LocalSGDStrategy supports exactly one optimizer, got {len(self.optimizers)}: the averaging "
                "schedule counts optimizer steps, which several optimizers would advance at different rates."
            )

    def _build_state(self) -> None:
        self._synced_names = self._trainable_names()

    def _trainable_names(self) -> set[str]:
        return {n for n, _ in self._named_trainable_params()}

    @property
    def in_warmup(self) -> bool:
        return self.optimizer_steps < self.warmup_steps

    def _hook_allreduces(self) -> bool:
        return self.in_warmup or self.replica_comm is not None

    def _hook_comm(self) -> Communicator:
        return self.world_comm if self.in_warmup or self.replica_comm is None else self.replica_comm

    def _after_optimizer_step(self) -> None:
        if self.optimizer_steps <= self.warmup_steps:
            self.last_sync_step = self.optimizer_steps
            self._synced_names = self._trainable_names()  # gradients averaged: the ranks are in step
            return
        if self.optimizer_steps - self.last_sync_step < self.current_period:
            return
        self._average()
        self.last_sync_step = self.optimizer_steps
        self.sync_steps.append(self.optimizer_steps)
        if self.qsr_alpha is not None:
            lr = float(self.optimizers[0].param_groups[0]["lr"])
            self.current_period = qsr_period(lr, self.qsr_alpha, self.min_period)

    def _sync_entries(self, retire: bool) -> list[tuple[str, Parameter]]:
        """The parameters a sync averages: the trainable ones, and those frozen since the last sync.

        A parameter frozen between two syncs (``requires_grad`` switched off, e.g. by GradES) still holds each
        rank's own progress: the next sync averages it one last time, after which every rank holds the same
        value and it leaves the averaging (``retire=True`` records that). Parameters frozen from the start are
        identical on every rank (DDP's wrap) and never sent.
        """
        assert self.lightning_module is not None
        last = self._synced_names
        entries = [(n, p) for n, p in self.lightning_module.named_parameters() if p.requires_grad or n in last]
        if retire:
            self._synced_names = self._trainable_names()
        return entries

    def _buffer_entries(self) -> list[tuple[str, Tensor]]:
        assert self.lightning_module is not None
        if not self.average_buffers:
            return []
        return [(n, b) for n, b in self.lightning_module.named_buffers() if b.is_floating_point()]

    def _average(self) -> None:
        params = [p for _, p in self._sync_entries(retire=True)]
        tensors = [p.data for p in params]
        if self.average_optimizer_state:
            tensors += _floating_optimizer_state(self.optimizers[0], {id(p) for p in params})
        self._average_across_replicas(tensors, [t for _, t in self._buffer_entries()], tag="params")

    def _average_across_replicas(self, same_in_replica: list[Tensor], buffers: list[Tensor], tag: str) -> None:
        """Average parameters (identical inside a replica) across replicas, buffers (which DDP leaves local to
        every rank) across all ranks; one coalesced all-reduce when every process is its own replica."""
        with torch.no_grad():
            if self.comm is self.world_comm:
                all_reduce_mean_coalesced_(same_in_replica + buffers, self.comm, tag=tag)
                return
            all_reduce_mean_coalesced_(same_in_replica, self.comm, tag=tag)
            all_reduce_mean_coalesced_(buffers, self.world_comm, tag="buffers")

    @property
    def _ranks_in_step(self) -> bool:
        """Whether every rank holds the same replica now (warm-up, or right after a sync); same on every rank."""
        return self.optimizer_steps <= self.warmup_steps or self.optimizer_steps == self.last_sync_step

    def _final_sync(self) -> None:
        if self._ranks_in_step or not self.optimizers:
            return
        self._average()
        self.final_sync_step = self.optimizer_steps

    def _swap_in_consensus(self) -> None:
        if self._ranks_in_step:
            return
        params, buffers = self._sync_entries(retire=False), self._buffer_entries()
        self._keep_local([n for n, _ in params + buffers])
        self._average_across_replicas([p.data for _, p in params], [t for _, t in buffers], tag="consensus")

    def _extra_metrics(self) -> dict[str, float]:
        return {"local_sgd/period": float(self.current_period)}

    # ------------------------------------------------------------------ checkpointing

    def _shared_state(self) -> dict[str, Any]:
        return {
            "current_period": self.current_period,
            "last_sync_step": self.last_sync_step,
            "sync_steps": list(self.sync_steps),
            "synced_names": sorted(self._synced_names),
        }

    def _load_shared_state(self, state: dict[str, Any]) -> None:
        self.current_period = int(state["current_period"])
        self.last_sync_step = int(state["last_sync_step"])
        self.sync_steps = list(state["sync_steps"])
        if "synced_names" in state:  # older checkpoints: every parameter trainable at set-up
            self._synced_names = set(state["synced_names"])

    def _rank_state(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return {
            "module": self._local_module_state(),
            "optimizer_states": [opt.state_dict() for opt in self.optimizers],
            **self._precision_rank_state(),
        }


def _floating_optimizer_state(optimizer: torch.optim.Optimizer, param_ids: set[int]) -> list[Tensor]:
    """The floating-point state tensors (moments) of the parameters whose ``id`` is in ``param_ids``, in a fixed
    order; step counters excluded."""
    out: list[Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in param_ids:
                continue
            for key in sorted(optimizer.state.get(p, {})):
                value = optimizer.state[p][key]
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step" and value.dim() > 0:
                    out.append(value)
    return out
