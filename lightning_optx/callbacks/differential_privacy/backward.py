"""The LightningModule's ``backward`` patched for the fit (ghost clipping's one-pass clipped sum; with gradient
accumulation, per-sample gradients of each sample's own loss), and the bookkeeping that undoes every patch.

:class:`BackwardPatching` is mixed into :class:`~lightning_optx.callbacks.DifferentialPrivacy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_optx.callbacks.differential_privacy import ghost

_MISSING = object()


def _grad_sample_entries(p: Any) -> int:
    """How many backward passes of the current optimizer step gave ``p`` per-sample gradients (Opacus keeps a tensor
    after the first, a list after more)."""
    samples = getattr(p, "grad_sample", None)
    return 0 if samples is None else len(samples) if isinstance(samples, list) else 1


class BackwardPatching:
    """Patches of the module's ``backward`` (state lives on the callback)."""

    grad_sample_mode: str
    _hooks: Any
    _dp_optimizer: Any
    _patched: list[tuple[object, str, Any]]
    _step_participants: frozenset[int] | None

    def _patch_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accumulate = trainer.accumulate_grad_batches
        original_backward = pl_module.backward
        if self.grad_sample_mode == "ghost":
            def ghost_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
                assert self._hooks is not None and self._dp_optimizer is not None
                ghost.ghost_backward(self._hooks, self._dp_optimizer.params, original_backward, loss * accumulate,
                                     *args, **kwargs)

            self._patch(pl_module, "backward", ghost_backward)
        elif accumulate > 1:
            # Lightning divides the loss by accumulate_grad_batches before backward; per-sample gradients must be
            # those of each sample's own loss, so undo it (the DP optimizer normalises once per optimizer step).
            names = {id(p): n for n, p in pl_module.named_parameters()}

            def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
                params = list(self._dp_optimizer.params) if self._dp_optimizer is not None else []
                before = [_grad_sample_entries(p) for p in params]
                original_backward(loss * accumulate, *args, **kwargs)
                self._check_same_parameters_every_micro_batch(params, before, names, accumulate)

            self._patch(pl_module, "backward", backward)

    def _check_same_parameters_every_micro_batch(self, params: list[Any], before: list[int], names: dict[int, str],
                                                 accumulate: int) -> None:
        """Opacus' per-sample gradients of one optimizer step are concatenated per parameter over its micro-batches;
        a parameter used in only some of them (a dynamic graph) cannot be aligned with the others' samples."""
        if not any(before):
            self._step_participants = None  # the first micro-batch of an optimizer step
        grew = frozenset(i for i, p in enumerate(params) if _grad_sample_entries(p) > before[i])
        if not grew:
            return  # no per-sample gradient at all (an empty micro-batch)
        if self._step_participants is None:
            self._step_participants = grew
        elif grew != self._step_participants:
            odd = sorted(names.get(id(params[i]), f"#{i}") for i in grew ^ self._step_participants)
            raise ValueError(
                f"DifferentialPrivacy(grad_sample_mode={self.grad_sample_mode!r}) with accumulate_grad_batches="
                f"{accumulate}: the parameters {', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''} got per-sample "
                "gradients in only some micro-batches of one optimizer step (a dynamic graph), so their per-sample "
                "gradients cannot be aligned with the other parameters' samples. Use grad_sample_mode='ghost' (which "
                "handles it), accumulate_grad_batches=1, or use every trainable parameter in every micro-batch."
            )

    def _patch(self, obj: object, name: str, fn: Callable[..., Any]) -> None:
        self._patched.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, fn)

    def _restore_patches(self) -> None:
        for obj, name, previous in reversed(self._patched):
            if previous is _MISSING:
                obj.__dict__.pop(name, None)  # the instance attribute goes; the class's method shows again
            else:
                obj.__dict__[name] = previous
        self._patched = []
