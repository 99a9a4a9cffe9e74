"""DiLoCo / DiLoCoX: local inner steps, outer Nesterov steps on averaged pseudo-gradients, overlap, compression."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.nn import Parameter

from lightning_optx.compression import COMPRESSORS, Compressor, get_compressor
from lightning_optx.distributed import CommLedger, Communicator, all_reduce_mean_coalesced_, strict_collectives
from lightning_optx.functional import diloco as D
from lightning_optx.strategies._ddp_base import (
    OptxDDPStrategy,
    check_replica_size,
    drop_error_feedback,
    error_feedback_stores,
    local_ddp_kwargs,
)

VALIDATE_ON = ("local", "consensus")

ADAPTIVE_THRESHOLDS = (0.2, 0.6)  # relative compression error below / above which the level halves / doubles
DEFAULT_BOUNDS = {"powersgd": (1.0, 64.0), "topk": (0.001, 0.25)}


@dataclass
class _Pending:
    """A pseudo-gradient average in flight (overlap mode), or its result once known.

    ``views`` are the per-tensor results; for the uncompressed path they are views into ``flat``, the one
    buffer the asynchronous all-reduce sums into. A background (compressed) average records its collectives
    in its own ``records`` ledger; :meth:`wait` moves them into ``ledger`` on the main thread, so the logged
    byte totals do not depend on how far the background thread happens to be when a step is logged.
    """

    views: list[Tensor]
    indices: list[int]  # the fragment's parameters these averages belong to
    flat: Tensor | None = None
    work: Any = None
    future: Future[Any] | None = None
    world: int = 1
    records: CommLedger | None = None
    ledger: CommLedger | None = None

    def wait(self) -> list[Tensor]:
        if self.work is not None:
            self.work.wait()
            self.work = None
            assert self.flat is not None
            self.flat.div_(self.world)
        if self.future is not None:
            self.future.result()  # re-raises what the background average raised
            self.future = None
        if self.records is not None and self.ledger is not None:
            for record in self.records.records:
                self.ledger.add(record)
            self.records = None
        return self.views


@dataclass
class _Fragment:
    names: list[str]
    params: list[Parameter]
    global_params: list[Tensor]  # fp32, off the accelerator
    outer: torch.optim.Optimizer
    next_sync: int
    start: list[Tensor] | None = None  # overlap: where this rank's current round started
    pending: _Pending | None = None
    synced: set[str] = field(default_factory=set)  # parameters trainable at the last sync (see `_round_indices`)


class DiLoCoStrategy(OptxDDPStrategy):
    """DiLoCo: ``inner_steps`` local optimizer steps, then an outer step on the averaged pseudo-gradient.

    Each rank runs the module's own optimizer (and LR scheduler, per inner step) with no gradient all-reduce.
    At a sync the pseudo-gradient ``delta = theta_global - theta_local`` is averaged across ranks (through a
    compressor with error feedback if one is given), the outer optimizer (SGD with Nesterov momentum by
    default) steps the global parameters with it, and every rank continues from the new global parameters.
    The global parameters and the outer optimizer's momentum are kept in fp32 on the CPU (pinned when the
    model is on CUDA), so the accelerator holds one copy of the model, not three.

    **Overlap** (``overlap=True``, one-step delay as in DiLoCoX): at the end of round ``t`` rank ``i`` starts
    averaging its round progress ``d_i^t = x_i^{t,0} - x_i^{t,H}`` in the background and keeps training. The
    average of round ``t-1``, started one round earlier, is waited for and applied by the outer optimizer:
    ``theta^t = Outer(theta^{t-1}, mean_i d_i^{t-1})``. The next round starts from the new global parameters
    plus this rank's own, not yet averaged, progress: ``x_i^{t+1,0} = theta^t - d_i^t`` (the delay
    correction). The global parameters are identical on every rank after each outer step; local parameters
    differ by one round of local progress. Communication of a round hides behind a whole round of compute.

    **Fragments** (``fragments=F``, streaming DiLoCo): the parameters are split into ``F`` contiguous groups
    of about equal size; fragment ``f`` syncs at steps ``H - f H / F`` and every ``H`` steps after, so each
    sync moves ``1/F`` of the bytes. ``F`` must divide ``inner_steps``.

    **Adaptive compression** (DiLoCoX): after each compressed sync the relative compression error
    ``||m - C(m)|| / ||m||`` (averaged across ranks) halves the PowerSGD rank / top-k density when it is
    below 0.2 and doubles it above 0.6, within ``compression_bounds``; logged as ``diloco/compression_level``.

    **Memory.** Without overlap the outer step runs in buckets of ``outer_bucket_bytes`` fp32 bytes (a class
    attribute, 32 MiB as in torchft; :func:`~lightning_optx.functional.diloco.bucketed_outer_step_`), so the
    accelerator holds the model, the inner optimizer state and one bucket of pseudo-gradient, never a
    second copy of the model (with ``adaptive_compression`` the whole fragment's pseudo-gradient is built,
    since the compression error is measured over it). With overlap it also holds, per fragment, the round's
    start point (one copy of the fragment in the parameters' dtype) and the in-flight fp32 average.

    **Frozen parameters** (``requires_grad`` switched off mid-run, e.g. by GradES): the next sync sends their
    pseudo-gradient one last time and applies it as a plain average (no outer learning rate or momentum);
    then their outer momentum is dropped, their global copy equals their value on every rank and they leave
    the payload and the outer step.

    **Buffers** (BatchNorm statistics) are averaged across ranks at every sync (``average_buffers``, fp32,
    uncompressed, tag ``"buffers"``); DDP's ``broadcast_buffers`` is off.

    Checkpoints hold the global parameters, outer-optimizer state, sync schedule, any in-flight average
    and, written by each rank to its own file, the local parameters, inner optimizer state, overlap start
    points and compressor residuals: a resumed run continues bit for bit. An overlapped round still in
    flight when a checkpoint is taken is finished (waited for, on every rank) before any state is read, so
    the compressor state and the pending average saved belong to the same round.

    **End of fit.** However fit stops (``max_steps``, ``max_time``, early stopping, a callback's
    ``should_stop``), it ends with a final synchronisation in the strategy's ``on_train_end`` (after the
    callbacks' ``on_train_end``): an in-flight average is applied, every fragment with local progress since
    its last sync takes one more (blocking) outer step on it, and every rank's parameters are set to the new
    global parameters, so all ranks end with the consensus (also ``strategy.global_state_dict()``).

    **Validation** during fit sees this rank's local replica by default (``validate_on="local"``);
    ``validate_on="consensus"`` evaluates the global parameters (no communication: every rank holds them),
    then restores the local replica. ``Trainer.validate/test/predict`` outside fit evaluate the module as is.

    Args:
        inner_steps: ``H``, optimizer steps between syncs.
        outer_optimizer: ``"nesterov"`` (SGD with Nesterov momentum) or ``"sgd"`` (heavy-ball or plain).
        outer_lr: outer learning rate (0.7 in the DiLoCo paper).
        outer_momentum: outer momentum (0.9 in the paper).
        overlap: one-step-delay overlap of the pseudo-gradient average with the next round.
        compressor: ``None`` (fp32 all-reduce), a :class:`~lightning_optx.compression.Compressor` or a name
            (``"powersgd"``, ``"topk"``, ``"sign"``, ``"fp16"``, ``"bf16"``).
        error_feedback: for a named compressor.
        adaptive_compression: adapt the PowerSGD rank / top-k density (see above).
        fragments: number of staggered fragments (streaming DiLoCo).
        compressor_options: options of a named compressor (e.g. ``{"rank": 8}``).
        compression_bounds: ``(min, max)`` level for adaptive compression.
        average_buffers: average floating-point buffers across ranks at every sync.
        validate_on: ``"local"`` (this rank's replica) or ``"consensus"`` (the global parameters) for
            validation during fit.
        replica_size: processes per replica; ``None`` (default): the devices of one node when ``num_nodes > 1``,
            else 1. Inside a replica gradients are all-reduced every step (DDP on the replica's group); outer
            steps average pseudo-gradients across replicas. Must divide the world size.
        **kwargs: passed to Lightning's ``DDPStrategy``.

    Examples:
        >>> strategy = DiLoCoStrategy(inner_steps=100, outer_lr=0.7, outer_momentum=0.9)
        >>> x = DiLoCoStrategy(inner_steps=100, overlap=True, compressor="powersgd",
        ...                    compressor_options={"rank": 8}, adaptive_compression=True, fragments=4)
    """

    strategy_name = "diloco"
    outer_bucket_bytes: int = D.DEFAULT_BUCKET_BYTES

    def __init__(
        self,
        inner_steps: int = 500,
        outer_optimizer: str = "nesterov",
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        overlap: bool = False,
        compressor: str | Compressor | None = None,
        error_feedback: bool = True,
        adaptive_compression: bool = False,
        fragments: int = 1,
        compressor_options: dict[str, Any] | None = None,
        compression_bounds: tuple[float, float] | None = None,
        average_buffers: bool = True,
        validate_on: Literal["local", "consensus"] = "local",
        replica_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        D.check_diloco_args(inner_steps, outer_optimizer, outer_lr, outer_momentum, fragments)
        check_replica_size(replica_size)
        if validate_on not in VALIDATE_ON:
            raise ValueError(f"`validate_on` must be one of {VALIDATE_ON}, got validate_on={validate_on!r}.")
        self.compressor = _build_compressor(compressor, error_feedback, compressor_options)
        adaptable = hasattr(self.compressor, "rank") or hasattr(self.compressor, "density")
        if adaptive_compression and not adaptable:
            raise ValueError("`adaptive_compression=True` needs a PowerSGD or top-k compressor (it adapts the rank "
                             f"or density), got compressor={compressor!r}.")
        super().__init__(**local_ddp_kwargs(kwargs, "DiLoCoStrategy"))
        self.average_buffers = average_buffers
        self.validate_on = validate_on
        self._replica_size_arg = replica_size
        self.inner_steps = inner_steps
        self.outer_optimizer = outer_optimizer
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.overlap = overlap
        self.adaptive_compression = adaptive_compression
        self.fragments = fragments
        name = compressor if isinstance(compressor, str) else getattr(self.compressor, "name", "")
        self.compression_bounds = compression_bounds or DEFAULT_BOUNDS.get(str(name).lower(), (1.0, 64.0))
        self.rounds = 0
        self._fragments: list[_Fragment] = []
        self._overlap_comm: Communicator | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_relative_error = 0.0

    # ------------------------------------------------------------------ set-up

    def _check_supported(self, trainer: pl.Trainer) -> None:
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"DiLoCoStrategy supports exactly one (inner) optimizer, got {len(self.optimizers)}."
            )

    def _build_state(self) -> None:
        if not self._fragments:
            self._build_fragments()

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.overlap and self.comm.active and self._overlap_comm is None:
            # Dedicated groups, so background averages never interleave with the main thread's collectives.
            for ranks in self._cross_rank_lists:
                group = dist.new_group(ranks, backend=dist.get_backend())
                if self.global_rank in ranks:
                    self._overlap_comm = Communicator(group, ledger=self.comm.ledger, overlapped=True,
                                                      link=self.comm.link, device=self.root_device)

    def _build_fragments(self, names: list[list[str]] | None = None) -> None:
        """One fragment per group of trainable parameters; ``names``: the groups a checkpoint was written with."""
        if names is None:
            named = list(self._named_trainable_params())
            groups = D.split_fragments([p.numel() for _, p in named], self.fragments)
        else:
            assert self.lightning_module is not None
            by_name = dict(self.lightning_module.named_parameters())
            named = [(n, by_name[n]) for group in names for n in group]
            sizes = [len(group) for group in names]
            groups = [list(range(sum(sizes[:f]), sum(sizes[:f + 1]))) for f in range(len(sizes))]
        self._fragments = []
        pin = any(p.is_cuda for _, p in named)
        for f, indices in enumerate(groups):
            params = [named[i][1] for i in indices]
            global_params = [_cpu_copy(p, pin) for p in params]
            outer = torch.optim.SGD(global_params, lr=self.outer_lr, momentum=self.outer_momentum,
                                    nesterov=self.outer_optimizer == "nesterov" and self.outer_momentum > 0)
            self._fragments.append(_Fragment(
                names=[named[i][0] for i in indices], params=params, global_params=global_params, outer=outer,
                next_sync=D.first_sync_step(f, self.inner_steps, self.fragments),
                start=[p.detach().clone() for p in params] if self.overlap else None,
                synced={named[i][0] for i in indices},
            ))

    def _hook_allreduces(self) -> bool:
        return self.replica_comm is not None

    def _hook_comm(self) -> Communicator:
        return self.replica_comm if self.replica_comm is not None else self.world_comm

    def _comms(self) -> list[Communicator]:
        return super()._comms() + ([self._overlap_comm] if self._overlap_comm is not None else [])

    # ------------------------------------------------------------------ syncing

    def _after_optimizer_step(self) -> None:
        synced = False
        for f, frag in enumerate(self._fragments):
            if self.optimizer_steps == frag.next_sync:
                self._sync(frag, f)
                frag.next_sync += self.inner_steps
                synced = True
        if synced:
            self._average_buffers()

    def _average_buffers(self) -> None:
        if not self.average_buffers:
            return
        assert self.lightning_module is not None
        buffers = [b for b in self.lightning_module.buffers() if b.is_floating_point()]
        with torch.no_grad():  # DDP leaves buffers local to every rank, inside a replica too: average over all
            all_reduce_mean_coalesced_(buffers, self.world_comm, tag="buffers")

    def _sync(self, frag: _Fragment, index: int) -> None:
        self.rounds += 1
        with torch.no_grad():
            if self.overlap:
                self._sync_overlapped(frag, index)
            elif self.adaptive_compression:  # the adaptation measures the error over the whole fragment
                indices = self._round_indices(frag)
                if indices:
                    delta = [frag.global_params[i].to(frag.params[i].device) - frag.params[i].float() for i in indices]
                    self._outer_update(frag, indices, self._average(delta, [frag.names[i] for i in indices],
                                                                    self.comm))
                for p, g in zip(frag.params, frag.global_params):
                    p.copy_(g.to(p.device, p.dtype))
                self._release_retired(frag)
            else:
                self._bucketed_outer_step(frag)

    def _round_indices(self, frag: _Fragment) -> list[int]:
        """The fragment's parameters this sync sends: the trainable ones, and those frozen since the last sync.

        A parameter frozen during a round (``requires_grad`` switched off, e.g. by GradES) still holds each rank's
        progress of that round: it is sent one last time and applied as a plain average (no outer optimizer,
        its momentum dropped, see :meth:`_outer_update`); after that every rank and the global copy hold the
        same value and it leaves the payload and the outer step. Records the trainable set for the next sync.
        """
        indices = [i for i, (n, p) in enumerate(zip(frag.names, frag.params)) if p.requires_grad or n in frag.synced]
        frag.synced = {n for n, p in zip(frag.names, frag.params) if p.requires_grad}
        return indices

    def _release_retired(self, frag: _Fragment) -> None:
        """Drop the error-feedback state of the fragment's parameters that have left the payload."""
        if self.compressor is None:
            return
        retired = [n for n, p in zip(frag.names, frag.params) if not p.requires_grad and n not in frag.synced]
        if any(n in store for n in retired for store in error_feedback_stores(self.compressor)):
            self._finish_pending()  # another fragment's background average may be reading the compressor's state
            drop_error_feedback(self.compressor, retired)

    def _release_frozen(self) -> None:
        pass  # a frozen parameter leaves DiLoCo's payload at its last sync (`_round_indices`), not at once

    def _bucketed_outer_step(self, frag: _Fragment) -> None:
        """Average and apply the pseudo-gradients bucket by bucket (``outer_bucket_bytes`` of fp32 at a time).

        Trainable parameters take the outer optimizer's step; parameters frozen since the last sync a plain
        average (an outer SGD step with learning rate 1 and no momentum), after which their momentum is dropped.
        """
        indices = self._round_indices(frag)
        live = [i for i in indices if frag.params[i].requires_grad]
        retiring = [i for i in indices if not frag.params[i].requires_grad]
        for subset in (live, retiring):
            if not subset:
                continue
            names = [frag.names[i] for i in subset]
            globals_ = [frag.global_params[i] for i in subset]
            outer = frag.outer if subset is live else torch.optim.SGD(globals_, lr=1.0)

            def average_(flat: Tensor, views: list[Tensor], positions: list[int], names: list[str] = names) -> None:
                if self.compressor is None:
                    self.comm.all_reduce_(flat, op="mean", tag="pseudo_grad")
                else:
                    self.compressor.reduce_(views, [names[i] for i in positions], self.comm, tag="pseudo_grad")

            D.bucketed_outer_step_([frag.params[i] for i in subset], globals_, outer, average_,
                                   self.outer_bucket_bytes)
        for i in retiring:
            frag.outer.state.pop(frag.global_params[i], None)
        if self.compressor is not None:
            self.compressor.end_iteration()
        self._release_retired(frag)

    def _sync_overlapped(self, frag: _Fragment, index: int) -> None:
        assert frag.start is not None
        progress = D.pseudo_gradients(frag.start, frag.params)
        if frag.pending is not None:
            self._outer_update(frag, frag.pending.indices, frag.pending.wait())
            frag.pending = None
        self._release_retired(frag)  # the last average that used their residuals has just been waited for
        indices = self._round_indices(frag)
        frag.pending = self._start_average([progress[i].clone() for i in indices], frag, indices) if indices else None
        for p, g, d, s in zip(frag.params, frag.global_params, progress, frag.start):
            p.copy_((g.to(p.device) - d).to(p.dtype))
            s.copy_(p)

    def _average(self, tensors: list[Tensor], names: list[str], comm: Communicator) -> list[Tensor]:
        if self.compressor is None:
            all_reduce_mean_coalesced_(tensors, comm, tag="pseudo_grad")
            return tensors
        inputs = [t.clone() for t in tensors] if self.adaptive_compression else None
        residuals_before = {n: r.clone() for n, r in self.compressor.residuals.items()} if inputs else {}
        self.compressor.reduce_(tensors, names, comm, tag="pseudo_grad")
        self.compressor.end_iteration()
        if inputs is not None:
            compensated = [i + residuals_before.get(n, torch.zeros_like(i)) for i, n in zip(inputs, names)]
            residuals = [self.compressor.residuals.get(n, torch.zeros_like(i)) for i, n in zip(inputs, names)]
            self._adapt([c - r for c, r in zip(compensated, residuals)], compensated, comm)
        return tensors

    def _start_average(self, tensors: list[Tensor], frag: _Fragment, indices: list[int]) -> _Pending:
        comm = self._overlap_comm or self.comm
        comm.step = self.optimizer_steps
        if self.compressor is None:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            views = list(torch.split(flat, [t.numel() for t in tensors]))
            views = [v.view_as(t) for v, t in zip(views, tensors)]
            work = comm.all_reduce_async(flat, tag="pseudo_grad") if comm.active else None
            return _Pending(views, indices, flat=flat, work=work, world=comm.world_size)
        if self._executor is None:
            # One worker: background averages (of several fragments) run in submission order, the same on
            # every rank, so their collectives never interleave.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-average")
        # The worker records into a ledger of its own, merged into the strategy's when the round is waited for.
        records = CommLedger()
        worker_comm = Communicator(comm.group, ledger=records, overlapped=True, link=comm.link, device=comm.device,
                                   check_devices=comm.check_devices)
        worker_comm.step = comm.step
        names = [frag.names[i] for i in indices]
        future = self._executor.submit(self._average_in_background, tensors, names, worker_comm)
        return _Pending(tensors, indices, future=future, records=records, ledger=comm.ledger)

    def _average_in_background(self, tensors: list[Tensor], names: list[str], comm: Communicator) -> list[Tensor]:
        with strict_collectives(comm.check_devices), torch.no_grad():  # thread-local: set again in the worker
            return self._average(tensors, names, comm)

    def _outer_update(self, frag: _Fragment, indices: list[int], averaged: list[Tensor]) -> None:
        """Apply averaged pseudo-gradients: the outer optimizer's step for trainable parameters, a plain average
        (``global -= delta``) for frozen ones, whose outer momentum is dropped."""
        for i, d in zip(indices, averaged):
            g = frag.global_params[i]
            if frag.params[i].requires_grad:
                g.grad = d.detach().to(g.device, torch.float32)
            else:
                g.sub_(d.detach().to(g.device, torch.float32))
                frag.outer.state.pop(g, None)
        frag.outer.step()
        frag.outer.zero_grad(set_to_none=True)

    def _adapt(self, approx: list[Tensor], compensated: list[Tensor], comm: Communicator) -> None:
        error = torch.tensor([D.relative_error(compensated, approx)], device=comm.device)
        comm.all_reduce_(error, op="mean", tag="control")
        self._last_relative_error = float(error)
        level = D.adapt_level(self.compressor_level, self._last_relative_error, *ADAPTIVE_THRESHOLDS,
                              bounds=self.compression_bounds)
        self.compressor_level = level

    @property
    def compressor_level(self) -> float:
        return float(self.compressor.level) if self.compressor is not None else 1.0

    @compressor_level.setter
    def compressor_level(self, level: float) -> None:
        compressor: Any = self.compressor
        if hasattr(compressor, "rank"):
            compressor.rank = round(level)
        elif hasattr(compressor, "density"):
            compressor.density = float(level)

    def _extra_metrics(self) -> dict[str, float]:
        metrics = {"diloco/rounds": float(self.rounds)}
        if self.compressor is not None:
            metrics["diloco/compression_level"] = self.compressor_level
            if self.adaptive_compression:
                metrics["diloco/compression_error"] = self._last_relative_error
        return metrics

    # ------------------------------------------------------------------ end of fit and evaluation

    def _final_sync(self) -> None:
        if not self._fragments:
            return
        self._finish_pending()  # no background round may touch the compressor while the final rounds run
        for frag in self._fragments:
            self._final_sync_fragment(frag)
        self._average_buffers()

    def _final_sync_fragment(self, frag: _Fragment) -> None:
        round_start = max(0, frag.next_sync - self.inner_steps)  # the step this fragment's round began at
        if frag.pending is not None:
            self._outer_update(frag, frag.pending.indices, frag.pending.wait())
            frag.pending = None
        if self.optimizer_steps > round_start:
            self.rounds += 1
            self.comm.step = self.optimizer_steps
            if frag.start is None and not self.adaptive_compression:
                self._bucketed_outer_step(frag)  # the same bucketed step as every other sync
            else:
                origin = frag.start if frag.start is not None else [g.to(p.device) for g, p in
                                                                    zip(frag.global_params, frag.params)]
                indices = self._round_indices(frag)
                if indices:
                    progress = D.pseudo_gradients([origin[i] for i in indices], [frag.params[i] for i in indices])
                    self._outer_update(frag, indices, self._average(progress, [frag.names[i] for i in indices],
                                                                    self.comm))
        for p, g in zip(frag.params, frag.global_params):
            p.copy_(g.to(p.device, p.dtype))
        if frag.start is not None:
            for s, p in zip(frag.start, frag.params):
                s.copy_(p)

    def _swap_in_consensus(self) -> None:
        names = [n for frag in self._fragments for n in frag.names]
        if not names:
            return
        self._keep_local(names)
        for frag in self._fragments:
            for p, g in zip(frag.params, frag.global_params):
                p.copy_(g.to(p.device, p.dtype))

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._finish_pending()  # Lightning reads the module first when it builds a checkpoint
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self._finish_pending()  # an in-flight round would otherwise tear the compressor state from the average
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def teardown(self) -> None:
        if self._executor is not None:
            self._finish_pending()
            self._executor.shutdown(wait=True)
            self._executor = None
        super().teardown()

    def global_state_dict(self) -> dict[str, Tensor]:
        """The consensus (global) parameters by name, fp32 on the CPU."""
        return {n: g for frag in self._fragments for n, g in zip(frag.names, frag.global_params)}

    # ------------------------------------------------------------------ checkpointing

    def _finish_pending(self) -> None:
        for frag in self._fragments:
            if frag.pending is not None:
                frag.pending = _Pending(frag.pending.wait(), frag.pending.indices)

    def _shared_state(self) -> dict[str, Any]:
        self._finish_pending()
        return {
            "rounds": self.rounds,
            "level": self.compressor_level,
            "fragments": [
                {"names": list(frag.names), "global": frag.global_params, "outer": frag.outer.state_dict(),
                 "next_sync": frag.next_sync,
                 "pending": frag.pending.wait() if frag.pending is not None else None,
                 "pending_indices": frag.pending.indices if frag.pending is not None else None,
                 "synced": sorted(frag.synced)}
                for frag in self._fragments
            ],
        }

    def _load_shared_state(self, state: dict[str, Any]) -> None:
        if len(state["fragments"]) != len(self._fragments):
            raise ValueError(f"DiLoCoStrategy: the checkpoint has {len(state['fragments'])} fragments, this run "
                             f"{len(self._fragments)}; resume with the same `fragments`.")
        saved_names = [saved.get("names") for saved in state["fragments"]]
        if all(saved_names) and saved_names != [frag.names for frag in self._fragments]:
            # the parameters trainable at set-up differ from the run that wrote the checkpoint (a module whose
            # matrices GradES froze, fitted again): the checkpoint's groups are the ones its state belongs to
            self._check_known(saved_names)
            self._build_fragments(saved_names)
        self.rounds = int(state["rounds"])
        if self.compressor is not None:
            self.compressor_level = float(state["level"])
        for frag, saved in zip(self._fragments, state["fragments"]):
            for g, s in zip(frag.global_params, saved["global"]):
                g.copy_(s)
            frag.outer.load_state_dict(saved["outer"])
            frag.next_sync = int(saved["next_sync"])
            if "synced" in saved:  # older checkpoints: every parameter of the fragment trainable
                frag.synced = set(saved["synced"])
            frag.pending = None
            if saved["pending"] is not None:
                indices = saved.get("pending_indices") or list(range(len(frag.params)))
                frag.pending = _Pending([t.clone() for t in saved["pending"]], list(indices))

    def _check_known(self, groups: list[list[str]]) -> None:
        assert self.lightning_module is not None
        known = dict(self.lightning_module.named_parameters())
        unknown = [n for group in groups for n in group if n not in known]
        if unknown:
            raise ValueError(f"DiLoCoStrategy: the checkpoint holds global parameters {unknown[:5]} that this module "
                             "does not have; resume with the module that wrote it.")

    def _rank_state(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        state: dict[str, Any] = {
            "module": self._local_module_state(),
            "optimizer_states": [opt.state_dict() for opt in self.optimizers],
            **self._precision_rank_state(),
        }
        if self.overlap:
            state["starts"] = [frag.start for frag in self._fragments]
        if self.compressor is not None:
            state["compressor"] = self.compressor.state_dict()
        return state

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        if "starts" in state:
            for frag, starts in zip(self._fragments, state["starts"]):
                assert frag.start is not None
                for s, saved in zip(frag.start, starts):
                    s.copy_(saved)
        if "compressor" in state and self.compressor is not None:
            self.compressor.load_state_dict(state["compressor"])


def _cpu_copy(p: Tensor, pin: bool) -> Tensor:
    copy = p.detach().to("cpu", torch.float32, copy=True)
    return copy.pin_memory() if pin else copy


def _build_compressor(compressor: str | Compressor | None, error_feedback: bool,
                      options: dict[str, Any] | None) -> Compressor | None:
    if compressor is None:
        if options:
            raise ValueError("`compressor_options` given without a `compressor`.")
        return None
    if isinstance(compressor, Compressor):
        return compressor
    if not isinstance(compressor, str) or compressor.lower() not in COMPRESSORS:
        raise ValueError(f"`compressor` must be None, a Compressor or one of {sorted(COMPRESSORS)}, got "
                         f"compressor={compressor!r}.")
    opts = dict(options or {})
    if compressor.lower() not in ("fp16", "bf16"):
        opts.setdefault("error_feedback", error_feedback)
    return get_compressor(compressor, **opts)
