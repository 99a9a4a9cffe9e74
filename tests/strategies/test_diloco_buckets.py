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

    def _bucketed_outer_step(self, frag):
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


def _job(bucket_bytes: int | None, compressor: str | None = None) -> TrainJob:
    strategy = RecordingDiLoCo(inner_steps=2, compressor=compressor)
    if bucket_bytes is not None:
        strategy.outer_bucket_bytes = bucket_bytes
    return TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="adamw"), strategy=strategy,
                    trainer_kwargs={"max_steps": 6},
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
