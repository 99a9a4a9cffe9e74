"""Resume equivalence: N epochs straight vs k epochs, checkpoint, a fresh Trainer resumes to N."""

from __future__ import annotations

import dataclasses
import os

from tests.helpers.compare import assert_tree_equal
from tests.helpers.runner import RankResult, TrainJob, run_job


def check_resume_equivalence(
    job: TrainJob, total_epochs: int, split_epoch: int, tmp_dir: str, world_size: int = 1
) -> tuple[list[RankResult], list[RankResult]]:
    """Assert that stopping after ``split_epoch`` epochs and resuming gives the uninterrupted run bit for bit.

    Compares, on every rank, the parameters, buffers, optimizer state, every callback's ``state_dict`` and
    the global step. Returns ``(straight, resumed)`` for further assertions.
    """
    assert 0 < split_epoch < total_epochs
    ckpt = os.path.join(tmp_dir, "split.ckpt")

    def with_epochs(epochs: int, **changes: object) -> TrainJob:
        kwargs = {**job.trainer_kwargs, "max_epochs": epochs}
        return dataclasses.replace(job, trainer_kwargs=kwargs, **changes)  # type: ignore[arg-type]

    straight = run_job(with_epochs(total_epochs), world_size)
    first = run_job(with_epochs(split_epoch, save_checkpoint_to=ckpt), world_size)
    assert os.path.exists(ckpt), "the first half wrote no checkpoint"
    resumed = run_job(with_epochs(total_epochs, ckpt_path=ckpt), world_size)

    assert first[0].global_step < straight[0].global_step
    for s, r in zip(straight, resumed):
        assert s.global_step == r.global_step
        assert_tree_equal(s.params, r.params, f"rank {s.rank} parameters after resume")
        assert_tree_equal(s.buffers, r.buffers, f"rank {s.rank} buffers after resume")
        assert_tree_equal(s.optimizer_states, r.optimizer_states, f"rank {s.rank} optimizer state after resume")
        assert_tree_equal(s.callback_states, r.callback_states, f"rank {s.rank} callback state after resume")
    return straight, resumed
