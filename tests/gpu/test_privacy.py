"""DifferentialPrivacy on one GPU: fp16 (GradScaler) refused, and under bf16-mixed and torch.compile (inductor)
every per-sample gradient is clipped to max_grad_norm and epsilon is the accountant's for the steps taken."""

from __future__ import annotations

import functools
import math

import pytest

pytest.importorskip("opacus")

from lightning_optx.callbacks.differential_privacy import DifferentialPrivacy
from lightning_optx.functional import privacy as P
from tests.callbacks.test_differential_privacy import DP_KEY, Capture, DPModule, captured, update_of
from tests.gpu.common import register_variants, trainer_precision, variant
from tests.gpu.device import DEVICE, on_device, pytestmark, tensors_on
from tests.helpers import TrainJob, run_job

pytestmark = [*pytestmark, pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Optimal order is the"),
              pytest.mark.filterwarnings("ignore:.*poisson_sampling=False.*")]

register_variants(DPModule, globals())


def dp_device_job(cb, precision, epochs=1, **module_kwargs):
    module = functools.partial(variant(DPModule, precision), **{"model": "mlp", "lr": 0.1, **module_kwargs})
    job = TrainJob(module=module, callbacks=[cb, Capture()], trainer_kwargs={"max_epochs": epochs}, inspect=captured)
    return on_device(job, trainer_precision(precision))


def test_fp16_with_a_grad_scaler_is_refused_on_the_device():
    cb = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    with pytest.raises(ValueError, match=r"precision='16-mixed'.*scales the loss"):
        run_job(dp_device_job(cb, "16-mixed"))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "compile"])
def test_every_per_sample_gradient_is_clipped_to_max_grad_norm(precision, mode):
    """Batches of one sample, noise 0, a bound far below every gradient's norm: each update has norm C."""
    lr, clip = 0.1, 1e-3
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp", poisson_sampling=False,
                             grad_sample_mode=mode)
    [r] = run_job(dp_device_job(cb, precision, lr=lr, batch_size=1, data_size=16))
    records = r.inspected["records"]
    assert len(records) == 16 and tensors_on(records[-1]["after"], DEVICE.type)
    raw_norms, norms = [], []
    for rec in records:
        raw_norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in rec["raw"].values())))
        norms.append(math.sqrt(sum(float((u.double() ** 2).sum()) for u in update_of(rec, lr).values())))
    if mode == "hooks":  # the gradient of the one sample before clipping (ghost clipping leaves none to see)
        assert min(raw_norms) > 5 * clip
    # bf16 per-sample norms: the factor C / ||g|| is computed from the same low-precision per-sample gradients
    tol = 1e-2 if precision == "bf16-mixed" else 1e-4
    assert all(clip * (1 - tol) <= n <= clip * (1 + tol) for n in norms), norms


@pytest.mark.parametrize("precision", ["bf16-mixed", "compile"])
def test_epsilon_is_the_accountants_for_the_steps_taken(precision):
    cb = DifferentialPrivacy(noise_multiplier=1.1, accountant="rdp")
    [r] = run_job(dp_device_job(cb, precision, epochs=2))
    assert r.global_step == 16
    state = r.callback_states[DP_KEY]
    assert state["history"] == [(1.1, 0.125, 16)]
    assert r.inspected["epsilon"] == P.make_accountant("rdp", [(1.1, 0.125, 16)]).get_epsilon(1e-5)
    logged = r.series("dp/epsilon")
    assert len(logged) == 16
    for k, value in enumerate(logged, start=1):
        assert value == pytest.approx(P.epsilon(1.1, 0.125, k, 1e-5, "rdp"), rel=1e-6)
    assert all(math.isfinite(float(p.float().abs().max())) for p in r.params.values())
