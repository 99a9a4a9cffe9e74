"""Plumbing shared by our DDP-based strategies: comm hook, accounting, logging, per-rank checkpoint state.

Not a public API. Each strategy subclasses :class:`OptxDDPStrategy` and fills in what it does at a sync.

Checkpoints. Lightning writes checkpoints from rank 0 only, but some of our state differs per rank
(error-feedback residuals; under Local SGD, each rank's parameters and optimizer moments between syncs).
Nothing is gathered (see :mod:`lightning_optx.checkpointing`): the state every rank shares and rank 0's own
part go into the checkpoint under ``checkpoint["lightning_optx"]`` (``"shared"``, ``"rank0"``), and every
other rank writes its own part to a file beside the checkpoint. At load time each rank takes its own part:
optimizer states and the precision plugin's state (each rank's own fp16 GradScaler under the local strategies)
are swapped into the checkpoint before Lightning restores them, and module weights are re-applied right after
the DDP wrap (whose rank-0 broadcast would otherwise overwrite them). A checkpoint written with another world
size falls back to rank 0's state for every rank, with a warning, and drops per-rank residuals.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn import Parameter
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_optx.checkpointing import PerRankState, rank_file
from lightning_optx.distributed import Communicator, LinkClass, strict_collectives, wire_bytes

CHECKPOINT_KEY = "lightning_optx"
PRECISION_STATE = "precision_plugin"  # key of a rank's precision-plugin state in its per-rank state


@dataclass
class _HookState:
    """What the DDP comm hook needs: whether to all-reduce now, and where to record it."""

    comm: Communicator
    allreduce: bool = True


def _local_or_allreduce_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average the bucket across ranks (recorded, overlapped with backward), or hand back the local gradients."""
    buffer = bucket.buffer()
    work = state.comm.all_reduce_async(buffer, tag="grad") if state.allreduce else None
    if work is None:
        fut: torch.futures.Future[Tensor] = torch.futures.Future()
        fut.set_result(buffer)
        return fut
    world = state.comm.world_size
    return work.get_future().then(lambda f: f.value()[0].div_(world))


# DDP checks the hook's annotations by identity; `from __future__ import annotations` made them strings.
_local_or_allreduce_hook.__annotations__ = {
    "state": _HookState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[Tensor],
}


def link_class(ranks: Iterable[int], processes_per_node: int) -> LinkClass:
    """``"intra_node"`` if every rank in ``ranks`` sits on one node (global rank // processes per node)."""
    return "intra_node" if len({r // processes_per_node for r in ranks}) <= 1 else "inter_node"


def check_replica_size(replica_size: int | None) -> None:
    if replica_size is not None and (isinstance(replica_size, bool) or not isinstance(replica_size, int)
                                     or replica_size < 1):
        raise ValueError(f"`replica_size` must be None (one replica per node) or an integer >= 1, got "
                         f"replica_size={replica_size!r}.")


def local_ddp_kwargs(kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    """DDP options for a strategy whose ranks hold different replicas between syncs: no buffer broadcast.

    DDP's ``broadcast_buffers=True`` broadcasts rank 0's buffers before every forward: a collective outside
    the ledger that overwrites every other rank's BatchNorm statistics. Local strategies average buffers at
    their syncs instead.
    """
    for name in ("broadcast_buffers", "forward_sync_buffers"):
        if kwargs.get(name, False):
            raise ValueError(f"{owner} averages buffers at its syncs and cannot broadcast rank 0's buffers before "
                             f"every forward: got {name}={kwargs[name]!r}, allowed: False.")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("broadcast_buffers", "forward_sync_buffers")}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {**kwargs, "forward_sync_buffers": False}  # torch >= 2.12: buffers still synced once, at the wrap
    return {**kwargs, "broadcast_buffers": False}


ERROR_FEEDBACK_STATES = ("residuals", "velocities", "server_residuals")  # per-rank, per-name compressor state


def drop_error_feedback(compressor: Any, names: Iterable[str]) -> None:
    """Forget a compressor's per-rank error-feedback state (residuals, top-k velocities) of ``names``.

    For parameters that left the payload for good (frozen by GradES): what compression dropped from their
    past updates would otherwise be carried, and checkpointed, forever. Shared state (PowerSGD's Q memories)
    is kept.
    """
    names = set(names)
    if not names:
        return
    for store in error_feedback_stores(compressor):
        for key in [k for k in store if _names_parameter(k, names)]:
            del store[key]


def _names_parameter(key: Any, names: set[str]) -> bool:
    """``key`` is one of ``names``, or a per-task key ``"<task>/<name>"`` of one (gradient surgery)."""
    return key in names or (isinstance(key, str) and "/" in key and key.split("/", 1)[1] in names)


def error_feedback_stores(compressor: Any) -> list[dict[Any, Tensor]]:
    """The compressor's per-rank, per-name error-feedback dictionaries."""
    stores = [getattr(compressor, attr, None) for attr in ERROR_FEEDBACK_STATES]
    return [store for store in stores if isinstance(store, dict)]


def to_cpu(tree: Any) -> Any:
    """A deep copy of a nested state with every tensor moved to the CPU (for pickling across ranks)."""
    if isinstance(tree, Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return copy.deepcopy(tree)


class OptxDDPStrategy(DDPStrategy):
    """A ``DDPStrategy`` that owns gradient synchronisation, accounts for every byte and checkpoints per rank.

    Subclasses override :meth:`_hook_allreduces`, :meth:`_after_optimizer_step`, :meth:`_shared_state` /
    :meth:`_load_shared_state` and :meth:`_rank_state` / :meth:`_load_rank_state`.
    """

    strategy_name: ClassVar[str] = "optx_ddp"

    # processes per replica: 1 (every process its own replica), None (the devices of one node when
    # num_nodes > 1, else 1); strategies with node replicas take it as an argument
    _replica_size_arg: int | None = 1
    # whether DDP itself runs on the replica group (gradients all-reduced inside a replica every step)
    _ddp_on_replicas: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.comm = Communicator()  # syncs: across replicas (the whole world with one process per replica)
        self.world_comm = self.comm  # every rank
        self.replica_comm: Communicator | None = None  # inside this rank's replica (None: one process each)
        self.replica_size = 1
        self._cross_rank_lists: list[list[int]] = []
        self._hook_state = _HookState(self.comm)
        self.optimizer_steps = 0
        self._fp32_grad_bytes = 0
        self._pending_rank_state: dict[str, Any] | None = None
        self._pending_shared_state: dict[str, Any] | None = None
        self.per_rank_state = PerRankState()

    # ------------------------------------------------------------------ set-up

    def _register_ddp_hooks(self) -> None:
        # Lightning registers comm hooks on CUDA only; ours is needed on every device (CPU/gloo too).
        assert self.model is not None
        self.model.register_comm_hook(self._hook_state, _local_or_allreduce_hook)  # type: ignore[operator]
        self._update_hook()

    def _update_hook(self) -> None:
        self._hook_state.comm = self._hook_comm()
        self._hook_state.allreduce = self._hook_allreduces()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self._build_groups()

    def _build_groups(self) -> None:
        """Process groups for replicas of ``replica_size`` consecutive ranks (one node each by default).

        ``replica_comm`` holds the ranks of this rank's replica; ``comm`` the ranks with the same index in
        every replica (rank ``i``, ``i + R``, ``i + 2R``, ...). Inside a replica DDP keeps the ranks identical, so
        the ``R`` groups of equal index carry the same averages in parallel, each over its own links, rather
        than funnelling through one leader per replica (which would need an extra broadcast inside every
        replica after each sync).
        """
        world, per_node = self.world_size, max(1, self.num_processes)
        self.world_comm.link = link_class(range(world), per_node)
        size = self._resolve_replica_size()
        self.replica_size = size
        self._cross_rank_lists = [list(range(i, world, size)) for i in range(size)]
        if size == 1 or world == 1:
            return
        rank = self.global_rank
        for start in range(0, world, size):
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks:
                self.replica_comm = Communicator(group, self.world_comm.ledger, link=link_class(ranks, per_node))
        for ranks in self._cross_rank_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                self.comm = Communicator(group, self.world_comm.ledger, link=link_class(ranks, per_node))

    def _resolve_replica_size(self) -> int:
        arg = self._replica_size_arg
        size = arg if arg is not None else (max(1, self.num_processes) if self.num_nodes > 1 else 1)
        if self.world_size % size:
            raise ValueError(f"`replica_size` must divide the world size ({self.world_size} processes), got "
                             f"replica_size={size}.")
        return size

    def _comms(self) -> list[Communicator]:
        comms = [self.world_comm, self.comm]
        return comms + ([self.replica_comm] if self.replica_comm is not None else [])

    def _align_replicas(self) -> None:
        """Start every replica from replica 0's weights (DDP on a replica group only aligns inside it)."""
        if self.replica_comm is None or not self._ddp_on_replicas or not self.comm.active:
            return
        if self._pending_rank_state is not None:
            return  # resuming: every rank's own weights come from the checkpoint
        assert self.lightning_module is not None
        src = dist.get_global_rank(self.comm.group, 0)
        with torch.no_grad():
            for t in [*self.lightning_module.parameters(), *self.lightning_module.buffers()]:
                self.comm.broadcast_(t.data, src=src, tag="init")

    def setup(self, trainer: pl.Trainer) -> None:
        if self.replica_comm is not None and self._ddp_on_replicas:
            self._ddp_kwargs["process_group"] = self.replica_comm.group
        super().setup(trainer)
        for comm in self._comms():
            comm.device = self.root_device
        if trainer.state.fn != TrainerFn.FITTING:
            # validate / test / predict: no optimizer, no schedule; the module holds the weights to evaluate
            self._pending_shared_state = self._pending_rank_state = None
            return
        self._check_supported(trainer)
        self._align_replicas()
        self._build_state()
        self._fp32_grad_bytes = sum(p.numel() * 4 for p in self._trainable_params())
        if self._pending_shared_state is not None:
            self._load_shared_state(self._pending_shared_state)
            self._pending_shared_state = None
        if self._pending_rank_state is not None:
            module_state = self._pending_rank_state.get("module")
            if module_state is not None:
                # after the DDP wrap, whose broadcast from rank 0 overwrote this rank's own weights
                assert self.lightning_module is not None
                self.lightning_module.load_state_dict(module_state)
            self._load_rank_state(self._pending_rank_state)
            self._pending_rank_state = None
        self.per_rank_state.restore()
        self._update_hook()

    def _check_supported(self, trainer: pl.Trainer) -> None:
        """Raise a clear error for combinations the strategy cannot honour."""

    def _build_state(self) -> None:
        """Create the strategy's own state (after the DDP wrap, before a checkpoint's state is loaded into it)."""

    def gradient_averaging_comm(self) -> Communicator | None:
        """Where DDP's comm hook averages gradients at the coming optimizer step, or ``None`` if they stay local.

        The world (plain DDP, Local SGD's warm-up), this rank's replica (node replicas), or ``None`` (Local SGD
        after warm-up and DiLoCo with one process per replica). For callbacks that average gradients
        themselves (gradient surgery, DP-SGD). :class:`CompressedDDPStrategy` averages through its compressor
        after backward instead and answers ``None`` here.
        """
        return self._hook_comm() if self._hook_allreduces() else None

    # ------------------------------------------------------------------ what subclasses define

    def _hook_allreduces(self) -> bool:
        """Whether DDP's comm hook averages gradients now (plain DDP) or leaves them local."""
        return True

    def _hook_comm(self) -> Communicator:
        """The group DDP's comm hook averages gradients over when it does."""
        return self.world_comm

    def _after_optimizer_step(self) -> None:
        """Runs on every rank after each optimizer step (synchronisation decisions live here)."""

    def _release_frozen(self) -> None:
        """Drop the error-feedback state of frozen parameters: gradient compression sends trainable ones only.

        DiLoCo overrides this (a frozen matrix still holds local progress until its last outer step).
        """
        compressor = getattr(self, "compressor", None)
        if compressor is not None and self.lightning_module is not None:
            drop_error_feedback(compressor, [n for n, p in self.lightning_module.named_parameters()
                                             if not p.requires_grad])

    def _shared_state(self) -> dict[str, Any]:
        return {}

    def _load_shared_state(self, state: dict[str, Any]) -> None:
        pass

    def _rank_state(self) -> dict[str, Any]:
        return {}

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ stepping and logging

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        for comm in self._comms():
            comm.step = self.optimizer_steps
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        # Counted per call, not per applied update: an AMP step the scaler skips on one rank must not
        # shift that rank's synchronisation schedule.
        self.optimizer_steps += 1
        with self._collective_scope():
            self._after_optimizer_step()
        self._release_frozen()
        self._update_hook()
        self._log_communication()
        return output

    def _log_communication(self) -> None:
        module = self.lightning_module
        if module is None or module._current_fx_name is None:
            return
        ledger = self.comm.ledger
        step_bytes = ledger.bytes_for_step(self.optimizer_steps - 1)
        # bytes on the wire (sent + received) against plain DDP: an fp32 ring all-reduce of every gradient among
        # all ranks every step (with node replicas ``comm`` spans one rank per replica only)
        world = self.world_comm.world_size
        baseline = wire_bytes("all_reduce", self._fp32_grad_bytes, world) * self.optimizer_steps
        ratio = baseline / ledger.total_wire_bytes if ledger.total_wire_bytes else float("inf")
        metrics = {
            "comm/bytes_per_step": float(step_bytes),
            "comm/bytes_total": float(ledger.total_bytes),
            "comm/compression_ratio": float(ratio) if self.comm.active else 1.0,
            "comm/intra_node_bytes": float(ledger.intra_node_bytes),
            "comm/inter_node_bytes": float(ledger.inter_node_bytes),
            **self._extra_metrics(),
        }
        for name, value in metrics.items():
            module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "comm/compression_ratio")

    def _extra_metrics(self) -> dict[str, float]:
        return {}

    def _collective_scope(self) -> Any:
        """The block in which the strategy prepares and issues collectives (strict device checks, see
        :func:`~lightning_optx.distributed.strict_collectives`)."""
        return strict_collectives(self.comm.check_devices)

    # ------------------------------------------------------------------ end of fit and evaluation

    def on_train_end(self) -> None:
        super().on_train_end()
        with self._collective_scope(), torch.no_grad():
            self._final_sync()

    def _final_sync(self) -> None:
        """Bring every rank to the consensus parameters when fit ends, wherever in a round it stops."""

    def on_validation_start(self) -> None:
        super().on_validation_start()
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING
        if fitting and getattr(self, "validate_on", "local") == "consensus":
            with self._collective_scope(), torch.no_grad():
                self._swap_in_consensus()

    def on_validation_end(self) -> None:
        self._restore_local()
        super().on_validation_end()

    def _swap_in_consensus(self) -> None:
        """Replace this rank's local replica by the consensus for a validation run (see ``validate_on``)."""

    def _keep_local(self, names: list[str]) -> None:
        """Remember the local values of these ``state_dict`` entries before they are overwritten."""
        assert self.lightning_module is not None
        state = self.lightning_module.state_dict(keep_vars=True)
        self._local_backup = {n: state[n].detach().clone() for n in names}

    def _restore_local(self) -> None:
        backup = getattr(self, "_local_backup", None)
        if not backup:
            return
        assert self.lightning_module is not None
        state = self.lightning_module.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, value in backup.items():
                state[name].detach().copy_(value)
        self._local_backup = {}

    def _local_module_state(self) -> dict[str, Any]:
        """The module's ``state_dict`` with this rank's local values, also while a consensus is swapped in."""
        assert self.lightning_module is not None
        backup = getattr(self, "_local_backup", None) or {}
        return {n: backup.get(n, v) for n, v in self.lightning_module.state_dict().items()}

    # ------------------------------------------------------------------ helpers for subclasses

    def _named_trainable_params(self) -> Iterator[tuple[str, Parameter]]:
        assert self.lightning_module is not None
        return ((n, p) for n, p in self.lightning_module.named_parameters() if p.requires_grad)

    def _trainable_params(self) -> list[Parameter]:
        return [p for _, p in self._named_trainable_params()]

    def _precision_rank_state(self) -> dict[str, Any]:
        """This rank's precision-plugin state, for strategies whose ranks step apart between syncs.

        Each rank's fp16 GradScaler then halves its scale on its own overflows, but Lightning writes rank 0's
        plugin state only. Saved with the key Lightning stores it under, for :meth:`load_checkpoint` to swap in.
        """
        state = self.precision_plugin.state_dict()
        if not state:
            return {}
        return {PRECISION_STATE: {"key": type(self.precision_plugin).__qualname__, "state": to_cpu(state)}}

    def _grad_scale(self) -> float:
        """The fp16 GradScaler's current scale (1.0 without one)."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    # ------------------------------------------------------------------ checkpointing

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Rank 0 writes the checkpoint with the shared state and its own; every other rank writes its own file.

        Nothing is gathered: see :mod:`lightning_optx.checkpointing`. A weights-only checkpoint (no
        ``"optimizer_states"``) carries no strategy, optimizer or residual state.
        """
        ours: dict[str, Any] = {
            "strategy": self.strategy_name,
            "world_size": self.world_size,
            "optimizer_steps": self.optimizer_steps,
        }
        if "optimizer_states" not in checkpoint:
            ours["weights_only"] = True
        else:
            shared = self._shared_state()  # on every rank: it may finish collectives still in flight
            mine = {"strategy": self._rank_state(), **self.per_rank_state.collect()}
            if self.is_global_zero:
                # The module and optimizer state of rank 0 are what Lightning writes anyway, except while a
                # consensus is swapped in for validation (``validate_on="consensus"``): then Lightning writes
                # the consensus and rank 0's local replica is kept here for the resume.
                swapped = bool(getattr(self, "_local_backup", None))
                # the precision plugin is never swapped: Lightning writes rank 0's own
                dropped = {"optimizer_states", PRECISION_STATE} | (set() if swapped else {"module"})
                mine["strategy"] = {k: v for k, v in mine["strategy"].items() if k not in dropped}
                ours.update(comm=self.comm.ledger.state_dict(), shared=to_cpu(shared), rank0=to_cpu(mine))
            else:
                PerRankState.write(filepath, mine, self.global_rank, self.world_size, self.optimizer_steps)
        if self.is_global_zero:
            checkpoint[CHECKPOINT_KEY] = ours
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove the checkpoint (rank 0) and each rank's own file beside it."""
        super().remove_checkpoint(filepath)
        if not self.is_global_zero:
            PerRankState.remove(filepath, self.global_rank)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only:
            weights_only = False  # our per-rank state holds plain Python containers and counters
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        ours = checkpoint.get(CHECKPOINT_KEY)
        if ours is None:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint holds no {CHECKPOINT_KEY!r} state; "
                           "the strategy starts its schedule and compressor state from scratch.")
            return checkpoint
        if ours["strategy"] != self.strategy_name:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint was written by strategy {ours['strategy']!r}; "
                           "its strategy state is not restored.")
            return checkpoint
        if ours.get("weights_only"):
            return checkpoint
        self.optimizer_steps = int(ours["optimizer_steps"])
        self.comm.ledger.load_state_dict(ours["comm"])
        self._pending_shared_state = ours["shared"]
        states = self._read_rank_states(ours, checkpoint_path)
        rank_state = states.pop("strategy", {})
        if "optimizer_states" in rank_state:
            checkpoint["optimizer_states"] = rank_state["optimizer_states"]
        precision = rank_state.get(PRECISION_STATE)
        if precision is not None and precision["key"] in checkpoint:  # same plugin class as Lightning wrote
            checkpoint[precision["key"]] = precision["state"]
        self._pending_rank_state = rank_state
        self.per_rank_state.set_pending(states)
        return checkpoint

    def _read_rank_states(self, ours: dict[str, Any], checkpoint_path: Any) -> dict[str, Any]:
        """This rank's per-rank states (``{"strategy": ..., <registered key>: ...}``), or the fallback."""
        saved_world = int(ours["world_size"])
        if "per_rank" in ours:  # written before per-rank files existed: every rank's state inside
            if saved_world == self.world_size:
                return {"strategy": ours["per_rank"][self.global_rank]}
            return self._fallback(f"the checkpoint was written with world size {saved_world}, this run has "
                                  f"{self.world_size}")
        if saved_world != self.world_size:
            return self._fallback(f"the checkpoint was written with world size {saved_world}, this run has "
                                  f"{self.world_size}")
        if self.is_global_zero:
            return dict(ours["rank0"])
        states = PerRankState.read(checkpoint_path, self.global_rank, self.world_size, int(ours["optimizer_steps"]))
        if states is None:
            return self._fallback(f"rank {self.global_rank}'s file {rank_file(checkpoint_path, self.global_rank)!r} "
                                  "is missing or belongs to another checkpoint", all_ranks=True)
        return states

    def _fallback(self, why: str, all_ranks: bool = False) -> dict[str, Any]:
        """Resume from rank 0's model and optimizer state (in the checkpoint itself); per-rank state is reset."""
        message = (f"{type(self).__name__}: {why}; this rank resumes from rank 0's model and optimizer state and "
                   "its per-rank state (residuals, local progress) is reset.")
        if all_ranks:
            warnings.warn(message, stacklevel=2)
        else:
            rank_zero_warn(message)
        return {}
