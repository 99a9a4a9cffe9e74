"""Clipping is exact in any precision: under bf16-mixed and bf16-true, with per-sample gradients built to sit just
above the bound (where bf16 arithmetic rounds their norm down to the bound and would let them through unclipped),
every clipped per-sample gradient has norm <= C to fp32 rounding, for the hooks and the ghost path."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("opacus")

from lightning_optx import DifferentialPrivacy
from lightning_optx.functional import privacy as P

pytestmark = [pytest.mark.filterwarnings("ignore:.*poisson_sampling=False.*"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

CLIP = 1.0
FP32_SLACK = 2e-6  # relative: fp32 rounding of a 16-term norm and of the factor, well below bf16's 4e-3


def near_bound_inputs(n: int = 16, dim: int = 16, seed: int = 0) -> Tensor:
    """bf16 vectors whose exact norm lies in (C, 1.004 C) while the norm computed in bf16 is <= C."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < n:
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        v = (v / v.norm() * CLIP * (1.0 + 0.004 * torch.rand((), generator=g, dtype=torch.float64))).bfloat16()
        exact = v.double().norm().item()
        if exact > CLIP and v.norm().item() <= CLIP:  # bf16 norm rounds down onto the bound
            rows.append(v)
    return torch.stack(rows)


class LinearProbe(pl.LightningModule):
    """``loss_i = w . x_i`` summed: sample i's gradient is exactly ``x_i`` (a bf16 vector), in every precision."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = x
        self.net = nn.Linear(x.shape[1], 1, bias=False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x.float()), batch_size=len(self.x))


class ClipRecorder(Callback):
    """The fp32 per-sample norms the DP step clipped with, and the weight before and after."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.before = pl_module.net.weight.detach().double().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        dp = next(cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy))
        if dp.grad_sample_mode == "ghost":
            self.norms = dp._hooks.per_sample_gradient_norms
        else:
            self.norms = dp._dp_optimizer.last_per_sample_norms
        self.after = pl_module.net.weight.detach().double().clone()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_every_clipped_per_sample_norm_is_within_the_bound_under_bf16(precision, mode):
    x = near_bound_inputs()
    exact = x.double().norm(dim=1)
    assert (exact > CLIP).all() and (x.norm(dim=1) <= CLIP).all()  # bf16 arithmetic would not clip them
    recorder = ClipRecorder()
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=CLIP, grad_sample_mode=mode, loss_reduction="sum",
                             poisson_sampling=False, accountant="rdp")
    trainer = pl.Trainer(callbacks=[cb, recorder], max_steps=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(LinearProbe(x))
    assert recorder.norms.dtype == torch.float32
    torch.testing.assert_close(recorder.norms.double(), exact, rtol=FP32_SLACK, atol=0.0)
    factors = P.clip_coefficients(recorder.norms, CLIP).double()
    clipped = factors * exact  # ||c_i x_i||, exactly
    assert clipped.max().item() <= CLIP * (1 + FP32_SLACK), clipped.max().item()
    if precision == "bf16-mixed":  # fp32 weights: the update is the clipped sum, to fp32 rounding
        expected = (factors[:, None] * x.double()).sum(0)
        torch.testing.assert_close((recorder.before - recorder.after)[0], expected, rtol=1e-5, atol=1e-6)


def test_functional_clipping_is_fp32_for_bf16_per_sample_gradients():
    x = near_bound_inputs(n=8, dim=12, seed=1)
    grad_samples = [x[:, :4].reshape(8, 2, 2), x[:, 4:]]
    norms = P.per_sample_norms(grad_samples)
    assert norms.dtype == torch.float32
    factors = P.clip_coefficients(norms, CLIP)
    assert factors.dtype == torch.float32 and (factors < 1).all()
    sums = P.clipped_sums(grad_samples, factors)
    assert all(s.dtype == torch.float32 for s in sums)
    clipped_norms = factors.double() * x.double().norm(dim=1)
    assert clipped_norms.max().item() <= CLIP * (1 + FP32_SLACK)
