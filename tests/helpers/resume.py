"""Resume equivalence: N epochs straight vs a run interrupted after k epochs, resumed by a fresh Trainer to N.

The interrupted run is configured exactly like the straight one (same ``max_epochs``, so the same planned
number of steps, which schedules and grace periods depend on). By default (``interrupt="crash"``) it resumes
from a checkpoint the *running* fit wrote, as after a crash or a pre-emption: a ``ModelCheckpoint`` with
``every_n_train_steps`` fires at the last batch of epoch ``k`` (in Lightning 2.6 such a checkpoint resumes
exactly under DDP; one written in ``on_train_epoch_end`` replays a batch, a mid-epoch one restarts the
epoch's loader). The run is then stopped; what it does when fit ends (the local strategies' final
synchronisation) happens after the checkpoint and does not reach the resumed run.

``interrupt="stop"`` instead stops the run after ``k`` epochs with a callback and saves with
``trainer.save_checkpoint`` after ``fit`` returns: only equivalent for methods that do nothing at the end of fit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

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
    job: TrainJob, total_epochs: int, split_epoch: int, tmp_dir: str, world_size: int = 1,
    interrupt: Literal["crash", "stop"] = "crash", num_nodes: int = 1,
) -> tuple[list[RankResult], list[RankResult]]:
    """Assert that interrupting after ``split_epoch`` epochs and resuming gives the uninterrupted run bit for bit.

    Compares, on every rank, the parameters, buffers, optimizer state, every callback's ``state_dict`` and
    the global step; ``num_nodes`` lays ``world_size`` processes out as that many nodes. Returns
    ``(straight, resumed)`` for further assertions.
    """
    assert 0 < split_epoch < total_epochs
    kwargs = {**job.trainer_kwargs, "max_epochs": total_epochs}
    straight = run_job(dataclasses.replace(job, trainer_kwargs=kwargs), world_size, num_nodes=num_nodes)
    if interrupt == "crash":
        steps_per_epoch, rest = divmod(straight[0].global_step, total_epochs)
        assert rest == 0, "every epoch must take the same number of optimizer steps"
        ckpt = os.path.join(tmp_dir, "split.ckpt")
        writer = ModelCheckpoint(dirpath=tmp_dir, filename="split", every_n_train_steps=steps_per_epoch * split_epoch,
                                 save_top_k=1)
        interrupted = dataclasses.replace(job, trainer_kwargs={**kwargs, "enable_checkpointing": True},
                                          callbacks=[*job.callbacks, writer, StopAfterEpoch(split_epoch)])
    else:
        ckpt = os.path.join(tmp_dir, "split.ckpt")
        interrupted = dataclasses.replace(job, trainer_kwargs=kwargs, save_checkpoint_to=ckpt,
                                          callbacks=[*job.callbacks, StopAfterEpoch(split_epoch)])
    first = run_job(interrupted, world_size, num_nodes=num_nodes)
    assert os.path.exists(ckpt), "the first half wrote no checkpoint"
    resumed = run_job(dataclasses.replace(job, trainer_kwargs=kwargs, ckpt_path=ckpt), world_size,
                      num_nodes=num_nodes)

    assert first[0].global_step < straight[0].global_step
    for s, r in zip(straight, resumed):
        assert s.global_step == r.global_step
        assert_tree_equal(s.params, r.params, f"rank {s.rank} parameters after resume")
        assert_tree_equal(s.buffers, r.buffers, f"rank {s.rank} buffers after resume")
        assert_tree_equal(s.optimizer_states, r.optimizer_states, f"rank {s.rank} optimizer state after resume")
        assert_tree_equal(s.callback_states, r.callback_states, f"rank {s.rank} callback state after resume")
    return straight, resumed
