"""DiLoCoStrategy: closed-form traces, equivalences with Local SGD and DDP, compression, overlap, resume."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader

from lightning_optx import DiLoCoStrategy, LocalSGDStrategy
from lightning_optx.compression import Sign
from tests.helpers import TrainJob, assert_ranks_identical, assert_tree_equal, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule
from tests.helpers.recorder import StepRecorder

pytestmark = pytest.mark.multiprocess

W0 = [1.0, -2.0]
INNER_LR = 0.1


def fixed_grad(rank: int, step: int) -> list[float]:
    """The synthetic gradient rank ``rank`` sees at optimizer step ``step``."""
    return [(rank + 1) * (step + 1) * 0.1, (-1) ** step * (rank + 2) * 0.05]


class FixedGradModule(pl.LightningModule):
    """One 2-vector parameter; ``loss = w . c(rank, step)`` so the gradient is exactly ``c``; plain SGD."""

    def __init__(self, steps: int = 8) -> None:
        super().__init__()
        self.steps = steps
        self.w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        c = torch.tensor(fixed_grad(self.global_rank, self.global_step), dtype=torch.float64)
        return (self.w * c).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=INNER_LR)

    def train_dataloader(self):
        return DataLoader(list(range(self.steps)), batch_size=1)


def outer_sgd(theta, buf, delta, lr, momentum, nesterov):
    """torch.optim.SGD's update (dampening 0), written out."""
    buf = delta if buf is None else [momentum * b + d for b, d in zip(buf, delta)]
    update = [d + momentum * b for d, b in zip(delta, buf)] if nesterov else buf
    return [t - lr * u for t, u in zip(theta, update)], buf


def expected_trace(steps, H, lr, momentum, nesterov, overlap, world=2):
    """Per-rank local parameters after every step, and the global parameters, by the formulas in the docs."""
    theta, buf = list(W0), None
    x = [list(W0) for _ in range(world)]
    start = [list(W0) for _ in range(world)]
    pending = None
    trace = []
    for s in range(steps):
        for r in range(world):
            x[r] = [xi - INNER_LR * ci for xi, ci in zip(x[r], fixed_grad(r, s))]
        if (s + 1) % H == 0:
            if not overlap:
                delta = [sum(theta[k] - x[r][k] for r in range(world)) / world for k in range(2)]
                theta, buf = outer_sgd(theta, buf, delta, lr, momentum, nesterov)
                x = [list(theta) for _ in range(world)]
            else:
                progress = [[start[r][k] - x[r][k] for k in range(2)] for r in range(world)]
                if pending is not None:
                    theta, buf = outer_sgd(theta, buf, pending, lr, momentum, nesterov)
                pending = [sum(progress[r][k] for r in range(world)) / world for k in range(2)]
                x = [[theta[k] - progress[r][k] for k in range(2)] for r in range(world)]
                start = [list(xr) for xr in x]
        trace.append(([list(xr) for xr in x], list(theta)))
    return trace


def record_with_global(trainer, module):
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    return {"records": recorder.records, "global": trainer.strategy.global_state_dict()}


class GlobalRecorder(StepRecorder):
    def on_train_batch_end(self, trainer, pl_module, *args):
        super().on_train_batch_end(trainer, pl_module, *args)
        self.records[-1]["global"] = {n: g.clone() for n, g in trainer.strategy.global_state_dict().items()}


def fixed_job(strategy, steps=8):
    return TrainJob(module=functools.partial(FixedGradModule, steps=steps), strategy=strategy,
                    callbacks=[GlobalRecorder()], inspect=record_with_global,
                    trainer_kwargs={"max_epochs": 1, "use_distributed_sampler": False, "deterministic": False})


@pytest.mark.parametrize(("nesterov", "momentum", "lr"), [
    (True, 0.9, 0.7),
    pytest.param(False, 0.0, 0.7, marks=pytest.mark.slow),
    pytest.param(False, 0.5, 1.0, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("overlap", [False, True])
def test_closed_form_trace(nesterov, momentum, lr, overlap):
    strategy = DiLoCoStrategy(inner_steps=2, outer_optimizer="nesterov" if nesterov else "sgd", outer_lr=lr,
                              outer_momentum=momentum, overlap=overlap)
    ranks = run_job(fixed_job(strategy), world_size=2)
    expected = expected_trace(8, 2, lr, momentum, nesterov, overlap)
    for step, (locals_, theta) in enumerate(expected):
        for r in range(2):
            got = ranks[r].inspected["records"][step]
            torch.testing.assert_close(got["params"]["w"], torch.tensor(locals_[r], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-7, msg=f"rank {r} local params after step {step + 1}")
            torch.testing.assert_close(got["global"]["w"], torch.tensor(theta, dtype=torch.float32),
                                       rtol=1e-6, atol=1e-6, msg=f"rank {r} global params after step {step + 1}")
    # the global parameters are bit-identical on both ranks after every step
    for a, b in zip(ranks[0].inspected["records"], ranks[1].inspected["records"]):
        assert_tree_equal(a["global"], b["global"])


def job(strategy, module=None, epochs=2, **trainer_kwargs):
    return TrainJob(module=module or functools.partial(TinyModule, model="wide_mlp", optimizer="sgd", lr=0.05),
                    strategy=strategy, trainer_kwargs={"max_epochs": epochs, **trainer_kwargs})


def plain_sgd(**kwargs):
    return functools.partial(TinyModule, model="wide_mlp", optimizer="plain_sgd", **kwargs)


def test_outer_lr_one_without_momentum_is_local_sgd():
    diloco = run_job(job(DiLoCoStrategy(inner_steps=4, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0)), 2)
    local = run_job(job(LocalSGDStrategy(period=4)), 2)
    assert_ranks_identical(diloco)
    for n, p in local[0].params.items():
        torch.testing.assert_close(diloco[0].params[n], p, rtol=1e-5, atol=1e-6)


def test_one_inner_step_with_plain_sgd_is_ddp():
    strategy = DiLoCoStrategy(inner_steps=1, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0)
    diloco = run_job(job(strategy, module=plain_sgd()), 2)
    ddp = run_job(job("ddp", module=plain_sgd()), 2)
    for n, p in ddp[0].params.items():
        torch.testing.assert_close(diloco[0].params[n], p, rtol=1e-5, atol=1e-6)


class RecordingSign(Sign):
    """Keeps every round's pseudo-gradient input and the averaged one the outer step applies."""

    def reduce_(self, tensors, keys, comm, tag="grad"):
        self.inputs = [*getattr(self, "inputs", []), [t.clone() for t in tensors]]
        super().reduce_(tensors, keys, comm, tag)
        self.applied = [*getattr(self, "applied", []), [t.clone() for t in tensors]]


def conservation_facts(trainer, module):
    c = trainer.strategy.compressor
    return {"inputs": c.inputs, "applied": c.applied, "residuals": dict(c.residuals),
            "server_residuals": dict(c.server_residuals), "names": trainer.strategy._fragments[0].names}


def test_compressed_pseudo_gradients_conserve_their_sum_with_error_feedback():
    """applied + mean worker residual + server residual (chunk r on rank r) == the sum of the true means."""
    strategy = DiLoCoStrategy(inner_steps=2, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0,
                              compressor=RecordingSign(error_feedback=True))
    ranks = run_job(TrainJob(module=plain_sgd(), strategy=strategy, inspect=conservation_facts,
                             trainer_kwargs={"max_epochs": 2}), 2)
    names = ranks[0].inspected["names"]
    for i, name in enumerate(names):
        rounds = range(len(ranks[0].inspected["inputs"]))
        true_sum = sum(sum(r.inspected["inputs"][k][i] for r in ranks) / 2 for k in rounds)
        applied = sum(a[i] for a in ranks[0].inspected["applied"])
        residual = sum(r.inspected["residuals"].get(name, torch.zeros_like(applied)) for r in ranks) / 2
        if name in ranks[0].inspected["server_residuals"]:
            server = torch.cat([r.inspected["server_residuals"][name] for r in ranks])
            residual = residual + server[:applied.numel()].view_as(applied)
        torch.testing.assert_close(applied + residual, true_sum, rtol=1e-4, atol=1e-5, msg=name)
    assert_ranks_identical(ranks)  # 16 steps = a multiple of inner_steps: every rank ends at the global params


def test_bytes_and_flags():
    assert StrategyRegistry["diloco"]["strategy"] is DiLoCoStrategy
    assert StrategyRegistry["diloco_x"]["init_params"]["overlap"] is True
    ranks = run_job(job(DiLoCoStrategy(inner_steps=4)), 2)
    param_bytes = sum(p.numel() * 4 for p in TinyModule(model="wide_mlp").parameters())
    assert ranks[0].series("comm/bytes_total")[-1] == 2 * param_bytes  # 8 steps, 2 syncs
    assert ranks[0].series("comm/compression_ratio")[-1] == pytest.approx(4.0)
    x = run_job(job("diloco_x"), 2)
    assert x[0].global_step == 8


def test_fragments_stagger_syncs_and_split_the_bytes():
    """Fragments split at parameter granularity: a model of many similar matrices splits evenly."""
    module = functools.partial(TinyModule, model="transformer", optimizer="sgd", lr=0.05)
    ranks = run_job(job(DiLoCoStrategy(inner_steps=4, fragments=2), module=module), 2)
    per_step = ranks[0].series("comm/bytes_per_step")
    syncs = [(s + 1, b) for s, b in enumerate(per_step) if b]
    assert [s for s, _ in syncs] == [2, 4, 6, 8]
    total = sum(p.numel() * 4 for p in TinyModule(model="transformer").parameters())
    assert max(b for _, b in syncs) <= 0.6 * total  # the peak per sync is about half of the model
    assert syncs[0][1] + syncs[1][1] == total


@pytest.mark.parametrize("strategy", [
    pytest.param(DiLoCoStrategy(inner_steps=3), marks=pytest.mark.slow),
    DiLoCoStrategy(inner_steps=4, overlap=True, fragments=2),
    # the default run covers this one with a slow compressor, a round in flight at the checkpoint (test_consensus)
    pytest.param(DiLoCoStrategy(inner_steps=4, overlap=True, compressor="powersgd", compressor_options={"rank": 2},
                                adaptive_compression=True), marks=pytest.mark.slow),
])
def test_resume_is_bit_exact(tmp_path, strategy):
    module = functools.partial(TinyModule, model="wide_mlp", optimizer="adamw", lr=1e-2)
    straight, resumed = check_resume_equivalence(job(strategy, module=module), total_epochs=3, split_epoch=1,
                                                 tmp_dir=str(tmp_path), world_size=2)
    assert resumed[0].series("comm/bytes_total")[-1] == straight[0].series("comm/bytes_total")[-1]


class ScheduledModule(TinyModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                   "interval": "step"}}


def current_lr(trainer, module):
    return trainer.optimizers[0].param_groups[0]["lr"]


def test_inner_lr_scheduler_steps_every_inner_step():
    ranks = run_job(TrainJob(module=functools.partial(ScheduledModule, model="mlp"),
                             strategy=DiLoCoStrategy(inner_steps=4), trainer_kwargs={"max_epochs": 2},
                             inspect=current_lr), 2)
    assert ranks[0].inspected == pytest.approx(0.1 * 0.5 ** (8 // 3))


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"inner_steps": 0}, r"`inner_steps` must be an integer >= 1, got inner_steps=0"),
    ({"inner_steps": 10, "fragments": 3}, r"`fragments` must divide `inner_steps`.*fragments=3 with inner_steps=10"),
    ({"outer_optimizer": "adam"}, r"must be one of \('nesterov', 'sgd'\), got outer_optimizer='adam'"),
    ({"compressor": "zip"}, r"`compressor` must be None, a Compressor or one of .*got compressor='zip'"),
    ({"adaptive_compression": True, "compressor": "sign"}, r"`adaptive_compression=True` needs a PowerSGD or top-k"),
    ({"outer_momentum": 1.0}, r"`outer_momentum` must be in \[0, 1\), got outer_momentum=1.0"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiLoCoStrategy(**kwargs)
