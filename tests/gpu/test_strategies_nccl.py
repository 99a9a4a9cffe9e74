"""Every strategy flag with world size 1 on NCCL, in one spawned process (see test_strategies.py; a file of its
own so that pytest-xdist runs it beside the 2-process batches)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.gpu.device import DEVICE, SINGLE_BACKEND
from tests.gpu.test_strategies import FLAGS, WIDE, flag_job, pytestmark, result, run_batch  # noqa: F401


@pytest.fixture(scope="module")
def single() -> Iterator[dict[str, list[Any]]]:
    yield run_batch({flag: ("fit", flag_job(flag, SINGLE_BACKEND, shared=False)) for flag in FLAGS}, world_size=1)


@pytest.mark.parametrize("flag", FLAGS)
def test_world_size_one_on_nccl(single, flag):
    [r] = result(single, flag)
    assert r.global_step == 16
    assert r.inspected["device"].startswith(DEVICE.type) and r.inspected["optimizer_on_device"]
    assert all(torch.isfinite(p).all() for p in r.params.values())
    pl.seed_everything(7, verbose=False)  # the runner's seed: the initial parameters
    initial = dict(WIDE().named_parameters())
    assert any(not torch.equal(p.cpu(), initial[n].detach()) for n, p in r.params.items())
    if flag == "diloco":  # one rank: after each sync (16 = 4 x 4) it continues from the global parameters
        for n, g in r.inspected["global"].items():
            torch.testing.assert_close(g.float().cpu(), r.params[n].float().cpu(), rtol=1e-5, atol=1e-6)
