"""Where the GPU suite runs, and how a :class:`~tests.helpers.TrainJob` is moved there.

The suite runs on CUDA when a GPU is present. Without one every test is skipped, unless
``LIGHTNING_OPTX_GPU_SUITE_ON_CPU=1`` is set: then the same test bodies run on the CPU (gloo instead of NCCL,
a CPU ``GradScaler`` for fp16, inductor's C++ backend), so that the suite's own logic is checked on a machine
without a GPU. What only a GPU can show (NCCL's device rules, CUDA RNG, ``FSDPStrategy``) is then skipped or
checked by its CPU stand-in, as each test says.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from tests.helpers import TrainJob

ON_CPU_ENV = "LIGHTNING_OPTX_GPU_SUITE_ON_CPU"
ON_CPU = os.environ.get(ON_CPU_ENV, "") not in ("", "0")
CUDA = torch.cuda.is_available() and not ON_CPU
DEVICE = torch.device("cuda" if CUDA else "cpu")
ACCELERATOR = "gpu" if CUDA else "cpu"
# One process on the GPU: NCCL. Two processes sharing the one GPU: NCCL refuses two ranks on the same device, so
# gloo serves the CUDA tensors, and registering it for "cuda" only leaves no backend for CPU tensors: a CPU
# tensor handed to any collective fails ("No backend type associated with device type cpu"), as under NCCL.
SINGLE_BACKEND = "nccl" if CUDA else "gloo"
SHARED_BACKEND = "cuda:gloo" if CUDA else "cpu:gloo"
# deterministic=True raises on an op without a deterministic CUDA kernel; "warn" still picks the deterministic
# kernels (and sets CUBLAS_WORKSPACE_CONFIG) and names the op if one has none, which a bit-exact test then shows.
DETERMINISTIC: bool | str = "warn" if CUDA else True

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (CUDA or ON_CPU),
                       reason=f"needs CUDA (or {ON_CPU_ENV}=1 to run the suite's self-check on the CPU)"),
]
only_on_cuda = pytest.mark.skipif(not CUDA, reason="checks something only a CUDA device has")


def fp16_plugin() -> MixedPrecision:
    """fp16 autocast with a real ``torch.amp.GradScaler`` (on the CPU too, where ``precision="16-mixed"`` is bf16)."""
    return MixedPrecision("16-mixed", DEVICE.type, scaler=torch.amp.GradScaler(DEVICE.type))


def precision_kwargs(precision: str) -> dict[str, Any]:
    """Trainer arguments for ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (fp16 with a GradScaler)."""
    if precision == "16-mixed":
        return {"plugins": [fp16_plugin()]}
    return {"precision": precision}


def on_device(job: TrainJob, precision: str = "32-true", **trainer_kwargs: Any) -> TrainJob:
    """``job`` on one device of the suite's kind, in ``precision``."""
    kwargs = {"accelerator": ACCELERATOR, "devices": 1, "deterministic": DETERMINISTIC,
              **precision_kwargs(precision), **job.trainer_kwargs, **trainer_kwargs}
    return dataclasses.replace(job, trainer_kwargs=kwargs)


def to_cpu(tree: Any) -> Any:
    """A nested state with every tensor on the CPU (to compare with a reference computed there)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def tensors_on(tree: Any, device_type: str) -> bool:
    """Whether every tensor of a nested state is on a device of type ``device_type``."""
    if isinstance(tree, torch.Tensor):
        return tree.device.type == device_type
    if isinstance(tree, dict):
        return all(tensors_on(v, device_type) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(tensors_on(v, device_type) for v in tree)
    return True
