"""Checkpoint and resume with 2 processes sharing the GPU over a ``cuda:gloo`` group (see test_strategies.py): every
strategy flag, with the split between two syncs, and GradES and DropoutSchedule under plain DDP; per-rank state
(residuals, local parameters and moments, RNG streams) goes through the checkpoint and comes back on the GPU, bit
for bit."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
from lightning.pytorch.strategies import DDPStrategy

from lightning_optx import DropoutSchedule, GradES
from tests.gpu.device import DEVICE, SHARED_BACKEND, on_device, tensors_on
from tests.gpu.test_strategies import FLAGS, GROUP_TIMEOUT, facts, flag_job, pytestmark, result, run_batch  # noqa: F401
from tests.helpers import TrainJob
from tests.helpers.models import TinyModule

CALLBACKS = {
    "grades": (functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1),
               lambda: [GradES(tau=0.5, tau_mode="relative", grace_fraction=0.3)], 4),
    "dropout": (functools.partial(TinyModule, model="dropout_mlp", optimizer="adamw", lr=1e-2),
                lambda: [DropoutSchedule("early", p=0.4, cutoff=0.5)], 3),
}


def callback_job(name: str) -> tuple[TrainJob, int]:
    module, callbacks, epochs = CALLBACKS[name]
    strategy = DDPStrategy(process_group_backend=SHARED_BACKEND, timeout=GROUP_TIMEOUT)
    job = TrainJob(module=module, callbacks=callbacks(), strategy=strategy, inspect=facts,
                   trainer_kwargs={"max_epochs": epochs, "num_nodes": 2})
    return on_device(job), epochs


@pytest.fixture(scope="module")
def resumed() -> Iterator[dict[str, list[Any]]]:
    adamw = functools.partial(TinyModule, model="wide_mlp", optimizer="adamw", lr=1e-2)
    specs: dict[str, tuple[str, Any]] = {}
    for name in CALLBACKS:  # plain DDP first, then the flags, least risky first (FLAGS' order)
        job, epochs = callback_job(name)
        specs[f"cb_{name}"] = ("resume", (job, epochs, epochs // 2))
    for f in FLAGS:
        specs[f] = ("resume", (flag_job(f, SHARED_BACKEND, shared=True, module=adamw, every=3), 3, 1))
    yield run_batch(specs, world_size=2)


@pytest.mark.parametrize("flag", FLAGS)
def test_resume_between_syncs_is_bit_exact(resumed, flag):
    """3 epochs of 4 steps straight vs 1 epoch, checkpoint, resume: the split (step 4) falls between syncs (every
    3 steps); per-rank state (residuals, local parameters and moments) goes through the checkpoint and comes back
    on the GPU."""
    ranks = result(resumed, flag)  # each rank already compared its straight and resumed run bit for bit
    for straight, again in ranks:
        [s], [r] = straight, again
        assert s.global_step == r.global_step == 12
        assert tensors_on(r.params, DEVICE.type)
        if flag != "diloco_x":  # under overlap the background average records its bytes whenever its thread runs,
            # so the total logged at a given step depends on timing (the state above is compared bit for bit)
            assert r.series("comm/bytes_total")[-1] == s.series("comm/bytes_total")[-1]


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_resume_under_ddp_is_bit_exact(resumed, name):
    ranks = result(resumed, f"cb_{name}")
    for straight, again in ranks:
        [s], [r] = straight, again
        assert s.global_step == r.global_step and tensors_on(r.params, DEVICE.type)
    [s0], _ = ranks[0]
    [s1], _ = ranks[1]
    assert all(s0.params[n].equal(s1.params[n]) for n in s0.params)
