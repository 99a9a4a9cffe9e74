"""A callback that snapshots parameters and another callback's state after every optimizer step."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class StepRecorder(Callback):
    """Records ``(global_step, params, state of the callbacks named in watch)`` after each training batch."""

    def __init__(self, watch: tuple[str, ...] = ()) -> None:
        self.watch = watch
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        states = {cb.state_key: copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks
                  if type(cb).__name__ in self.watch}
        self.records.append({
            "step": trainer.global_step,
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "states": states,
        })


def recorded_steps(trainer: pl.Trainer, module: pl.LightningModule) -> list[dict[str, Any]]:
    """``TrainJob.inspect`` hook: hand back the StepRecorder's records."""
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    return recorder.records
