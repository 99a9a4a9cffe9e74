"""Gradient surgery for multi-task learning (PCGrad, CAGrad, SAM-GS, GCond, sum, mean) as one callback."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn import Parameter
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_optx.callbacks._per_rank import CallbackRankState
from lightning_optx.callbacks._surgery_buffers import (
    common_dtype,
    disable_donated_buffers,
    flatten_into,
    restore_donated_buffers,
    unflatten_into_grads,
    width_of,
)
from lightning_optx.callbacks._surgery_sync import TaskGradientSync, sync_mode
from lightning_optx.checkpointing import per_rank_state
from lightning_optx.compatibility import check_supported
from lightning_optx.distributed import Communicator
from lightning_optx.functional import surgery as S

SharedSpec = nn.Module | Sequence[Parameter] | Sequence[str] | None


class GradientSurgery(Callback):
    """Combine per-task gradients of the shared parameters with a multi-task aggregation method.

    The LightningModule stays ordinary: its ``training_step`` returns a dict with ``"loss"`` and, under
    ``task_losses_key``, a dict ``{task name: scalar loss}``. For the duration of ``fit`` the callback takes
    over the module's ``backward``: instead of one backward pass of ``"loss"`` it runs one
    ``torch.autograd.grad`` per task (T backward passes over the shared trunk, each also reaching that task's
    own parameters), which is the minimum the methods need. Task-specific parameters (reached by one task)
    receive their own task's gradient unchanged; the shared ones (reached by several tasks, or given as
    ``shared``) receive the aggregate of the per-task gradients.

    Dynamic graphs: every step asks autograd for the gradient of every trainable parameter
    (``allow_unused``), so a parameter first reached later (a mixture-of-experts expert, a conditional head)
    is picked up at that step: it becomes task-specific, or shared (appended to the aggregated layout, its
    method state starting at zero) once two tasks have reached it. Trainable parameters no task reached at
    the first step are named in a warning. Under DDP the ranks agree on what was reached (one small
    all-reduce), so they keep the same layout. A shared parameter no task reached in an optimizer step keeps
    ``.grad = None``, as in plain training. The trainable parameters are read at every backward (gradual
    unfreezing is followed); while nothing is shared yet, the gradients pass through unchanged.
    ``training_step`` returning ``None`` skips the batch, as in Lightning (single device only: under DDP the
    ranks would disagree).

    Gradient accumulation: per-task gradients are summed over the micro-batches and aggregated once, at the
    last micro-batch of the optimizer step. AMP: the aggregation sees unscaled gradients and writes its result
    back in the loss scale, before the grad scaler unscales and checks for inf; a non-finite step leaves the
    method's state untouched and the scaler skips it.

    Strategies (DDP's own all-reduce is switched off; the bytes are logged as ``surgery/bytes_per_step``):

    - Lightning's DDP: each task's gradient (and every task-specific gradient) is averaged across ranks in one
      coalesced all-reduce before aggregation, so every rank applies the same update, equal to surgery on the
      global batch; ``T x shared + task-specific`` floats per step instead of DDP's ``all parameters``.
    - ``local_sgd``, ``diloco``, ``diloco_x``: surgery on each replica's own per-task gradients, with no
      cross-rank traffic between the strategy's syncs; where the strategy would average gradients at a step
      (Local SGD's warm-up: the world; node replicas: the replica) each task's gradient is averaged over that
      group first. The method's state then differs per rank and is checkpointed per rank.
    - compressed DDP (``ddp_powersgd``, ``ddp_topk``, ``ddp_sign``, ``ddp_fp16``, ``ddp_bf16``): each task's
      gradient goes through the strategy's compressor under its own keys (``"<task>/<parameter>"``, so its own
      error feedback), ``T x`` the strategy's payload for the shared parameters; every rank applies the same
      update. See ``docs/methods/gradient-surgery.md`` for the reasoning.

    ``"loss"`` is used for logging only: terms of it that are not task losses (a regulariser) are not
    optimised under surgery; make them a task, or add them to every task's loss.

    Args:
        method: ``"pcgrad"``, ``"cagrad"``, ``"sam_gs"``, ``"gcond"``, ``"sum"`` or ``"mean"``.
        task_losses_key: the key of the per-task loss dict in ``training_step``'s output.
        shared: the shared parameters: a module, a list of parameters or a list of regular expressions over
            parameter names; ``None`` finds them (those reached by more than one task loss).
        method_options: options of the method (CAGrad ``c``; SAM-GS ``gamma``, ``beta1``, ``beta2``; GCond
            settings; PCGrad ``seed``), see :mod:`lightning_optx.functional.surgery`. A dict, so that
            LightningCLI / YAML can set it (``init_args: {method: cagrad, method_options: {c: 0.4}}``).
        **kwargs: the same options as keywords (merged with ``method_options``; a key in both is an error).

    Examples:
        >>> from lightning_optx import GradientSurgery
        >>> cb = GradientSurgery("pcgrad")
        >>> cb = GradientSurgery("cagrad", method_options={"c": 0.4}, task_losses_key="losses")
        >>> cb = GradientSurgery("cagrad", c=0.4)
    """

    def __init__(self, method: str = "pcgrad", task_losses_key: str = "task_losses", shared: SharedSpec = None,
                 method_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if method not in S.METHODS:
            raise ValueError(f"`method` must be one of {S.METHODS}, got method={method!r}.")
        if not isinstance(task_losses_key, str) or not task_losses_key:
            raise ValueError(f"`task_losses_key` must be a non-empty string, got task_losses_key={task_losses_key!r}.")
        if method_options is not None and not isinstance(method_options, Mapping):
            raise ValueError(f"`method_options` must be a dict of the method's options or None, got "
                             f"method_options={method_options!r}.")
        both = sorted(set(method_options or {}) & set(kwargs))
        if both:
            raise ValueError(f"Options {both} are given both in `method_options` and as keywords; give each once.")
        self.method = method
        self.task_losses_key = task_losses_key
        self.shared_spec = shared
        self.method_options = {**(method_options or {}), **kwargs}
        self.aggregator = S.make_aggregator(method, **self.method_options)
        self.comm = Communicator()  # the callback's own group under Lightning's DDP
        self._sync = TaskGradientSync(self.comm)
        self.skipped_nonfinite_steps = 0

        self._task_names: list[str] | None = None
        self._trainable: list[tuple[str, Parameter]] = []
        self._shared: list[tuple[str, Parameter]] = []
        self._spec: set[int] = set()  # ids of the parameters `shared` names
        self._reached_shared: set[int] = set()  # shared parameters some task reached in this optimizer step
        self._saved_shared_names: list[str] | None = None  # the layout of a checkpoint, restored on resume
        # task-specific gradients of this optimizer step, per task, written to .grad when it is aggregated
        self._pending_specific: dict[int, tuple[str, Parameter, dict[int, Tensor]]] = {}
        self._task_losses: dict[str, Tensor] | None = None
        self._buffers: Tensor | None = None  # (T, n_shared), summed over micro-batches, in the loss scale
        self._last_micro_batch = True
        self._metrics: dict[str, float] = {}
        self._originals: dict[str, Callable[..., Any]] = {}
        self._trainer: pl.Trainer | None = None
        self._sync_bytes = 0
        self._donated_buffer: bool | None = None  # torch._functorch.config.donated_buffer before the fit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, task_losses_key=self.task_losses_key)

    # ------------------------------------------------------------------ set-up and tear-down

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported(self, trainer)
        if not pl_module.automatic_optimization:
            raise ValueError("GradientSurgery needs automatic optimization: it replaces the backward pass Lightning "
                             "runs; with manual optimization call `lightning_optx.functional.surgery` yourself.")
        strategy = trainer.strategy
        mode = sync_mode(strategy)
        if mode is None:
            raise ValueError(f"GradientSurgery supports single-device training, Lightning's DDPStrategy and "
                             f"lightning_optx's strategies, got {type(strategy).__name__}: it averages each task's "
                             "gradient across ranks itself.")
        self._sync.attach(strategy, mode)
        store = per_rank_state(trainer)
        if self._sync.per_rank and store is not None:  # local gradients: the method's state differs per rank
            store.register(f"GradientSurgery/{self.state_key}", CallbackRankState(self, strategy))
        self._disable_donated_buffers()

    def _disable_donated_buffers(self) -> None:
        if self._donated_buffer is None:
            self._donated_buffer = disable_donated_buffers()

    def _restore_donated_buffers(self) -> None:
        if self._donated_buffer is not None:
            restore_donated_buffers(self._donated_buffer)
            self._donated_buffer = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_donated_buffers()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._originals = {"training_step": pl_module.training_step, "backward": pl_module.backward}
        pl_module.training_step = self._capturing_training_step(pl_module.training_step)  # type: ignore[method-assign]
        pl_module.backward = self._per_task_backward  # type: ignore[method-assign]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(pl_module)
        self._restore_donated_buffers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)
        self._restore_donated_buffers()

    def _restore(self, pl_module: pl.LightningModule) -> None:
        for name in self._originals:
            pl_module.__dict__.pop(name, None)  # drop the instance attribute; the class method shows again
        self._originals = {}

    # ------------------------------------------------------------------ per micro-batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = False  # we average per-task gradients ourselves
        accumulate = trainer.accumulate_grad_batches
        is_last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        self._last_micro_batch = (batch_idx + 1) % accumulate == 0 or is_last_batch

    def _capturing_training_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = step(*args, **kwargs)
            if output is None:
                self._skip_batch()
                return None
            self._task_losses = self._validated_task_losses(output)
            return output

        return training_step

    def _skip_batch(self) -> None:
        """``training_step`` returned None: Lightning runs no backward. At the last micro-batch of an optimizer
        step, what earlier micro-batches accumulated is still aggregated, so it does not leak into the next."""
        assert self._trainer is not None
        if self._trainer.world_size > 1:
            raise ValueError("GradientSurgery: training_step returned None under DDP; skipping a batch on one "
                             "rank is not supported (the ranks would disagree on the gradient all-reduce).")
        self._task_losses = None
        if self._last_micro_batch and (self._buffers is not None or self._pending_specific):
            self._aggregate_into_grads()

    def _validated_task_losses(self, output: Any) -> dict[str, Tensor]:
        key = self.task_losses_key
        if not isinstance(output, dict) or key not in output:
            got = sorted(output) if isinstance(output, dict) else type(output).__name__
            raise ValueError(f"GradientSurgery: training_step must return a dict with 'loss' and {key!r} "
                             f"(a dict task name -> scalar loss); got {got}.")
        losses = output[key]
        if not isinstance(losses, dict) or len(losses) < 2:
            raise ValueError(f"GradientSurgery: output[{key!r}] must be a dict of at least 2 task losses, got "
                             f"{len(losses) if isinstance(losses, dict) else type(losses).__name__}.")
        for name, value in losses.items():
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"GradientSurgery: task loss {name!r} must be a scalar tensor, got {shape}.")
        if self._task_names is not None and list(losses) != self._task_names:
            raise ValueError(f"GradientSurgery: the tasks changed from {self._task_names} to {list(losses)}.")
        return dict(losses)

    def _per_task_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Replaces ``LightningModule.backward``: one ``autograd.grad`` per task instead of ``loss.backward()``.

        Each call asks for every parameter trainable now (``allow_unused``; the list is rebuilt at every
        backward, so unfreezing and re-freezing are followed): what a task reaches is what it gets a gradient
        for, so the shared/specific split follows the graph of every step. Each task's shared gradient is
        copied into its buffer row right after its ``autograd.grad`` call; only its task-specific gradients are
        kept, so at most one task's full gradient is alive at a time.
        """
        assert self._trainer is not None
        losses = self._task_losses
        if losses is None:
            raise RuntimeError("GradientSurgery: backward was called without a training_step output to split.")
        self._task_losses = None
        first = self._task_names is None
        if first:
            self._start(losses)
        module = self._trainer.lightning_module
        self._trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        scale = self._loss_scale() / self._trainer.accumulate_grad_batches
        params = [p for _, p in self._trainable]
        names = list(losses)
        shared_params = [p for _, p in self._shared]
        position = {id(p): k for k, p in enumerate(params)}
        shared_positions = [position.get(id(p)) for p in shared_params]  # None: frozen now
        shared_ids = {id(p) for p in shared_params}
        accumulate = self._buffers is not None
        if self._buffers is None and shared_params:
            self._buffers = torch.empty(len(names), width_of(shared_params), dtype=common_dtype(shared_params),
                                        device=shared_params[0].device)
        local_reached = torch.zeros(len(names), len(params), dtype=torch.float32, device="cpu")
        specific: list[dict[int, Tensor]] = []
        for t, name in enumerate(names):
            grads = torch.autograd.grad(losses[name].reshape(()) * scale, params,
                                        retain_graph=t < len(names) - 1, allow_unused=True)
            local_reached[t] = torch.tensor([g is not None for g in grads], dtype=torch.float32)
            if self._buffers is not None:
                flatten_into(self._buffers[t], [None if k is None else grads[k] for k in shared_positions],
                              shared_params, accumulate)
            specific.append({k: g for k, g in enumerate(grads) if g is not None and id(params[k]) not in shared_ids})
            del grads
        reached = self._agreed(local_reached)  # (T, P) bool, agreed by every rank
        if first:
            self._warn_unreached(reached)
        self._collect_specific(self._trainable, specific, reached, shared_ids)
        grown = self._update_shared(reached)
        if grown:
            self._grow_buffers(grown, len(names))
        hit = reached.any(dim=0).tolist()
        now_shared = {id(p) for _, p in self._shared}
        self._reached_shared |= {id(p) for k, p in enumerate(params) if hit[k] and id(p) in now_shared}
        if self._last_micro_batch:
            self._aggregate_into_grads()

    def _collect_specific(self, named: list[tuple[str, Parameter]], specific: Sequence[dict[int, Tensor]],
                          reached: Tensor, shared_ids: set[int]) -> None:
        """Keep each reached, non-shared parameter's gradient per task until the step is aggregated."""
        for k, (name, p) in enumerate(named):
            if id(p) in shared_ids or not bool(reached[:, k].any()):
                continue
            _, _, by_task = self._pending_specific.setdefault(id(p), (name, p, {}))
            for t, grads in enumerate(specific):
                g = grads.get(k)
                if g is None and bool(reached[t, k]):
                    g = torch.zeros_like(p)  # reached on another rank only: every rank all-reduces the same set
                if g is not None:
                    by_task[t] = g if t not in by_task else by_task[t] + g

    def _grow_buffers(self, grown: list[Parameter], num_tasks: int) -> None:
        """The layout grew: pad the buffers (or create them), and move what this and earlier micro-batches gave
        a newly shared parameter as a task-specific one into its task's row."""
        shared_params = [p for _, p in self._shared]
        width = width_of(shared_params)
        if self._buffers is None:
            self._buffers = torch.zeros(num_tasks, width, dtype=common_dtype(shared_params),
                                        device=shared_params[0].device)
            old = 0
        else:
            old = self._buffers.shape[1]
            self._buffers = torch.nn.functional.pad(self._buffers, (0, width - old))
        offset = old
        for p in grown:
            entry = self._pending_specific.pop(id(p), None)
            for t, g in (entry[2] if entry is not None else {}).items():
                self._buffers[t, offset : offset + p.numel()] += g.reshape(-1).to(self._buffers.dtype)
            offset += p.numel()

    # ------------------------------------------------------------------ once per optimizer step

    def _aggregate_into_grads(self) -> None:
        assert self._trainer is not None
        buffers, self._buffers = self._buffers, None
        reached, self._reached_shared = self._reached_shared, set()
        specific: list[tuple[str, Tensor]] = []
        for name, p, by_task in self._pending_specific.values():
            total = torch.stack(list(by_task.values())).sum(0) if len(by_task) > 1 else next(iter(by_task.values()))
            p.grad = total if p.grad is None else p.grad + total
            specific.append((name, p.grad))
        self._pending_specific = {}
        assert self._task_names is not None
        self._sync_bytes = self._sync.average_(buffers, self._task_names, self._shared, reached, specific)
        if buffers is None:  # nothing shared yet: the gradients passed through unchanged
            return
        scaler = self._scaler()
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        task_grads = buffers / scale if scaler is not None else buffers
        # Only a grad scaler (fp16) produces steps it will skip; elsewhere inf/NaN means divergence anyway.
        if scaler is not None and not bool(torch.isfinite(task_grads).all()):
            self.skipped_nonfinite_steps += 1  # the grad scaler skips this step; leave the method's state alone
            combined = buffers.sum(0)
        else:
            if self._trainer.global_step % int(getattr(self._trainer, "log_every_n_steps", 50)) == 0:
                self._metrics = self._surgery_metrics(task_grads)
            combined = self.aggregator(task_grads, self._trainer.global_step).to(buffers.dtype)
            if scaler is not None:
                combined = combined * scale
        # a shared parameter no task reached in this step keeps .grad None, as in plain training
        unflatten_into_grads(combined, [p for _, p in self._shared], reached)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        if self._metrics:
            pl_module.log_dict(self._metrics, on_step=True, on_epoch=False)
            self._metrics = {}

    def _surgery_metrics(self, task_grads: Tensor) -> dict[str, float]:
        """Computed only on steps the logger writes (``log_every_n_steps``): one float32 T x T product."""
        rate, norm_tensor = S.conflict_stats(task_grads)
        norms = norm_tensor.tolist()
        metrics = {"surgery/conflict_rate": float(rate)}
        assert self._task_names is not None
        metrics.update({f"surgery/grad_norm/{n}": float(v) for n, v in zip(self._task_names, norms)})
        metrics["surgery/bytes_per_step"] = float(self._sync_bytes)
        return metrics

    def _scaler(self) -> Any:
        """The enabled grad scaler (fp16), or None. Not ``scale != 1``: a scale can reach exactly 1.0."""
        assert self._trainer is not None
        scaler = getattr(self._trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self) -> float:
        scaler = self._scaler()
        return float(scaler.get_scale()) if scaler is not None else 1.0

    # ------------------------------------------------------------------ which parameters are shared

    def _start(self, losses: dict[str, Tensor]) -> None:
        """First backward of the fit: the trainable parameters, and the shared ones given by ``shared`` or by a
        restored checkpoint (otherwise they are discovered step by step, :meth:`_update_shared`)."""
        assert self._trainer is not None and self._trainer.lightning_module is not None
        module = self._trainer.lightning_module
        self._task_names = list(losses)
        by_name = dict(module.named_parameters())
        if self.shared_spec is not None:
            self._spec = self._spec_ids(list(by_name.items()))
            if not self._spec:
                raise ValueError("GradientSurgery found no shared parameter: `shared` matched none of the "
                                 "module's parameters.")
        elif self._saved_shared_names is not None:
            missing = [n for n in self._saved_shared_names if n not in by_name]
            if missing:
                raise ValueError(f"GradientSurgery: the checkpoint's shared parameters {missing} are not "
                                 "parameters of this module.")
            self._shared = [(n, by_name[n]) for n in self._saved_shared_names]

    def _agreed(self, local: Tensor) -> Tensor:
        """``reached[t, k]``: task ``t`` reached trainable parameter ``k``, on this rank or on any rank whose
        gradients are averaged with this rank's at this step."""
        return self._sync.agree_any_(local)

    def _update_shared(self, reached: Tensor) -> list[Parameter]:
        """Append the parameters reached by two tasks for the first time (discovery mode), or those of ``shared``
        trainable for the first time, to the layout; returns them. While the layout is empty (nothing shared
        yet, e.g. a frozen trunk), every gradient passes through unchanged."""
        known = {id(p) for _, p in self._shared}
        if self.shared_spec is None:
            counts = reached.sum(dim=0).tolist()
            new = [(n, p) for (n, p), c in zip(self._trainable, counts) if c > 1 and id(p) not in known]
        else:  # given: those trainable now (a frozen part of `shared` joins the layout when it is unfrozen)
            new = [(n, p) for n, p in self._trainable if id(p) in self._spec and id(p) not in known]
        if new and self._shared:
            self.aggregator.grow(sum(p.numel() for _, p in new))
        self._shared += new
        return [p for _, p in new]

    def _warn_unreached(self, reached: Tensor) -> None:
        unreached = [n for (n, _), hit in zip(self._trainable, reached.any(dim=0).tolist()) if not hit]
        if unreached:
            rank_zero_warn(
                f"GradientSurgery: no task loss reached the trainable parameters {unreached} at the first step; "
                "they get no gradient until a task reaches them (they are picked up then)."
            )

    def _spec_ids(self, named: list[tuple[str, Parameter]]) -> set[int]:
        spec = self.shared_spec
        if isinstance(spec, nn.Module):
            return {id(p) for p in spec.parameters()}
        items = list(spec or [])
        if all(isinstance(s, str) for s in items):
            patterns = [re.compile(s) for s in items]
            return {id(p) for n, p in named if any(pat.search(n) for pat in patterns)}
        return {id(p) for p in items}

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"aggregator": self.aggregator.state_dict(), "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
                "shared": [n for n, _ in self._shared]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state_dict["aggregator"])
        self.skipped_nonfinite_steps = int(state_dict["skipped_nonfinite_steps"])
        if self.shared_spec is None and state_dict.get("shared"):
            self._saved_shared_names = list(state_dict["shared"])
