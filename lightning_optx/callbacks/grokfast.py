"""Grokfast as a Lightning callback: amplify the slow component of the gradients."""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_optx.callbacks._per_rank import CallbackRankState, local_gradient_state, per_rank_key
from lightning_optx.compatibility import check_supported
from lightning_optx.functional import grokfast as F
from lightning_optx.functional.common import all_finite, global_norm

FilterName = Literal["ema", "ma"]
_FILTERS = ("ema", "ma")
_STATE_VERSION = 1


class Grokfast(Callback):
    """Accelerate grokking by amplifying the slow gradients (Lee et al., 2024).

    Before every optimizer step the callback passes each parameter's gradient through a low-pass filter
    and adds ``lamb`` times the filtered (slow) component back to it. It sees the gradients Lightning hands
    to ``on_before_optimizer_step``: unscaled under AMP and accumulated over micro-batches. Gradient clipping,
    which Lightning applies after this hook, clips the amplified gradient.

    Which gradients it filters depends on the strategy:

    - DDP (Lightning's ``ddp``) and compressed DDP (``ddp_powersgd``, ``ddp_topk``, ``ddp_sign``, ``ddp_fp16``,
      ``ddp_bf16``): the gradients averaged over the ranks (decompressed), the same on every rank, so every
      rank holds the same filter state; the checkpoint keeps rank 0's copy.
    - Local SGD, DiLoCo and DiLoCoX: each rank's own local gradients (the averaged ones during Local SGD's
      warm-up), so each rank holds its own filter, which is never averaged. Each rank's filter is saved and
      restored per rank (:func:`lightning_optx.checkpointing.per_rank_state`): rank 0's in the checkpoint,
      every other rank's in its own file beside it.

    Args:
        filter: ``"ema"`` (exponential moving average, the paper's Grokfast) or ``"ma"`` (moving average
            over the last ``window_size`` gradients, Grokfast-MA).
        alpha: EMA momentum in ``[0, 1)``; the paper uses 0.98. Ignored by ``"ma"``.
        lamb: amplification factor ``>= 0``; the paper uses 2.0 with EMA and 5.0 with MA.
        window_size: MA window length ``>= 1``. The MA filter stores ``window_size`` copies of the
            gradients (memory: ``window_size`` times the model). Ignored by ``"ema"``.
        warmup: MA only: leave the gradients untouched until the window is full.
        start_step: first optimizer step (``trainer.global_step``) at which the filter runs; before it the
            gradients are neither read nor changed.
        skip_nonfinite: if any gradient holds inf/NaN (an fp16 AMP step the grad scaler will skip), leave
            the gradients and the filter state untouched for this step.

    Examples:
        >>> import lightning as L
        >>> from lightning_optx import Grokfast
        >>> trainer = L.Trainer(callbacks=[Grokfast(filter="ema", alpha=0.98, lamb=2.0)],
        ...                     max_steps=10, logger=False, enable_checkpointing=False)
    """

    def __init__(
        self,
        filter: FilterName = "ema",
        alpha: float = 0.98,
        lamb: float = 2.0,
        window_size: int = 100,
        warmup: bool = True,
        start_step: int = 0,
        skip_nonfinite: bool = True,
    ) -> None:
        if filter not in _FILTERS:
            raise ValueError(f"`filter` must be one of {_FILTERS}, got filter={filter!r}.")
        F.check_ema_args(alpha, lamb)
        F.check_ma_args(window_size, lamb)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"`start_step` must be an integer >= 0, got start_step={start_step!r}.")
        self.filter = filter
        self.alpha = float(alpha)
        self.lamb = float(lamb)
        self.window_size = window_size
        self.warmup = bool(warmup)
        self.start_step = start_step
        self.skip_nonfinite = bool(skip_nonfinite)

        self.filtered_steps = 0
        self.skipped_nonfinite_steps = 0
        self._ema: dict[str, Tensor] = {}
        self._ring: dict[str, Tensor] = {}
        self._total: dict[str, Tensor] = {}
        self._ring_cursor: dict[str, tuple[int, int]] = {}  # name -> (count, position)
        self._names: dict[int, str] = {}
        self._warned_unnamed = False

    @property
    def state_key(self) -> str:
        # The settings that define what the saved state means (EMA: its momentum; MA: its window), so two
        # differently configured filters coexist. ``lamb`` only scales what is added back: a resume with
        # another ``lamb`` keeps the filter state.
        if self.filter == "ema":
            return self._generate_state_key(filter=self.filter, alpha=self.alpha)
        return self._generate_state_key(filter=self.filter, window_size=self.window_size)

    @property
    def _filter_only_state_key(self) -> str:
        """The key of checkpoints written before ``state_key`` held the filter's settings."""
        return self._generate_state_key(filter=self.filter)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_supported(self, trainer)
        # Before Lightning restores a checkpoint: each rank's own filter then replaces rank 0's (see the class).
        store = local_gradient_state(trainer)
        if store is not None:
            store.register(per_rank_key(self), CallbackRankState(self, trainer.strategy))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step < self.start_step:
            return
        names, grads = self._named_grads(optimizer)
        if not grads:
            return
        if self.skip_nonfinite and not all_finite(grads):
            self.skipped_nonfinite_steps += 1
            return
        norm = self._apply_ema(names, grads) if self.filter == "ema" else self._apply_ma(names, grads)
        self.filtered_steps += 1
        if norm is not None:
            pl_module.log("grokfast/slow_grad_norm", norm, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ filters

    def _apply_ema(self, names: list[str], grads: list[Tensor]) -> Tensor:
        """Filter in place; return the norm of the slow component."""
        for name, grad in zip(names, grads):
            state = self._ema.get(name)
            if state is None:
                self._ema[name] = F.init_ema([grad])[0]
            elif state.device != grad.device:
                self._ema[name] = state.to(grad.device)
        ema = [self._ema[n] for n in names]
        F.ema_filter_(grads, ema, self.alpha, self.lamb)
        return global_norm(ema)

    def _apply_ma(self, names: list[str], grads: list[Tensor]) -> Tensor | None:
        """Run the MA filter on groups of parameters that share a ring cursor (normally all of them).

        Returns the norm of the slow component (the window means), or None while warming up.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (name, grad) in enumerate(zip(names, grads)):
            if name not in self._ring:
                fresh = F.init_moving_average([grad], self.window_size)
                self._ring[name], self._total[name] = fresh.ring[0], fresh.total[0]
                self._ring_cursor[name] = (0, 0)
            elif self._ring[name].device != grad.device:
                self._ring[name] = self._ring[name].to(grad.device)
                self._total[name] = self._total[name].to(grad.device)
            groups.setdefault(self._ring_cursor[name], []).append(i)
        slow_norms: list[Tensor] = []
        for (count, position), members in groups.items():
            group_names = [names[i] for i in members]
            state = F.MovingAverageState(
                ring=[self._ring[n] for n in group_names],
                total=[self._total[n] for n in group_names],
                count=count,
                position=position,
            )
            amplified = F.moving_average_filter_([grads[i] for i in members], state, self.lamb, self.warmup)
            for n in group_names:
                self._ring_cursor[n] = (state.count, state.position)
            if amplified:
                slow_norms.append(global_norm(state.total) / state.count)
        return global_norm(slow_norms) if slow_norms else None

    def _named_grads(self, optimizer: Optimizer) -> tuple[list[str], list[Tensor]]:
        names: list[str] = []
        grads: list[Tensor] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._names.get(id(p))
                if name is None:
                    self._warn_unnamed()
                    continue
                names.append(name)
                grads.append(p.grad)
        return names, grads

    def _warn_unnamed(self) -> None:
        if not self._warned_unnamed:
            rank_zero_warn(
                "Grokfast: the optimizer holds parameters that are not parameters of the LightningModule;"
                " their gradients are not filtered."
            )
            self._warned_unnamed = True

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "filter": self.filter,
            "window_size": self.window_size,
            "filtered_steps": self.filtered_steps,
            "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
            # On the CPU: a multi-GPU resume would otherwise deserialise every rank's copy onto the saving
            # rank's device first. The filters move each tensor back to its parameter's device on first use.
            "ema": _on_cpu(self._ema),
            "ring": _on_cpu(self._ring),
            "total": _on_cpu(self._total),
            "ring_cursor": dict(self._ring_cursor),
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning looks the state up by `state_key` only (after this hook): an older checkpoint's state is
        # loaded here, so that the filter resumes instead of silently starting afresh.
        states = checkpoint.get("callbacks") or {}
        legacy = self._filter_only_state_key
        if self.state_key not in states and legacy in states:
            self.load_state_dict(copy.deepcopy(states[legacy]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("filter") != self.filter:
            raise ValueError(
                f"Grokfast: the checkpoint holds filter={state_dict.get('filter')!r} state but this callback"
                f" has filter={self.filter!r}; resume with the same filter."
            )
        if self.filter == "ma" and state_dict.get("window_size") != self.window_size:
            raise ValueError(
                f"Grokfast: the checkpoint's window_size={state_dict.get('window_size')!r} differs from"
                f" this callback's window_size={self.window_size}; resume with the same window_size."
            )
        self.filtered_steps = int(state_dict["filtered_steps"])
        self.skipped_nonfinite_steps = int(state_dict["skipped_nonfinite_steps"])
        self._ema = dict(state_dict["ema"])
        self._ring = dict(state_dict["ring"])
        self._total = dict(state_dict["total"])
        self._ring_cursor = {k: (int(c), int(p)) for k, (c, p) in state_dict["ring_cursor"].items()}


def _on_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # no copy for tensors already on the CPU: the checkpoint is serialised right away
    return {name: t.detach().cpu() for name, t in tensors.items()}
