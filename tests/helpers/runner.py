"""Run a Lightning ``Trainer`` on 1 to 4 CPU processes (gloo) from inside pytest and collect each rank's state.

A :class:`TrainJob` describes one ``fit``: a factory for the module, the callbacks, Trainer arguments and an
optional checkpoint to resume from / write to. :func:`run_job` executes it on ``world_size`` processes and
returns one :class:`RankResult` per rank. Two processes are started with the ``spawn`` context and given
the environment that ``torchrun`` would give them (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK`` / ``NODE_RANK``; ``LOCAL_RANK`` set makes Lightning treat them as launched externally), so each
builds its own Trainer exactly as a user's script would. ``num_nodes=2`` lays 4 processes out as 2 nodes x 2
(``Trainer(num_nodes=2, devices=2)``), as two ``torchrun --nnodes 2`` launches on one machine would. Every multi-process
run has a timeout: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

DEFAULT_TIMEOUT_S = 180.0


class InMemoryLogger(Logger):
    """Keeps every ``log_metrics`` call (on every rank) as ``(step, {name: value})``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.history if key in m]


@dataclass
class TrainJob:
    """One ``Trainer.fit`` call, picklable so it can be sent to spawned processes.

    ``module`` is a zero-argument factory (a class, or ``functools.partial`` of one); ``callbacks`` are
    fresh instances (each process and each run gets its own deep copy).
    """

    module: Callable[[], pl.LightningModule]
    callbacks: Sequence[Callback] = ()
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    strategy: Any = None  # None: "ddp" on 2 processes, "auto" on 1
    seed: int = 7
    ckpt_path: str | None = None
    save_checkpoint_to: str | None = None
    inspect: Callable[[pl.Trainer, pl.LightningModule], Any] | None = None


@dataclass
class RankResult:
    rank: int
    global_step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer_states: list[dict[str, Any]]
    callback_states: dict[str, Any]
    metrics: list[tuple[int | None, dict[str, float]]]
    callback_metrics: dict[str, float]
    inspected: Any = None

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


def run_job(job: TrainJob, world_size: int = 1, timeout: float = DEFAULT_TIMEOUT_S,
            num_nodes: int = 1) -> list[RankResult]:
    """Run ``job`` on ``world_size`` CPU processes (as ``num_nodes`` simulated nodes); the results by rank."""
    if world_size % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} must divide world_size={world_size}")
    if world_size == 1:
        return [_fit(copy.deepcopy(job), world_size=1)]
    return _run_spawned(job, world_size, timeout, num_nodes)


def _fit(job: TrainJob, world_size: int, num_nodes: int = 1) -> RankResult:
    import lightning_optx  # noqa: F401  (registers the strategy names, as a user's script does)

    pl.seed_everything(job.seed, workers=True, verbose=False)
    module = job.module()
    logger = InMemoryLogger()
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": world_size // num_nodes,
        "num_nodes": num_nodes,
        "strategy": job.strategy or ("ddp" if world_size > 1 else "auto"),
        "logger": logger,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    kwargs.update(job.trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(job.callbacks), **kwargs)
    trainer.fit(module, ckpt_path=job.ckpt_path)
    if job.save_checkpoint_to:
        trainer.save_checkpoint(job.save_checkpoint_to)
    return RankResult(
        rank=trainer.global_rank,
        global_step=trainer.global_step,
        params={n: p.detach().clone() for n, p in module.named_parameters()},
        buffers={n: b.detach().clone() for n, b in module.named_buffers()},
        optimizer_states=[copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        callback_states={
            cb.state_key: copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks if cb.state_dict()
        },
        metrics=logger.history,
        callback_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        inspected=job.inspect(trainer, module) if job.inspect else None,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_rank_env(rank: int, world_size: int, port: int, num_nodes: int = 1) -> None:
    per_node = world_size // num_nodes
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank % per_node),
        LOCAL_WORLD_SIZE=str(per_node),
        NODE_RANK=str(rank // per_node),
        GROUP_RANK=str(rank // per_node),
        # every collective of ours checks its tensors' device as NCCL would (see distributed.strict_collectives)
        LIGHTNING_OPTX_STRICT_COLLECTIVES="1",
    )
    torch.set_num_threads(1)


def _fit_worker(job: TrainJob, world_size: int, num_nodes: int = 1) -> RankResult:
    return _fit(job, world_size, num_nodes)


def _plain_worker(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def _entry(rank: int, world_size: int, port: int, target: Callable[..., Any], args: tuple[Any, ...],
           out_path: str, num_nodes: int = 1) -> None:
    _set_rank_env(rank, world_size, port, num_nodes)
    try:
        result: Any = target(*args)
    except BaseException:
        result = {"__error__": traceback.format_exc()}
    torch.save(result, out_path)


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2,
                    timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes inside an initialised gloo group; results by rank.

    ``fn`` must be importable (a module-level function); ``torch.distributed.get_rank()`` tells it its rank.
    """
    return _spawn(_plain_worker, (fn, args), world_size, timeout)


def _run_spawned(job: TrainJob, world_size: int, timeout: float, num_nodes: int = 1) -> list[RankResult]:
    results = _spawn(_fit_worker, (job, world_size, num_nodes), world_size, timeout, num_nodes)
    return sorted(results, key=lambda r: r.rank)


def _spawn(target: Callable[..., Any], args: tuple[Any, ...], world_size: int, timeout: float,
           num_nodes: int = 1) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, target, args, paths[r], num_nodes))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = [torch.load(path, weights_only=False) if os.path.exists(path) else None for path in paths]
    errors = [f"rank {r}:\n{res['__error__']}" for r, res in enumerate(results)
              if isinstance(res, dict) and "__error__" in res]
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    if hung:
        raise TimeoutError(f"distributed run did not finish within {timeout:.0f}s; ranks still alive: {hung}")
    missing = [r for r, res in enumerate(results) if res is None]
    if missing:
        raise RuntimeError(f"ranks {missing} produced no result (exit codes {[p.exitcode for p in procs]})")
    return results
