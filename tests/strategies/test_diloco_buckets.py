"""DiLoCo in a Trainer with a tiny outer bucket: the same training as one bucket, with bounded buffers."""

from __future__ import annotations

import functools

import pytest

from lightning_optx import DiLoCoStrategy
from lightning_optx.functional import diloco as D
from tests.helpers import TrainJob, assert_tree_equal, run_job
from tests.helpers.models import TinyModule


class RecordingDiLoCo(DiLoCoStrategy):
    """Records the size of every flat pseudo-gradient buffer the outer step allocates."""

    largest_bucket = 0
    bucketed_steps = 0

    def _bucketed_outer_step(self, frag):
        self.bucketed_steps += 1
        real = D.bucketed_outer_step_

        def spy(*args, **kwargs):
            largest = real(*args, **kwargs)
            self.largest_bucket = max(self.largest_bucket, largest)
            return largest

        D.bucketed_outer_step_ = spy
        try:
            super()._bucketed_outer_step(frag)
        finally:
            D.bucketed_outer_step_ = real


def _job(bucket_bytes: int | None, compressor: str | None = None, max_steps: int = 6) -> TrainJob:
    strategy = RecordingDiLoCo(inner_steps=2, compressor=compressor)
    if bucket_bytes is not None:
        strategy.outer_bucket_bytes = bucket_bytes
    return TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="adamw"), strategy=strategy,
                    trainer_kwargs={"max_steps": max_steps},
                    inspect=lambda trainer, module: trainer.strategy.largest_bucket)


@pytest.mark.parametrize("compressor", [None, "sign"])
def test_small_buckets_train_exactly_like_one_bucket(compressor):
    (one,) = run_job(_job(None, compressor), world_size=1)
    (small,) = run_job(_job(4096, compressor), world_size=1)
    assert_tree_equal(one.params, small.params, "parameters")
    assert_tree_equal(one.optimizer_states, small.optimizer_states, "inner optimizer state")
    model_bytes = sum(4 * p.numel() for p in small.params.values())
    largest_tensor = max(4 * p.numel() for p in small.params.values())
    assert one.inspected == model_bytes  # everything in one bucket
    assert small.inspected <= max(4096, largest_tensor) < model_bytes


def test_bucket_size_is_a_class_attribute_with_torchft_default():
    assert DiLoCoStrategy.outer_bucket_bytes == 32 * 2**20


def _bucketed_steps(trainer, module):
    return trainer.strategy.bucketed_steps, trainer.strategy.largest_bucket


def test_end_of_fit_partial_round_takes_the_bucketed_outer_step():
    """Fit stopping mid-round (step 5 of rounds of 2) ends with a bucketed outer step too, with bounded buffers."""
    import dataclasses

    one, small = (dataclasses.replace(_job(b, max_steps=5), inspect=_bucketed_steps) for b in (None, 4096))
    (one,) = run_job(one, world_size=1)
    (small,) = run_job(small, world_size=1)
    assert one.inspected[0] == small.inspected[0] == 3  # the syncs at steps 2 and 4, then the final one
    assert_tree_equal(one.params, small.params, "parameters")
    model_bytes = sum(4 * p.numel() for p in small.params.values())
    assert small.inspected[1] < model_bytes
