"""Step clocks and model facts shared by the schedule-driven callbacks (GradES, DropoutSchedule).

A schedule needs its clock and its planned length in one unit. Lightning's ``global_step`` counts
``optimizer.step()`` calls: under automatic optimization that is one per stepping batch, but under manual
optimization with two optimizers it is two per batch, while ``trainer.estimated_stepping_batches`` counts
batches. Both callbacks therefore count *rounds*: stepping batches (automatic: ``global_step``; manual: the
batches that stepped, Lightning's own logger step).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from torch import nn


def rounds_before_batch(trainer: pl.Trainer) -> int:
    """Optimizer-step rounds completed before the current batch (read in ``on_train_batch_start``)."""
    if trainer.lightning_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def rounds_after_batch(trainer: pl.Trainer) -> int:
    """Optimizer-step rounds completed including the current batch (read in ``on_train_batch_end``).

    Lightning increments its batches-that-stepped counter after ``on_train_batch_end``; ``global_step`` is
    incremented by the optimizer step itself, before it.
    """
    if trainer.lightning_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop._batches_that_stepped + 1


def planned_rounds(trainer: pl.Trainer) -> float:
    """The planned number of optimizer-step rounds (``inf`` for open-ended training).

    ``estimated_stepping_batches`` takes ``max_steps`` as a number of batches; under manual optimization
    ``max_steps`` bounds ``global_step``, which advances once per optimizer per batch. This assumes that every
    optimizer steps once per batch (the usual manual loop).
    """
    planned = trainer.estimated_stepping_batches
    module = trainer.lightning_module
    if module.automatic_optimization or trainer.max_steps == -1 or not math.isfinite(planned):
        return planned
    per_batch = max(1, len(trainer.optimizers))
    by_steps = math.ceil(trainer.max_steps / per_batch)
    batches = trainer.num_training_batches
    if trainer.max_epochs is None or trainer.max_epochs == -1 or not math.isfinite(batches):
        return by_steps
    return min(by_steps, int(batches) * max(trainer.max_epochs, 1))


def holds_compiled_module(root: nn.Module) -> bool:
    """Whether the LightningModule was compiled or holds a compiled submodule.

    Three ways to compile: ``torch.compile(lightning_module)`` (Lightning marks it with ``_compiler_ctx``), a
    submodule wrapped by ``torch.compile(submodule)`` (an ``OptimizedModule``), and a module compiled in place
    with ``module.compile()`` (it keeps its class and sets ``_compiled_call_impl``).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    if getattr(root, "_compiler_ctx", None) is not None:  # a LightningModule compiled with torch.compile(model)
        return True
    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in root.modules())
