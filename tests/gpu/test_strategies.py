"""Every strategy flag on 2 processes sharing the one GPU over a group whose only backend takes CUDA tensors
(``cuda:gloo``), so that a CPU tensor in any collective fails the run, as it would under NCCL; plain DDP with every
callback on the same group; fp16 PowerSGD with a skipped step. World size 1 on NCCL: test_strategies_nccl.py;
checkpoint and resume: test_strategies_resume.py. This file holds the batch runner they share.

The runs of one kind go to one spawned set of processes, one ``Trainer.fit`` after the other (Lightning keeps the
process group between fits), and each test checks its own run's result: process start-up is paid once per kind.
Each process sees the one GPU as ``devices=1`` of its own "node" (``num_nodes=2``), the way two ranks on two
machines would, so both use ``cuda:0``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lightning_optx import CompressedDDPStrategy, DiLoCoStrategy, DropoutSchedule, GradES, GradientSurgery, Grokfast
from tests.gpu.common import variant
from tests.gpu.device import (
    CUDA,
    DEVICE,
    SHARED_BACKEND,
    on_device,
    pytestmark,
    tensors_on,
)
from tests.helpers import TrainJob, assert_ranks_identical, assert_tree_equal, check_resume_equivalence
from tests.helpers.models import MultiTaskModule, TinyModule, make_model
from tests.helpers.runner import _fit, _free_port, _spawn

# least risky first: a batch's runs share two processes, and a run that breaks their process group stops the rest
# (see _run_batch); diloco_x (a sync round in flight on a background thread) goes last
FLAGS = ["ddp_fp16", "ddp_bf16", "ddp_sign", "ddp_topk", "ddp_powersgd", "local_sgd", "diloco", "diloco_x"]
# short runs: sync every few steps instead of the registered defaults (local_sgd 8, DiLoCo 500); nothing else changes
SYNC_ARGUMENT = {"local_sgd": "period", "diloco": "inner_steps", "diloco_x": "inner_steps"}
WIDE = functools.partial(TinyModule, model="wide_mlp", optimizer="sgd", lr=0.05)
PARAM_BYTES = sum(p.numel() * 4 for p in make_model("wide_mlp").parameters())
# one batch of runs: on a GPU, inside the 330 s the device command gives the whole suite (tests/gpu/run_on_device.sh);
# the CPU self-check runs them on 2 shared cores
TIMEOUT_S = 280.0 if CUDA else 2400.0
# a rank whose run failed goes on to the next one; the other must not wait for it in a collective for 30 minutes
GROUP_TIMEOUT = timedelta(seconds=90)
pytestmark = [*pytestmark, pytest.mark.timeout(TIMEOUT_S + 60)]  # a batch runs inside its first test's fixture


def flag_strategy(flag: str, backend: str, every: int = 4) -> Any:
    """The strategy the registered flag builds (syncing every ``every`` steps), on process group ``backend``."""
    entry = StrategyRegistry[flag]
    short = {SYNC_ARGUMENT[flag]: every} if flag in SYNC_ARGUMENT else {}
    return entry["strategy"](**{**entry["init_params"], **short, "process_group_backend": backend,
                                "timeout": GROUP_TIMEOUT})


def facts(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    s = trainer.strategy
    out: dict[str, Any] = {"device": str(next(module.parameters()).device),
                           "optimizer_on_device": tensors_on([o.state_dict()["state"] for o in trainer.optimizers],
                                                             DEVICE.type)}
    if isinstance(s, CompressedDDPStrategy):
        shapes = [torch.empty(p.shape) for _, p in s._named_trainable_params()]
        out["payload"] = s.compressor.payload_bytes(shapes, trainer.world_size)
        out["iteration"] = s.compressor.iteration
        out["skipped_nonfinite_syncs"] = s.skipped_nonfinite_syncs
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    out["scale"] = float(scaler.get_scale()) if scaler is not None else None
    if isinstance(s, DiLoCoStrategy):
        out["global"] = {n: t.clone() for n, t in s.global_state_dict().items()}
    return out


def flag_job(flag: str, backend: str, shared: bool, module: Any = WIDE, every: int = 4,
             precision: str = "32-true") -> TrainJob:
    kwargs = {"max_epochs": 2, "num_nodes": 2} if shared else {"max_epochs": 2}
    return on_device(TrainJob(module=module, strategy=flag_strategy(flag, backend, every), trainer_kwargs=kwargs,
                              inspect=facts), precision)


# ---------------------------------------------------------------- running a batch of fits in spawned processes


def _share_one_device() -> None:
    """Each rank is local rank 0 of its own node: both use device 0 (world size = num_nodes x 1)."""
    os.environ["NODE_RANK"] = os.environ["RANK"]
    os.environ["LOCAL_RANK"] = "0"


def _outcomes(tmp_dir: str, key: str, failed: bool, rank: int, world_size: int) -> tuple[list[bool], int] | None:
    """Every rank's "did ``key`` fail?", exchanged through files, not the process group (a rank still waiting in a
    collective of a failed run would take a barrier for its own message: gloo aborts on such a mismatch). A rank
    stuck in a collective leaves it within the group's timeout, so waiting twice as long tells a lost rank (None).
    Rank 0 also offers a free port, for the process group that follows a failure."""
    path = os.path.join(tmp_dir, f"{key}.outcome")
    with open(f"{path}{rank}.tmp", "w") as f:
        f.write(f"{'failed' if failed else 'ok'} {_free_port() if rank == 0 else 0}")
    os.replace(f"{path}{rank}.tmp", f"{path}{rank}")
    deadline = time.monotonic() + 2 * GROUP_TIMEOUT.total_seconds() + 30
    while time.monotonic() < deadline:
        if all(os.path.exists(f"{path}{r}") for r in range(world_size)):
            words = [Path(f"{path}{r}").read_text().split() for r in range(world_size)]
            return [w[0] == "failed" for w in words], int(words[0][1])
        time.sleep(0.1)
    return None


def _fresh_process_group(port: int) -> None:
    """After a failed run the group may hold half-done collectives: drop it; the next fit initialises a new one, on
    a new port (the old group's store may still hold the old one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)


def _run_batch(specs: dict[str, tuple[str, Any]], shared: bool, tmp_dir: str) -> dict[str, Any]:
    """In each spawned process: run every spec in turn; a failure is kept as its traceback, not raised.

    After each spec the ranks tell each other whether it failed (:func:`_outcomes`); after a failure on any rank
    they all drop the process group and go on with the next spec. Only when a rank does not come back from a
    failed spec in time are the remaining specs "not run".
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # before a fit's teardown unsets them
    if shared:
        _share_one_device()
    import lightning_optx  # noqa: F401

    out: dict[str, Any] = {}
    lost = None
    for key, (kind, payload) in specs.items():
        if lost is not None:
            out[key] = {"__error__": f"not run: {lost}"}
            continue
        failed = False
        try:
            if kind == "fit":
                out[key] = _fit(payload, world_size=1)  # world size from the job's num_nodes
            else:
                job, total, split = payload
                out[key] = check_resume_equivalence(job, total, split, os.path.join(tmp_dir, key), world_size=1)
        except BaseException:
            out[key] = {"__error__": traceback.format_exc()}
            failed = True
        outcomes = _outcomes(tmp_dir, key, failed, rank, world_size)
        if outcomes is None:
            lost = f"{key!r} did not end on every rank within twice the group's timeout"
        elif any(outcomes[0]):
            _fresh_process_group(outcomes[1])
        torch.save(out, _partial_path(tmp_dir, rank))  # what is done so far survives the batch's time limit
    return out


def _partial_path(tmp_dir: str, rank: int) -> str:
    return os.path.join(tmp_dir, f"done_rank{rank}.pt")


def _partial_results(tmp_dir: str, world_size: int) -> list[dict[str, Any]]:
    """Each rank's results of the specs it finished before the batch stopped."""
    per_rank = []
    for rank in range(world_size):
        path = _partial_path(tmp_dir, rank)
        per_rank.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
    return per_rank


def run_batch(specs: dict[str, tuple[str, Any]], world_size: int) -> dict[str, list[Any]]:
    """``{key: [rank 0's result, rank 1's, ...]}`` of every spec, from one set of ``world_size`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        for key in specs:
            os.makedirs(os.path.join(tmp, key))
        try:
            per_rank = _spawn(_run_batch, (specs, world_size > 1, tmp), world_size, TIMEOUT_S)
        except (TimeoutError, RuntimeError) as error:  # hung or crashed: keep the specs that finished
            per_rank = _partial_results(tmp, world_size)
            missing = {"__error__": f"not finished: the batch stopped ({str(error)[-2000:]})"}
            per_rank = [{key: ranks.get(key, missing) for key in specs} for ranks in per_rank]
    return {key: [ranks[key] for ranks in per_rank] for key in specs}


def result(batch: dict[str, list[Any]], key: str) -> list[Any]:
    errors = [f"rank {r}:\n{res['__error__']}" for r, res in enumerate(batch[key])
              if isinstance(res, dict) and "__error__" in res]
    if errors:
        pytest.fail(f"{key} failed\n" + "\n".join(errors), pytrace=False)
    return batch[key]


# ---------------------------------------------------------------- 2 processes sharing the GPU, cuda:gloo


def _callback_jobs() -> dict[str, TrainJob]:
    ddp = functools.partial(DDPStrategy, process_group_backend=SHARED_BACKEND, timeout=GROUP_TIMEOUT)

    def job(module: Any, callbacks: list[Any], **kwargs: Any) -> TrainJob:
        return on_device(TrainJob(module=module, callbacks=callbacks, strategy=ddp(**kwargs), inspect=facts,
                                  trainer_kwargs={"max_epochs": 3, "num_nodes": 2}))

    transformer = functools.partial(TinyModule, model="transformer", optimizer="adamw", lr=1e-2, weight_decay=0.1)
    jobs = {
        "grokfast": job(transformer, [Grokfast("ema")]),
        "grades": job(transformer, [GradES(tau=0.5, tau_mode="relative", grace_fraction=0.3)]),
        "dropout": job(functools.partial(TinyModule, model="dropout_mlp"),
                       [DropoutSchedule("early", p=0.4, cutoff=0.5)]),
        "surgery": job(MultiTaskModule, [GradientSurgery("pcgrad")]),
    }
    if importlib.util.find_spec("opacus") is not None:  # else the privacy test skips
        from lightning_optx import DifferentialPrivacy
        from tests.callbacks.test_differential_privacy import DPModule

        jobs["privacy"] = job(functools.partial(DPModule, model="mlp", batch_size=4),
                              [DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")])
    return jobs


CALLBACKS = ["grokfast", "grades", "dropout", "surgery", "privacy"]
FP16_POWERSGD = "ddp_powersgd_16_mixed"


@pytest.fixture(scope="module")
def shared() -> Iterator[dict[str, list[Any]]]:
    # plain DDP with each callback first, then the flags (least risky first, diloco_x last, after fp16 PowerSGD)
    specs: dict[str, tuple[str, Any]] = {f"cb_{k}": ("fit", j) for k, j in _callback_jobs().items()}
    specs.update({f: ("fit", flag_job(f, SHARED_BACKEND, shared=True)) for f in FLAGS if f != "diloco_x"})
    specs[FP16_POWERSGD] = ("fit", flag_job("ddp_powersgd", SHARED_BACKEND, shared=True, precision="16-mixed",
                                            module=functools.partial(variant(TinyModule, "16-mixed"), **WIDE.keywords)))
    specs["diloco_x"] = ("fit", flag_job("diloco_x", SHARED_BACKEND, shared=True))
    yield run_batch(specs, world_size=2)


@pytest.mark.parametrize("flag", FLAGS)
def test_two_processes_sharing_the_gpu(shared, flag):
    ranks = result(shared, flag)
    assert [r.global_step for r in ranks] == [8, 8]
    assert all(r.inspected["device"].startswith(DEVICE.type) and r.inspected["optimizer_on_device"] for r in ranks)
    r = ranks[0]
    per_step = r.series("comm/bytes_per_step")
    assert len(per_step) == 8
    if flag.startswith("ddp_"):
        assert_ranks_identical(ranks)
        assert per_step == [r.inspected["payload"]] * 8 and r.inspected["iteration"] == 8
        assert r.series("comm/compression_ratio")[-1] == pytest.approx(PARAM_BYTES / r.inspected["payload"])
        assert r.series("comm/compression_ratio")[-1] > 1.9
    elif flag == "local_sgd":
        assert_ranks_identical(ranks)  # the last step (8) is a sync
        assert [s for s, b in enumerate(per_step, start=1) if b] == [4, 8]
        assert r.series("comm/bytes_total")[-1] == 2 * PARAM_BYTES
    else:
        assert_tree_equal(ranks[0].inspected["global"], ranks[1].inspected["global"], "global parameters")
        if flag == "diloco":
            assert_ranks_identical(ranks)
            assert r.series("comm/bytes_total")[-1] == 2 * PARAM_BYTES
            assert r.series("comm/compression_ratio")[-1] == pytest.approx(4.0)
        else:  # diloco_x: PowerSGD-compressed pseudo-gradients, one sync round in flight
            assert 0 < r.series("comm/bytes_total")[-1] < 2 * PARAM_BYTES
    assert all(torch.isfinite(p).all() for p in r.params.values())


def test_powersgd_under_fp16_skips_the_overflowing_step_on_every_rank(shared):
    """fp16 with a real GradScaler, one step overflowing for real (tests/gpu/common.py): the ranks agree (one
    collective on the group's device) that the gradients are not finite, average them uncompressed, and the
    scaler skips the step; the compressor's state moves only on the finite steps."""
    ranks = result(shared, FP16_POWERSGD)
    assert [r.global_step for r in ranks] == [8, 8]
    assert_ranks_identical(ranks)
    skipped = [r.inspected["skipped_nonfinite_syncs"] for r in ranks]
    assert skipped[0] == skipped[1] >= 1  # the planned overflow (the first steps may overflow on their own too)
    assert all(r.inspected["iteration"] == 8 - skipped[0] for r in ranks)
    assert all(r.inspected["scale"] == 2.0**16 / 2 ** skipped[0] for r in ranks)  # halved once per skipped step
    assert all(r.inspected["device"].startswith(DEVICE.type) and r.inspected["optimizer_on_device"] for r in ranks)
    assert all(torch.isfinite(p).all() for p in ranks[0].params.values())


@pytest.mark.parametrize("name", CALLBACKS)
def test_callbacks_under_ddp_on_a_cuda_only_group(shared, name):
    if f"cb_{name}" not in shared:
        pytest.skip("opacus is not installed")
    ranks = result(shared, f"cb_{name}")
    assert ranks[0].global_step == ranks[1].global_step > 0
    assert_ranks_identical(ranks)
    states = [r.callback_states for r in ranks]
    if name == "grades":
        [key] = [k for k in states[0] if "GradES" in k]
        assert states[0][key]["frozen"] == states[1][key]["frozen"] and states[0][key]["frozen"]
    if name == "privacy":
        [key] = [k for k in states[0] if "DifferentialPrivacy" in k]
        assert states[0][key]["history"] == states[1][key]["history"] == [(1.0, 0.125, ranks[0].global_step)]


# ---------------------------------------------------------------- the premise of the shared-GPU tests


def _collectives_on_a_shared_group() -> dict[str, str]:
    import torch.distributed as dist

    dist.init_process_group("cuda:gloo")  # what SHARED_BACKEND is on a GPU; initialises on a CPU-only build too
    out = {}
    try:
        dist.all_reduce(torch.ones(2))
        out["cpu_all_reduce"] = "accepted"
    except RuntimeError as error:
        out["cpu_all_reduce"] = str(error)
    out["object_device"] = dist.distributed_c10d._get_object_coll_device()
    dist.destroy_process_group()
    return out


def test_the_shared_group_takes_no_cpu_tensor():
    """A ``cuda:gloo`` group has no backend for CPU tensors (as NCCL), and stages objects on the GPU."""
    [out] = _spawn(_collectives_on_a_shared_group, (), 1, 120.0)
    assert "No backend type associated with device type cpu" in out["cpu_all_reduce"]
    assert out["object_device"] == "cuda"
