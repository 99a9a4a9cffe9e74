"""``python -m lightning_optx.plan``: which strategy for my model on my cluster, and what will it buy me.

Prints, for every strategy, the bytes each node sends over its inter-node link per optimizer step, the
intra-node bytes, the modeled communication time and the part left exposed, the step time, the throughput
relative to DDP and the compute utilisation (see :mod:`lightning_optx.planning` and docs/planning.md).

Examples::

    python -m lightning_optx.plan --params 1.3e9 --tokens-per-step 16384 --nodes 4 --gpus-per-node 8 \\
        --inter-node-gbps 10
    python -m lightning_optx.plan --params 7e9 --step-compute-s 2 --strategy ddp diloco:inner_steps=100 --json
    python -m lightning_optx.plan --model my_pkg.models:MyModule --step-compute-s 0.3 --plot speedup.png
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from lightning_optx.distributed import CollectiveRecord, LinkModel
from lightning_optx.planning import (
    DTYPE_BYTES,
    SPARSE_COLLECTIVES,
    STRATEGY_DEFAULTS,
    Cluster,
    StrategyPlan,
    StrategySpec,
    Workload,
    compute_seconds,
    plan,
)

PLOT_GBPS = (0.1, 400.0)


class _Parser(argparse.ArgumentParser):
    """Exits 2 with ONE line naming the flag (argparse's default also prints the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(float(text)) if kind is int else kind(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
        if kind is int and float(text) != value:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return float(value)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lightning_optx.plan",
                description="Which strategy for my model on my cluster, and what will it buy me: bytes, modeled "
                            "communication time and speed-up vs DDP of every strategy (docs/planning.md).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w = p.add_argument_group("workload")
    size = w.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=_positive(int), help="number of trainable parameters (e.g. 1.3e9)")
    size.add_argument("--model", help="module.path:Class of a LightningModule / nn.Module built with no arguments "
                                       "(on the meta device) to count its parameters")
    w.add_argument("--step-compute-s", type=_positive(float),
                   help="compute time of one optimizer step on one GPU, communication excluded")
    w.add_argument("--tokens-per-step", type=_positive(float),
                   help="tokens one GPU processes per optimizer step (instead of --step-compute-s)")
    w.add_argument("--gpu-tflops", type=_positive(float), default=989.0, help="peak TFLOP/s of one GPU (H100 bf16)")
    w.add_argument("--mfu", type=_fraction, default=0.4, help="model FLOP utilisation, in (0, 1]")
    w.add_argument("--grad-dtype", choices=sorted(DTYPE_BYTES), default="fp32",
                   help="dtype of DDP's gradients / Local SGD's parameters on the wire")
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=_positive(int), default=4, help="number of nodes")
    c.add_argument("--gpus-per-node", type=_positive(int), default=8, help="GPUs (processes) per node")
    c.add_argument("--intra-node-gbps", type=_positive(float), default=3600.0, help="per GPU (NVLink 4: 3600)")
    c.add_argument("--inter-node-gbps", type=_positive(float), default=10.0, help="per node")
    c.add_argument("--latency-ms", type=_non_negative, default=0.05, help="per message")
    s = p.add_argument_group("strategies")
    s.add_argument("--strategy", nargs="+", action="extend", metavar="FLAG[:KEY=VALUE,...]",
                   help=f"strategies to plan (default: all of {', '.join(STRATEGY_DEFAULTS)}); options override "
                        "the defaults, e.g. local_sgd:period=16 diloco:inner_steps=100 ddp_powersgd:rank=8 "
                        "diloco:replica_size=8")
    s.add_argument("--sparse-collective", choices=SPARSE_COLLECTIVES, default="two_stage",
                   help="how sign / top-k payloads travel: the two-stage compressed all-reduce the compressors run "
                        "(default) or an all-gather of every rank's code (bytes grow with the nodes)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    o.add_argument("--plot", metavar="FILE.png", help="plot modeled speed-up vs inter-node bandwidth (0.1-400 Gbit/s)")
    return p


def _load_model(path: str) -> Any:
    import torch

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"must be module.path:Class, got {path!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from None
    with torch.device("meta"):
        module = cls()
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"{path!r} built an object of type {type(module).__name__}, not a torch.nn.Module")
    return module


def _workload(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Workload:
    module = None
    if args.model:
        try:
            module = _load_model(args.model)
        except Exception as err:  # a user's constructor can raise anything
            parser.error(f"argument --model: {err}")
    params = args.params if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)
    if not params:
        parser.error("argument --model: the model has no trainable parameters")
    if args.step_compute_s is not None:
        compute = args.step_compute_s
    elif args.tokens_per_step is not None:
        compute = compute_seconds(params, args.tokens_per_step, args.gpu_tflops, args.mfu)
        if not 0 < compute < math.inf:
            parser.error(f"argument --tokens-per-step/--gpu-tflops/--mfu: the compute time 6 x params x tokens / "
                         f"(tflops x mfu) is {compute!r} s, not a positive finite number")
    else:
        parser.error("argument --step-compute-s: give it, or --tokens-per-step (with --gpu-tflops and --mfu)")
    grad_bytes = DTYPE_BYTES[args.grad_dtype]
    if module is not None:
        return Workload.from_module(module, compute, grad_bytes=grad_bytes)
    try:
        return Workload.from_params(params, compute, grad_bytes=grad_bytes)
    except ValueError as err:
        parser.error(f"argument --params: {err}")


def _plans(args: argparse.Namespace, parser: argparse.ArgumentParser, workload: Workload, cluster: Cluster
           ) -> tuple[list[StrategySpec], list[StrategyPlan]]:
    texts = args.strategy or list(STRATEGY_DEFAULTS)
    try:
        specs = [StrategySpec.parse(t, args.sparse_collective) for t in texts]
        return specs, plan(specs, workload, cluster)
    except (ValueError, TypeError) as err:
        parser.error(f"argument --strategy: {err}")


def _check_links(cluster: Cluster, workload: Workload, parser: argparse.ArgumentParser) -> None:
    """Reject a bandwidth or latency under which the whole model's all-reduce takes no finite time."""
    record = CollectiveRecord("all_reduce", 4 * workload.params, max(2, cluster.nodes * cluster.gpus_per_node))
    for flag, gbps in (("--intra-node-gbps", cluster.intra_gbps), ("--inter-node-gbps", cluster.inter_gbps)):
        if not math.isfinite(LinkModel(gbps, cluster.latency_s).seconds(record)):
            parser.error(f"argument {flag}: {gbps!r} Gbit/s gives an infinite time for the model's all-reduce")


def _check_finite(rows: Sequence[StrategyPlan], parser: argparse.ArgumentParser) -> None:
    for row in rows:
        for key, value in row.as_dict().items():
            if isinstance(value, float) and not math.isfinite(value):
                parser.error(f"argument --strategy: {row.strategy} gives {key}={value} with these sizes and "
                             "bandwidths (--params/--model, --nodes, --gpus-per-node, --inter-node-gbps)")


def _check_plot_path(path: str, parser: argparse.ArgumentParser) -> None:
    """Fail before any output when the plot cannot be written."""
    try:
        import matplotlib
    except ImportError:
        parser.error("argument --plot: needs matplotlib (pip install matplotlib)")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    folder = os.path.dirname(os.path.abspath(path))
    if suffix not in formats:
        parser.error(f"argument --plot: {path!r} must end in one of .{', .'.join(sorted(formats))}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"argument --plot: cannot write {path!r}: {folder!r} is not a writable folder")


def _table(rows: Sequence[StrategyPlan], workload: Workload, cluster: Cluster) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{workload.params / 1e9:.3g}B parameters, {workload.step_compute_s:.3g} s compute per step; "
             f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s), {cluster.inter_gbps:g} Gbit/s between "
             f"nodes, {cluster.intra_gbps:g} Gbit/s inside, {cluster.latency_s * 1e3:g} ms latency")
    table = Table(title=title, title_justify="left")
    for name in ("strategy", "inter-node MB/step", "intra-node MB/step", "comm s", "exposed s", "step s",
                 "vs DDP", "utilisation"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for r in rows:
        table.add_row(r.strategy, f"{r.inter_node_bytes_per_step / 1e6:,.3f}",
                      f"{r.intra_node_bytes_per_step / 1e6:,.3f}", f"{r.comm_time_s:.4g}",
                      f"{r.exposed_comm_s:.4g}", f"{r.step_time_s:.4g}",
                      f"{r.speedup_vs_ddp:.3g}x", f"{100 * r.compute_utilisation:.1f}%")
    Console(width=160).print(table)


def speedup_curves(specs: Sequence[StrategySpec], workload: Workload, cluster: Cluster, points: int = 60
                   ) -> tuple[list[float], dict[str, list[float]]]:
    """Modeled speed-up vs DDP of every spec at ``points`` inter-node bandwidths, log-spaced over 0.1-400 Gbit/s."""
    lo, hi = (math.log10(g) for g in PLOT_GBPS)
    grid = [10 ** (lo + (hi - lo) * i / (points - 1)) for i in range(points)]
    curves: dict[str, list[float]] = {s.label: [] for s in specs}
    for gbps in grid:
        linked = Cluster(cluster.nodes, cluster.gpus_per_node, cluster.intra_gbps, gbps, cluster.latency_s)
        for row in plan(specs, workload, linked):
            curves[row.strategy].append(row.speedup_vs_ddp)
    return grid, curves


def plot_speedup(path: str, specs: Sequence[StrategySpec], workload: Workload, cluster: Cluster) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, curves = speedup_curves(specs, workload, cluster)
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, values in curves.items():
        ax.plot(grid, values, label=label, lw=1.5)
    ax.axvline(cluster.inter_gbps, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="inter-node bandwidth (Gbit/s per node)", ylabel="modeled throughput / DDP's",
           title=f"{workload.params / 1e9:.3g}B params, {workload.step_compute_s:.3g} s/step, "
                 f"{cluster.nodes} x {cluster.gpus_per_node} GPUs")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    workload = _workload(args, parser)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.intra_node_gbps, args.inter_node_gbps,
                      args.latency_ms / 1e3)
    _check_links(cluster, workload, parser)
    if args.plot:
        _check_plot_path(args.plot, parser)
    specs, rows = _plans(args, parser, workload, cluster)
    _check_finite(rows, parser)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1, allow_nan=False))
    else:
        _table(rows, workload, cluster)
    if args.plot:
        try:
            plot_speedup(args.plot, specs, workload, cluster)
        except ImportError:
            parser.error("argument --plot: needs matplotlib (pip install matplotlib)")
        except (OSError, ValueError) as err:
            parser.error(f"argument --plot: cannot write {args.plot!r}: {err}")
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
