"""Checkpoint and resume on one device: Grokfast, GradES, DropoutSchedule (CUDA RNG) and GradientSurgery, in fp32
and in fp16 with a real GradScaler (its scale is in the checkpoint too), bit for bit as on the CPU."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_optx import GradES, GradientSurgery, Grokfast
from lightning_optx.callbacks.dropout import LateDropout
from tests.gpu.common import StepProbe, assert_real_overflows, probe_records, variant
from tests.gpu.device import DEVICE, on_device, pytestmark, tensors_on  # noqa: F401  (pytestmark: marker, skip)
from tests.helpers import TrainJob, check_resume_equivalence
from tests.helpers.models import MultiTaskModule, TinyModule

RESUME_CASES = {
    "grokfast_ma": (TinyModule, [Grokfast("ma", window_size=6)], {"model": "transformer", "optimizer": "adamw"}),
    "grades": (TinyModule, [GradES(tau=0.5, tau_mode="relative", grace_fraction=0.3)],
               {"model": "transformer", "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1}),
    "late_dropout": (TinyModule, [LateDropout(p=0.4, cutoff=5)], {"model": "dropout_mlp", "optimizer": "adamw"}),
    "surgery_sam_gs": (MultiTaskModule, [GradientSurgery("sam_gs")], {"optimizer": "adamw", "lr": 1e-2}),
}


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_on_the_device_is_bit_exact(case, precision, tmp_path):
    """Lightning restores the checkpoint with its default map_location (each tensor where it was saved): the
    dropout masks (CUDA RNG), the GradScaler's scale and every callback's state continue bit for bit."""
    base, callbacks, kwargs = RESUME_CASES[case]
    module = functools.partial(variant(base, precision), **kwargs)
    job = on_device(TrainJob(module=module, callbacks=[StepProbe(), *callbacks], inspect=probe_records), precision)
    straight, resumed = check_resume_equivalence(job, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path))
    assert tensors_on(resumed[0].params, DEVICE.type)
    if precision == "16-mixed":  # the planned overflow (before the split) happened and was skipped
        assert_real_overflows(straight[0].inspected)
    assert all(torch.isfinite(p).all() for p in resumed[0].params.values())
