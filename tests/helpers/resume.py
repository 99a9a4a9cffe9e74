"""Resume equivalence: N epochs straight vs k epochs, checkpoint, a fresh Trainer resumes to N.

The interrupted run is configured exactly like the straight one (same ``max_epochs``, so the same planned
number of steps, which schedules and grace periods depend on) and stopped after ``k`` epochs by a callback,
as a crash or a pre-emption would stop it.
"""

from __future__ import annotations

import dataclasses
import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from tests.helpers.compare import assert_tree_equal
from tests.helpers.runner import RankResult, TrainJob, run_job


class StopAfterEpoch(Callback):
    """Stops training at the end of epoch ``epochs`` (1-based), like an interruption between epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def check_resume_equivalence(
    job: TrainJob, total_epochs: int, split_epoch: int, tmp_dir: str, world_size: int = 1
) -> tuple[list[RankResult], list[RankResult]]:
    """Assert that stopping after ``split_epoch`` epochs and resuming gives the uninterrupted run bit for bit.

    Compares, on every rank, the parameters, buffers, optimizer state, every callback's ``state_dict`` and
    the global step. Returns ``(straight, resumed)`` for further assertions.
    """
    assert 0 < split_epoch < total_epochs
    ckpt = os.path.join(tmp_dir, "split.ckpt")

    kwargs = {**job.trainer_kwargs, "max_epochs": total_epochs}
    straight = run_job(dataclasses.replace(job, trainer_kwargs=kwargs), world_size)
    interrupted = dataclasses.replace(job, trainer_kwargs=kwargs, save_checkpoint_to=ckpt,
                                      callbacks=[*job.callbacks, StopAfterEpoch(split_epoch)])
    first = run_job(interrupted, world_size)
    assert os.path.exists(ckpt), "the first half wrote no checkpoint"
    resumed = run_job(dataclasses.replace(job, trainer_kwargs=kwargs, ckpt_path=ckpt), world_size)

    assert first[0].global_step < straight[0].global_step
    for s, r in zip(straight, resumed):
        assert s.global_step == r.global_step
        assert_tree_equal(s.params, r.params, f"rank {s.rank} parameters after resume")
        assert_tree_equal(s.buffers, r.buffers, f"rank {s.rank} buffers after resume")
        assert_tree_equal(s.optimizer_states, r.optimizer_states, f"rank {s.rank} optimizer state after resume")
        assert_tree_equal(s.callback_states, r.callback_states, f"rank {s.rank} callback state after resume")
    return straight, resumed
