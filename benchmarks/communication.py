"""Communication benchmark: bytes sent, final loss and modeled time of every data-parallel strategy.

What it measures. One invocation trains the same small character-level GPT (``examples/lm_data.py``: the
documentation of Python's standard library, no download) with every strategy in :data:`STRATEGIES`: plain
DDP, Local SGD (period 8), PowerSGD (rank 4), top-k (density 1%), 1-bit sign, fp16 and bf16 all-reduce.
Every run uses the same model, initial weights (same seed), data order, optimizer (AdamW, warm-up + cosine)
and number of optimizer steps, on 2 CPU processes (gloo). The 2 processes of a run are spawned from this
process with the environment ``torchrun`` would give them (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``NODE_RANK``), so Lightning treats them as externally launched, exactly as in
``tests/helpers/runner.py``. Each process runs with one thread.

For each strategy it reports

* ``train_loss``: mean training loss over the last 10% of steps, averaged over both ranks (each rank's own
  batches; under Local SGD each rank's own model);
* ``val_loss``: validation loss after the last step (the first 256 validation windows, averaged over the
  ranks' shards); this is the "final loss" of the targets below;
* ``bytes_total`` / ``bytes_per_step``: what rank 0 put into collectives (its ``CommLedger``; for plain DDP,
  DDP's gradient buckets once per step), and ``compression_ratio``: bytes of an fp32 all-reduce of every
  gradient every step divided by the bytes sent (what the strategies log as ``comm/compression_ratio``);
* ``fit_s`` (wall-clock of ``Trainer.fit``, validation included), ``step_s`` (median wall-clock of one
  training step on rank 0: forward, backward, compression, collectives over loopback, optimizer step),
  ``loopback_comm_s`` (mean time per step spent inside the strategy's blocking collectives on this machine)
  and ``compute_s`` (median of step time minus that: the "compute time per step"). Plain DDP's all-reduces
  run inside its reducer, overlapped with backward, and cannot be timed apart: its ``compute_s`` still
  holds whatever part of the loopback all-reduce was not hidden (compare it with ``local_sgd/compute_s``,
  same computation, no per-step collective);
* the modeled time of the recorded collectives on a ring of 2 ranks at 1, 10 and 100 Gbit/s (50 us latency
  per message), by the communication planner's timing (:func:`lightning_optx.planning.exposed_seconds` over
  :class:`lightning_optx.distributed.LinkModel`, the one network model): ``wire_s`` (every collective's time
  on the wire), ``exposed_s`` (the part not hidden: DDP's bucket all-reduces hide behind the backward pass,
  2/3 of ``compute_s`` per step; an overlapped DiLoCo round behind compute; everything else blocks) and
  ``total_s = compute_s * steps + exposed_s``;
* ``cluster``: what the same strategy and options would buy on a realistic GPU cluster (:data:`CLUSTER`: a
  1.3B-parameter transformer, 16k tokens per GPU per step on H100s at 40% MFU, 4 nodes x 8 GPUs, 10 Gbit/s
  between nodes), from the planner (:func:`lightning_optx.planning.plan`): ``speedup_vs_ddp`` (modeled
  throughput over DDP's), ``inter_node_bytes_per_step`` and ``compute_utilisation``. It is printed next to
  the CPU-measured losses: the loss says what the strategy costs in quality, this what it would buy.

Then bytes and loss ratios against DDP, and these targets as PASS/FAIL lines (a loss ratio is one-sided:
a strategy whose loss is lower than DDP's passes): ``local_sgd`` >= 8x fewer bytes with a final loss within
3% of DDP's; ``ddp_powersgd`` >= 20x compression within 3%; ``ddp_sign`` >= 25x within 5%.

Model size: biases are off (nanoGPT's ``bias=False``) and the width is 256, so matrices dominate the
parameter count: every compressor sends 1-D tensors (LayerNorm weights) raw in fp32, which caps the
achievable ratio (the ``ratio_cap`` lines give each compressor's analytic ratio for this model; with biases
it would be ~10% lower for sign).

Run::

    python benchmarks/communication.py --quick      # a few dozen steps of a tiny model (~3 min on 2 cores)
    nohup python benchmarks/communication.py > benchmarks/results/communication_full.log 2>&1 &   # the figure
    python benchmarks/communication.py --strategies ddp,local_sgd     # a subset (ddp is the reference)
    nohup nice -n 5 python benchmarks/communication.py --long > benchmarks/results/communication_long.log 2>&1 &
    python benchmarks/communication.py --long --replot   # statistics and plot again from the saved JSON
    python benchmarks/communication.py --long --resume   # run only the fits the saved JSON lacks

``--long`` trains a smaller model (:data:`LONG`, chosen by timing; see :data:`LONG_SEARCH`) for 1,536 steps
with seeds 0, 1, 2 and :data:`LONG_STRATEGIES`, and writes ``communication_long.json`` (after every fit) and
``.png``: per strategy, each seed's final validation loss over DDP's of the same seed, their mean, standard
deviation, min and max, bytes per step, and its target met or missed by how much.

Prints ``name: value`` lines, writes ``benchmarks/results/communication.json`` (``communication_quick.json``
with ``--quick``; ``..._custom`` with ``--steps`` or ``--strategies``) and ``benchmarks/results/communication.png``
(``communication_quick.png``): training loss
against step for every strategy, and bytes per step as bars. To add a strategy (DiLoCo...), add one
:class:`Spec` line to :data:`STRATEGIES` (and a :class:`Target` if it has one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "examples"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import distributed_finetune as DF  # noqa: E402  (examples/distributed_finetune.py)
import lightning.pytorch as pl  # noqa: E402
import lm_data  # noqa: E402  (examples/lm_data.py)
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import Strategy, StrategyRegistry  # noqa: E402

from lightning_optx import planning  # noqa: E402
from lightning_optx.compression import get_compressor  # noqa: E402
from lightning_optx.distributed import CollectiveRecord, wire_bytes  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
WORLD_SIZE = 2
LINKS_GBIT = (1.0, 10.0, 100.0)
REFERENCE = "ddp"
LATENCY_S = 50e-6
# The realistic GPU cluster each figure is modeled on (see the module docstring).
CLUSTER: dict[str, Any] = dict(params=1_300_000_000, tokens_per_step=16_384, gpu_tflops=989.0, mfu=0.4, nodes=4,
                               gpus_per_node=8, intra_gbps=3600.0, inter_gbps=10.0, latency_s=LATENCY_S)


@dataclass(frozen=True)
class Spec:
    """One strategy to benchmark: a report label, a registered strategy name, constructor options.

    ``options`` are passed to the registered class on top of its registered ``init_params``; with none, the
    name itself is given to the ``Trainer``.
    """

    name: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)


STRATEGIES: tuple[Spec, ...] = (
    Spec("ddp", "ddp"),
    Spec("local_sgd", "local_sgd", {"period": 8}),
    Spec("ddp_powersgd", "ddp_powersgd", {"compressor_options": {"rank": 4}}),
    Spec("ddp_topk", "ddp_topk", {"compressor_options": {"density": 0.01}}),
    Spec("ddp_sign", "ddp_sign"),
    Spec("ddp_fp16", "ddp_fp16"),
    Spec("ddp_bf16", "ddp_bf16"),
    Spec("diloco", "diloco", {"inner_steps": 32}),
    Spec("diloco_x", "diloco_x", {"inner_steps": 32}),
)


@dataclass(frozen=True)
class Target:
    """``strategy`` sends at least ``min_bytes_ratio`` x fewer bytes than DDP, with ``val_loss <= max_loss_ratio x``."""

    strategy: str
    min_bytes_ratio: float
    max_loss_ratio: float


TARGETS: tuple[Target, ...] = (
    Target("local_sgd", 8.0, 1.03),
    Target("ddp_powersgd", 20.0, 1.03),
    Target("ddp_sign", 25.0, 1.05),
    Target("diloco", 30.0, 1.05),
    Target("diloco_x", 100.0, 1.05),
)

# Analytic compression ratio of each compressor on this model (the cap set by the raw 1-D tensors).
RATIO_CAPS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddp_powersgd": ("powersgd", {"rank": 4}),
    "ddp_topk": ("topk", {"density": 0.01}),
    "ddp_sign": ("sign", {}),
    "ddp_fp16": ("fp16", {}),
}

# AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up over 10% of the steps, cosine to 10%.
FULL: dict[str, Any] = dict(
    d_model=256, n_layers=2, n_heads=4, seq_len=128, batch_size=8, steps=384, evaluations=6,
    val_windows=256, lr=2e-3, seed=0, timeout_s=1500,
)
# ``--long``: 1,536 optimizer steps (48 DiLoCo rounds of 32) x 3 seeds of LONG_STRATEGIES. The FULL model
# (~1 s/step per 2-process run on the shared 2-core machine) would need ~9 h for 21 fits, so the width and the
# context are cut until the 21 fits fit in ~70 min. Search (40 steps, 2 ranks, load average ~12, median ms per
# step, ddp / ddp_sign): d_model 64 seq 64: 51 / 166; 96 x 64: 141 / 192; 128 x 64 (QUICK): 218 / 364; FULL
# (256 x 128): ~1,000 in the 384-step run. Everything else (data, AdamW, warm-up + cosine over the run, lr,
# batch, strategy options) is FULL's; each seed changes the initial weights and the data order.
LONG: dict[str, Any] = dict(
    d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=8, steps=1536, evaluations=6,
    val_windows=256, lr=2e-3, seed=0, timeout_s=1800,
)
LONG_SEEDS: tuple[int, ...] = (0, 1, 2)
LONG_STRATEGIES: tuple[str, ...] = ("ddp", "local_sgd", "ddp_powersgd", "ddp_sign", "ddp_topk", "diloco", "diloco_x")
LONG_SEARCH = ("d_model x seq_len candidates timed for 40 steps on 2 ranks (load average ~12; median ms/step ddp, "
               "ddp_sign): 64x64: 51, 166; 96x64: 141, 192; 128x64: 218, 364; FULL 256x128: ~1000 (384-step run). "
               "Spawning a 2-process run costs ~30-40 s on top. 64x64 is the largest that lets 21 fits of 1,536 "
               "steps finish in ~70 min.")
QUICK: dict[str, Any] = dict(
    d_model=128, n_layers=2, n_heads=4, seq_len=64, batch_size=8, steps=48, evaluations=2,
    val_windows=64, lr=2e-3, seed=0, timeout_s=300,
)


# ---------------------------------------------------------------------------------------------- worker


class CollectiveTimer:
    """Wall-clock spent inside the blocking collectives of a ``Communicator`` (its methods, wrapped on the instance).

    Plain DDP has no ``Communicator``: its bucket all-reduces run on gloo's threads during backward and are
    not timed (nothing is subtracted from its step time).
    """

    METHODS = ("all_reduce_", "all_gather", "broadcast_")

    def __init__(self) -> None:
        self.seconds = 0.0

    def attach(self, comm: Any) -> None:
        for name in self.METHODS:
            setattr(comm, name, self._timed(getattr(comm, name)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class StepTimer(Callback):
    """Wall-clock of every training step (batch start to batch end: forward, backward, sync, optimizer step) and
    the part of it spent in blocking collectives (from a :class:`CollectiveTimer`)."""

    def __init__(self, collectives: CollectiveTimer) -> None:
        self.collectives = collectives
        self.seconds: list[float] = []
        self.comm_seconds: list[float] = []
        self._start = self._comm_start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start, self._comm_start = time.perf_counter(), self.collectives.seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.comm_seconds.append(self.collectives.seconds - self._comm_start)


class ValHistory(Callback):
    """``(step, val_loss)`` after every validation run."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val_loss" in trainer.callback_metrics:
            self.losses.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))


def make_strategy(spec: Spec) -> str | Strategy:
    """The registered name, or the registered class built with its ``init_params`` updated by ``spec.options``."""
    if not spec.options:
        return spec.strategy
    entry = StrategyRegistry[spec.strategy]
    return entry["strategy"](**{**entry["init_params"], **spec.options})


def build_module(cfg: dict[str, Any]) -> tuple[lm_data.CharDataModule, lm_data.CharLM]:
    data = lm_data.CharDataModule(seq_len=cfg["seq_len"], batch_size=cfg["batch_size"],
                                  val_windows=cfg["val_windows"])
    module = lm_data.CharLM(
        data.vocab_size, seq_len=cfg["seq_len"], d_model=cfg["d_model"], n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"], lr=cfg["lr"], warmup_steps=cfg["steps"] // 10, max_steps=cfg["steps"],
    )
    return data, module


def fit_one(spec: Spec, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train with ``spec`` on this rank (inside the 2-process group) and return what this rank measured."""
    import lightning_optx  # noqa: F401  (registers the strategy names, as a user's script does)

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    data, module = build_module(cfg)
    collectives = CollectiveTimer()
    history, timer, vals = DF.LossHistory(), StepTimer(collectives), ValHistory()
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, num_nodes=1, strategy=make_strategy(spec),
        max_steps=cfg["steps"], val_check_interval=DF.val_interval(cfg["steps"], cfg["evaluations"]),
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=[history, timer, vals],
    )
    if hasattr(trainer.strategy, "comm"):
        collectives.attach(trainer.strategy.comm)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - start
    summary = DF.comm_summary(trainer, module)
    logged = trainer.callback_metrics.get("comm/compression_ratio")
    return {
        "rank": trainer.global_rank,
        "steps": trainer.global_step,
        "train_losses": history.losses,
        "val_losses": vals.losses,
        "train_loss": history.tail_mean(0.1),
        "val_loss": vals.losses[-1][1] if vals.losses else float("nan"),
        "bytes_per_step": summary.bytes_per_step,
        "compression_ratio": summary.compression_ratio,
        "step_seconds": timer.seconds,
        "step_comm_seconds": timer.comm_seconds,
        "fit_s": fit_s,
        "total_bytes": summary.total_bytes,
        "fp32_bytes_per_step": summary.fp32_bytes_per_step,
        "bytes_source": summary.source,
        "logged_compression_ratio": None if logged is None else float(logged),
        "records": [asdict(r) for r in summary.records],
    }


# ---------------------------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, port: int, spec: Spec, cfg: dict[str, Any], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    try:
        result: Any = fit_one(spec, cfg)
    except BaseException:
        result = {"__error__": traceback.format_exc()}
    torch.save(result, out_path)


def run_spec(spec: Spec, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``spec`` on 2 spawned processes; each rank's result, by rank. Raises on error or timeout."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(WORLD_SIZE)]
        procs = [ctx.Process(target=_entry, args=(r, port, spec, cfg, paths[r])) for r in range(WORLD_SIZE)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + cfg["timeout_s"]
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = [torch.load(path, weights_only=False) if os.path.exists(path) else None for path in paths]
    errors = [res["__error__"] for res in results if isinstance(res, dict) and "__error__" in res]
    if errors:
        raise RuntimeError(f"{spec.name} failed:\n" + "\n".join(errors))
    if hung or any(res is None for res in results):
        raise RuntimeError(f"{spec.name}: ranks {hung} still alive after {cfg['timeout_s']}s or gave no result")
    return sorted(results, key=lambda r: r["rank"])


# ---------------------------------------------------------------------------------------------- analysis


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    n = max(1, round(fraction * len(values)))
    return sum(values[-n:]) / n


def rank_mean_curve(ranks: list[dict[str, Any]]) -> list[float]:
    """Training loss per step averaged over the ranks."""
    per_rank = [[loss for _, loss in r["train_losses"]] for r in ranks]
    return [sum(vals) / len(vals) for vals in zip(*per_rank)]


def timing(records: list[CollectiveRecord], compute_s: float, steps: int) -> dict[str, dict[str, float]]:
    """Modeled wire, exposed and total time of the run on each link of :data:`LINKS_GBIT` (the planner's rules)."""
    out: dict[str, dict[str, float]] = {}
    collectives = planning.run_collectives(records, max(1, steps))
    for gbit in LINKS_GBIT:
        ring = planning.Cluster(nodes=WORLD_SIZE, inter_gbps=gbit, latency_s=LATENCY_S)
        wire, exposed = planning.exposed_seconds(collectives, ring, compute_s)
        out[f"{gbit:g}gbit"] = {
            "wire_s": wire * steps,
            "exposed_s": exposed * steps,
            "total_s": (compute_s + exposed) * steps,
        }
    return out


def planner_spec(spec: Spec) -> str:
    """``spec`` as the planner's command line writes it (compressor options flattened)."""
    options = {k: v for k, v in spec.options.items() if k != "compressor_options"}
    options.update(spec.options.get("compressor_options") or {})
    return spec.strategy + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def cluster_model(spec: Spec) -> dict[str, float]:
    """The planner's answer for ``spec`` on :data:`CLUSTER`."""
    c = CLUSTER
    compute = planning.compute_seconds(c["params"], c["tokens_per_step"], c["gpu_tflops"], c["mfu"])
    workload = planning.Workload.from_params(c["params"], compute)
    cluster = planning.Cluster(c["nodes"], c["gpus_per_node"], c["intra_gbps"], c["inter_gbps"], c["latency_s"])
    (row,) = planning.plan([planner_spec(spec)], workload, cluster)
    return {"speedup_vs_ddp": row.speedup_vs_ddp, "inter_node_bytes_per_step": row.inter_node_bytes_per_step,
            "compute_utilisation": row.compute_utilisation, "step_time_s": row.step_time_s}


def collective_mix(records: list[CollectiveRecord]) -> list[dict[str, Any]]:
    """Count and bytes per (kind, tag, overlapped): enough to recompute any link model from the JSON."""
    count: Counter[tuple[str, str, bool]] = Counter()
    nbytes: Counter[tuple[str, str, bool]] = Counter()
    for r in records:
        key = (r.kind, r.tag, r.overlapped)
        count[key] += 1
        nbytes[key] += r.payload_bytes
    return [{"kind": k, "tag": t, "overlapped": o, "count": count[(k, t, o)], "bytes": nbytes[(k, t, o)]}
            for (k, t, o) in sorted(count)]


def summarize(spec: Spec, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-strategy figures (rank 0's bytes and time, losses over both ranks)."""
    r0 = ranks[0]
    steps = r0["steps"]
    records = [CollectiveRecord(**d) for d in r0["records"]]
    step_s = statistics.median(r0["step_seconds"])
    compute_s = statistics.median([t - c for t, c in zip(r0["step_seconds"], r0["step_comm_seconds"])])
    curve = rank_mean_curve(ranks)
    total = r0["total_bytes"]
    return {
        "strategy": spec.strategy,
        "options": spec.options,
        "steps": steps,
        "train_loss": tail_mean(curve),
        "val_loss": r0["val_losses"][-1][1] if r0["val_losses"] else float("nan"),
        "bytes_total": total,
        "bytes_per_step": total / steps,
        "fp32_bytes_per_step": r0["fp32_bytes_per_step"],
        "compression_ratio": r0["fp32_bytes_per_step"] * steps / total if total else float("inf"),
        "logged_compression_ratio": r0["logged_compression_ratio"],
        "bytes_source": r0["bytes_source"],
        "collectives_per_step": len(records) / steps,
        "fit_s": max(r["fit_s"] for r in ranks),
        "step_s": step_s,
        "loopback_comm_s": sum(r0["step_comm_seconds"]) / steps,
        "compute_s": compute_s,
        "modeled": timing(records, compute_s, steps),
        "cluster": cluster_model(spec),
        "collective_mix": collective_mix(records),
        "train_curve": curve,
        "val_curve": r0["val_losses"],
    }


def compare(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Bytes ratio (DDP bytes / strategy bytes) and loss ratios (strategy / DDP) for every strategy."""
    ref = results.get(REFERENCE)
    if ref is None:
        return {}
    return {
        name: {
            "bytes_ratio": ref["bytes_total"] / res["bytes_total"] if res["bytes_total"] else float("inf"),
            "val_loss_ratio": res["val_loss"] / ref["val_loss"],
            "train_loss_ratio": res["train_loss"] / ref["train_loss"],
        }
        for name, res in results.items()
    }


def check_targets(ratios: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    checks = []
    for t in TARGETS:
        if t.strategy not in ratios:
            continue
        r = ratios[t.strategy]
        checks.append({
            **asdict(t),
            "bytes_ratio": r["bytes_ratio"],
            "val_loss_ratio": r["val_loss_ratio"],
            "train_loss_ratio": r["train_loss_ratio"],
            "bytes_ok": r["bytes_ratio"] >= t.min_bytes_ratio,
            "loss_ok": r["val_loss_ratio"] <= t.max_loss_ratio,
            "passed": r["bytes_ratio"] >= t.min_bytes_ratio and r["val_loss_ratio"] <= t.max_loss_ratio,
        })
    return checks


def ratio_caps(cfg: dict[str, Any]) -> dict[str, float]:
    """Each compressor's analytic compression ratio on this model's parameters (2 ranks)."""
    _, module = build_module(cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    return {name: get_compressor(c, **opts).compression_ratio(params, WORLD_SIZE)
            for name, (c, opts) in RATIO_CAPS.items()}


# ---------------------------------------------------------------------------------------------- output


def print_strategy(name: str, res: dict[str, Any]) -> None:
    keys = ("steps", "train_loss", "val_loss", "bytes_total", "bytes_per_step", "compression_ratio",
            "logged_compression_ratio", "collectives_per_step", "fit_s", "step_s", "loopback_comm_s", "compute_s")
    for key in keys:
        value = res[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{name}/{key}: {text}")
    for link, t in res["modeled"].items():
        for key, value in t.items():
            print(f"{name}/{link}/{key}: {value:.3f}")
    for key, value in res["cluster"].items():
        print(f"{name}/cluster/{key}: {value:.4g}")
    sys.stdout.flush()


def print_summary(ratios: dict[str, dict[str, float]], checks: list[dict[str, Any]], quick: bool,
                  results: dict[str, dict[str, Any]] | None = None) -> None:
    for name, r in ratios.items():
        for key, value in r.items():
            print(f"{name}/{key}_vs_{REFERENCE}: {value:.4f}")
    c = CLUSTER
    setting = (f"{c['params'] / 1e9:g}B params, {c['nodes']}x{c['gpus_per_node']} GPUs, {c['inter_gbps']:g} Gbit/s "
               "between nodes")
    for name, res in (results or {}).items():
        print(f"{name}: val_loss {res['val_loss']:.4f} (CPU, 2 ranks); modeled on {setting}: "
              f"{res['cluster']['speedup_vs_ddp']:.3g}x DDP's throughput")
    note = " (quick mode: tiny model, indicative only)" if quick else ""
    for c in checks:
        verdict = "PASS" if c["passed"] else "FAIL"
        print(f"{verdict} {c['strategy']}: bytes ratio {c['bytes_ratio']:.2f} (need >= {c['min_bytes_ratio']:g}), "
              f"val loss ratio {c['val_loss_ratio']:.4f} (need <= {c['max_loss_ratio']:g}; train loss ratio "
              f"{c['train_loss_ratio']:.4f}){note}")


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bytes) = plt.subplots(1, 2, figsize=(14, 5.5))
    for name, res in results.items():
        curve = res["train_curve"]
        window = max(1, len(curve) // 25)
        smooth = [sum(curve[max(0, i - window + 1):i + 1]) / len(curve[max(0, i - window + 1):i + 1])
                  for i in range(len(curve))]
        (line,) = ax_loss.plot(range(1, len(curve) + 1), smooth, label=name, lw=1.3)
        if res["val_curve"]:
            steps, losses = zip(*res["val_curve"])
            ax_loss.plot(steps, losses, "o", color=line.get_color(), ms=4)
    ax_loss.set(xlabel="optimizer step", ylabel="loss (nats/char)",
                title=f"training loss (mean of 2 ranks, moving average); dots: validation\n{title}")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    names = list(results)
    per_step = [results[n]["bytes_per_step"] for n in names]
    bars = ax_bytes.bar(names, per_step, color=[f"C{i}" for i in range(len(names))])
    ref = results.get(REFERENCE)
    for bar, name in zip(bars, names):
        label = f"{ref['bytes_total'] / results[name]['bytes_total']:.1f}x" if ref else ""
        if "cluster" in results[name]:
            label += f"\n{results[name]['cluster']['speedup_vs_ddp']:.3g}x on GPUs"
        ax_bytes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax_bytes.set_yscale("log")
    ax_bytes.set(ylabel="bytes per optimizer step (rank 0)",
                 title="bytes sent per step; labels: x fewer than DDP, and the planner's modeled\n"
                       f"throughput vs DDP for a {CLUSTER['params'] / 1e9:g}B model on {CLUSTER['nodes']}x"
                       f"{CLUSTER['gpus_per_node']} GPUs at {CLUSTER['inter_gbps']:g} Gbit/s between nodes")
    ax_bytes.set_ylim(top=max(per_step) * 4)
    ax_bytes.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "cpu_count": os.cpu_count(),
        "threads_per_rank": 1,
        "load_average": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few dozen steps of a tiny model")
    parser.add_argument("--long", action="store_true",
                        help=f"{LONG['steps']} steps x seeds {','.join(map(str, LONG_SEEDS))} of a smaller model: "
                             "mean and spread of the loss ratios vs DDP")
    parser.add_argument("--resume", action="store_true",
                        help="with --long: keep the fits of the saved JSON and run only the missing ones")
    parser.add_argument("--replot", action="store_true",
                        help="with --long: statistics and plot again from the saved JSON (e.g. of a cut-short run)")
    parser.add_argument("--strategies", default=None,
                        help=f"comma-separated subset of {','.join(s.name for s in STRATEGIES)} (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of optimizer steps")
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace) -> dict[str, Any]:
    """The run's configuration: ``LONG``, ``QUICK`` or ``FULL``, with ``--steps`` applied."""
    if args.long and args.quick:
        raise SystemExit("--long and --quick exclude each other")
    cfg = dict(LONG if args.long else QUICK if args.quick else FULL)
    if args.steps is not None:
        cfg["steps"] = args.steps
    return cfg


def selected_specs(args: argparse.Namespace) -> list[Spec]:
    default = LONG_STRATEGIES if args.long else None
    wanted = set(args.strategies.split(",")) if args.strategies else default
    return [s for s in STRATEGIES if wanted is None or s.name in wanted]


def run_wire_bytes(res: dict[str, Any]) -> float:
    """Bytes per step rank 0 sent plus received (:func:`lightning_optx.distributed.wire_bytes` of its collectives).

    ``bytes_per_step`` counts what went *into* the collectives: an all-to-all's whole input, the chunk a rank
    keeps included, so on 2 ranks it charges the two-stage sign and top-k codes twice what they send. The wire
    count is the one the strategies log as ``comm/compression_ratio`` and the one the ``--long`` targets use.
    """
    total = sum(wire_bytes(m["kind"], m["bytes"], WORLD_SIZE) for m in res["collective_mix"])
    return total / res["steps"]


def seed_statistics(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per strategy: each seed's final val loss ratio vs DDP of the same seed, their mean, sample std, min and max,
    bytes per step and the bytes ratio vs DDP, and its target (met, or missed by how much)."""
    out: dict[str, dict[str, Any]] = {}
    names = list(dict.fromkeys(n for res in per_seed.values() for n in res))
    targets = {t.strategy: t for t in TARGETS}
    for name in names:
        seeds = [s for s, res in per_seed.items() if name in res and REFERENCE in res]
        if not seeds:
            continue
        ratios = [per_seed[s][name]["val_loss"] / per_seed[s][REFERENCE]["val_loss"] for s in seeds]
        bytes_ratio = [per_seed[s][REFERENCE]["bytes_total"] / per_seed[s][name]["bytes_total"] for s in seeds]
        row: dict[str, Any] = {
            "seeds": seeds,
            "val_loss": [per_seed[s][name]["val_loss"] for s in seeds],
            "val_loss_ratio": ratios,
            "val_loss_ratio_mean": statistics.fmean(ratios),
            "val_loss_ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "val_loss_ratio_min": min(ratios),
            "val_loss_ratio_max": max(ratios),
            "bytes_per_step": statistics.fmean(per_seed[s][name]["bytes_per_step"] for s in seeds),
            "bytes_ratio": statistics.fmean(bytes_ratio),
            "wire_bytes_per_step": statistics.fmean(run_wire_bytes(per_seed[s][name]) for s in seeds),
            "wire_bytes_ratio": statistics.fmean(
                run_wire_bytes(per_seed[s][REFERENCE]) / run_wire_bytes(per_seed[s][name]) for s in seeds),
            "step_s": statistics.fmean(per_seed[s][name]["step_s"] for s in seeds),
        }
        target = targets.get(name)
        if target is not None:
            row["target"] = asdict(target)
            row["bytes_ok"] = row["wire_bytes_ratio"] >= target.min_bytes_ratio
            row["loss_ok"] = row["val_loss_ratio_mean"] <= target.max_loss_ratio
            row["passed"] = row["bytes_ok"] and row["loss_ok"]
            row["loss_ratio_excess"] = row["val_loss_ratio_mean"] - target.max_loss_ratio
        out[name] = row
    return out


def print_seed_statistics(stats: dict[str, dict[str, Any]]) -> None:
    for name, row in stats.items():
        line = (f"{name}: val loss ratio vs {REFERENCE} mean {row['val_loss_ratio_mean']:.4f} std "
                f"{row['val_loss_ratio_std']:.4f} [{row['val_loss_ratio_min']:.4f}, {row['val_loss_ratio_max']:.4f}] "
                f"over seeds {row['seeds']}; {row['wire_bytes_per_step']:.0f} wire bytes/step "
                f"({row['wire_bytes_ratio']:.1f}x fewer; {row['bytes_ratio']:.1f}x by collective inputs)")
        if "target" in row:
            t = row["target"]
            verdict = "PASS" if row["passed"] else "FAIL"
            miss = "" if row["loss_ok"] else f", loss missed by {100 * row['loss_ratio_excess']:.1f} points"
            miss += "" if row["bytes_ok"] else f", bytes missed ({row['wire_bytes_ratio']:.1f}x)"
            line = (f"{verdict} {line}; need <= {t['max_loss_ratio']:g} and >= {t['min_bytes_ratio']:g}x{miss}")
        print(line)
    sys.stdout.flush()


def plot_long(per_seed: dict[int, dict[str, dict[str, Any]]], stats: dict[str, dict[str, Any]], path: Path,
              title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_ratio) = plt.subplots(1, 2, figsize=(14, 5.5))
    first = per_seed[min(per_seed)]
    for name, res in first.items():
        if res["val_curve"]:
            steps, losses = zip(*res["val_curve"])
            ax_curve.plot(steps, losses, "o-", label=name, ms=3, lw=1.2)
    ax_curve.set(xlabel="optimizer step", ylabel="validation loss (nats/char)",
                 title=f"validation loss, seed {min(per_seed)}\n{title}")
    ax_curve.legend()
    ax_curve.grid(alpha=0.3)
    names = list(stats)
    targets = {t.strategy: t.max_loss_ratio for t in TARGETS}
    for i, name in enumerate(names):
        row = stats[name]
        ax_ratio.errorbar(i, row["val_loss_ratio_mean"], yerr=row["val_loss_ratio_std"], fmt="s", color=f"C{i}",
                          capsize=4)
        ax_ratio.plot([i] * len(row["val_loss_ratio"]), row["val_loss_ratio"], ".", color=f"C{i}", alpha=0.6)
        if name in targets:
            ax_ratio.hlines(targets[name], i - 0.3, i + 0.3, colors="k", linestyles="--")
        ax_ratio.annotate(f"{row['wire_bytes_ratio']:.0f}x", (i, row["val_loss_ratio_max"]), xytext=(0, 6),
                          textcoords="offset points", ha="center")
    ax_ratio.margins(y=0.12)
    ax_ratio.set_xticks(range(len(names)), names, rotation=30)
    ax_ratio.set(ylabel=f"final val loss / {REFERENCE}'s (same seed)",
                 title="final val loss ratio: mean +- std over seeds (dots: seeds)\n"
                       "dashes: target; labels: x fewer bytes on the wire than DDP")
    ax_ratio.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot_long(path: Path) -> None:
    """Statistics, their lines and the plot again from a ``--long`` JSON (complete or cut short)."""
    payload = json.loads(path.read_text())
    per_seed = {int(seed): res for seed, res in payload["results"].items()}
    cfg = payload["config"]
    payload["statistics"] = stats = seed_statistics(per_seed)
    path.write_text(json.dumps(payload, indent=1))
    print_seed_statistics(stats)
    title = (f"{cfg['d_model']}-wide, {cfg['n_layers']}-layer char GPT, {cfg['steps']} steps, 2 CPU ranks, "
             f"seeds {','.join(map(str, sorted(per_seed)))}" + ("" if payload["complete"] else " (cut short)"))
    plot_long(per_seed, stats, path.with_suffix(".png"), title)
    print(f"png: {path.with_suffix('.png')}")


def load_long(path: Path, cfg: dict[str, Any]) -> tuple[dict[int, dict[str, dict[str, Any]]], float, Any]:
    """The fits, wall time and start environment of a saved ``--long`` run with configuration ``cfg``."""
    payload = json.loads(path.read_text())
    if payload["config"] != cfg:
        raise SystemExit(f"--resume: {path} was run with {payload['config']}, not {cfg}")
    per_seed = {int(seed): res for seed, res in payload["results"].items()}
    return per_seed, float(payload["benchmark_wall_s"]), payload["environment"]["start"]


def main_long(args: argparse.Namespace, cfg: dict[str, Any], specs: list[Spec]) -> None:
    """Every spec for every seed, seed-major (a cut-short run holds whole seeds), the JSON saved after each fit."""
    stem = "communication_long" + ("_custom" if args.steps is not None or args.strategies else "")
    env_start = _environment()
    caps = ratio_caps(cfg)
    for name, value in caps.items():
        print(f"{name}/ratio_cap: {value:.2f}")
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    earlier_s = 0.0
    if args.resume and (RESULTS / f"{stem}.json").exists():
        per_seed, earlier_s, env_start = load_long(RESULTS / f"{stem}.json", cfg)
    started = time.perf_counter() - earlier_s
    title = (f"{cfg['d_model']}-wide, {cfg['n_layers']}-layer char GPT, {cfg['steps']} steps, 2 CPU ranks, "
             f"seeds {','.join(map(str, LONG_SEEDS))}")
    stats = seed_statistics(per_seed)
    payload: dict[str, Any] = {}
    for seed in LONG_SEEDS:
        for spec in specs:
            if spec.name in per_seed.get(seed, {}):
                continue
            print(f"# running {spec.name} seed {seed} ...", flush=True)
            res = summarize(spec, run_spec(spec, {**cfg, "seed": seed}))
            res.pop("train_curve")  # 1,536 floats x 21 fits; the validation curve stays
            per_seed.setdefault(seed, {})[spec.name] = res
            print_strategy(f"seed{seed}/{spec.name}", res)
            stats = seed_statistics(per_seed)
            payload = {
                "mode": "long",
                "command": "python benchmarks/communication.py --long",
                "config": cfg,
                "seeds": list(LONG_SEEDS),
                "config_search": LONG_SEARCH,
                "complete": False,
                "links_gbit": LINKS_GBIT,
                "latency_s": LATENCY_S,
                "cluster": CLUSTER,
                "environment": {"start": env_start, "end": _environment()},
                "ratio_caps": caps,
                "statistics": stats,
                "results": {str(s): r for s, r in per_seed.items()},
                "benchmark_wall_s": time.perf_counter() - started,
            }
            (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    if not payload:  # --resume of a run that had every fit already
        payload = json.loads((RESULTS / f"{stem}.json").read_text())
    payload["complete"] = True
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    print_seed_statistics(stats)
    print(f"benchmark_wall_s: {time.perf_counter() - started:.1f}")
    plot_long(per_seed, stats, RESULTS / f"{stem}.png", title)
    print(f"json: {RESULTS / f'{stem}.json'}")
    print(f"png: {RESULTS / f'{stem}.png'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_for(args)
    specs = selected_specs(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.replot:
        if not args.long:
            raise SystemExit("--replot needs --long")
        replot_long(RESULTS / "communication_long.json")
        return
    if args.long:
        print("mode: long")
        for key, value in cfg.items():
            print(f"config/{key}: {value}")
        print(f"config/seeds: {LONG_SEEDS}")
        main_long(args, cfg, specs)
        return
    env_start = _environment()
    print(f"mode: {'quick' if args.quick else 'full'}")
    for key, value in cfg.items():
        print(f"config/{key}: {value}")
    caps = ratio_caps(cfg)
    for name, value in caps.items():
        print(f"{name}/ratio_cap: {value:.2f}")
    sys.stdout.flush()
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for spec in specs:
        print(f"# running {spec.name} ...", flush=True)
        results[spec.name] = summarize(spec, run_spec(spec, cfg))
        print_strategy(spec.name, results[spec.name])
    ratios = compare(results)
    checks = check_targets(ratios)
    print_summary(ratios, checks, args.quick, results)
    total_s = time.perf_counter() - started
    print(f"benchmark_wall_s: {total_s:.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "communication_quick" if args.quick else "communication"
    if args.steps is not None or args.strategies:
        stem += "_custom"  # a partial or shortened run never overwrites the figure
    payload = {
        "mode": "quick" if args.quick else "full",
        "config": cfg,
        "links_gbit": LINKS_GBIT,
        "latency_s": LATENCY_S,
        "cluster": CLUSTER,
        "environment": {"start": env_start, "end": _environment()},
        "ratio_caps": caps,
        "results": results,
        "ratios_vs_ddp": ratios,
        "checks": checks,
        "benchmark_wall_s": total_s,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    title = f"{cfg['d_model']}-wide, {cfg['n_layers']}-layer char GPT, {cfg['steps']} steps, 2 CPU ranks"
    plot(results, RESULTS / f"{stem}.png", title)
    print(f"json: {RESULTS / f'{stem}.json'}")
    print(f"png: {RESULTS / f'{stem}.png'}")


if __name__ == "__main__":
    main()
