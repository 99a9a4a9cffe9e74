"""The planner's answers at internet scale: the tables and plots of docs/planning.md.

Nothing is trained: every number comes from :mod:`lightning_optx.planning` (the same model as
``python -m lightning_optx.plan``). Prints the markdown tables of docs/planning.md and writes the plots to
``docs/assets/planning-*.png``.

Run::

    python benchmarks/planning_scenarios.py > /tmp/planning_tables.md
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_optx.plan import plot_speedup  # noqa: E402
from lightning_optx.planning import (  # noqa: E402
    STRATEGY_DEFAULTS,
    Cluster,
    StrategySpec,
    Workload,
    compute_seconds,
    plan,
)

ASSETS = REPO / "docs" / "assets"
H100 = dict(gpu_tflops=989.0, mfu=0.4)
TOKENS_PER_GPU_STEP = 16_384  # 8 sequences of 2048 tokens per GPU per optimizer step
GPUS_PER_NODE = 8
INTRA_GBPS = 3600.0


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def diloco_paper() -> str:
    """DiLoCo's setting: H = 500, 8 replicas (one per node of 8 GPUs), bytes and speed-up vs DDP."""
    params = 400_000_000
    workload = Workload.from_params(params, compute_seconds(params, TOKENS_PER_GPU_STEP, **H100))
    rows = []
    for gbps in (1.0, 10.0, 100.0):
        cluster = Cluster(nodes=8, gpus_per_node=GPUS_PER_NODE, intra_gbps=INTRA_GBPS, inter_gbps=gbps)
        ddp, diloco = plan(["ddp", "diloco"], workload, cluster)
        rows.append([f"{gbps:g}", f"{ddp.inter_node_bytes_per_step / 1e6:,.0f}",
                     f"{diloco.inter_node_bytes_per_step / 1e6:,.2f}",
                     f"{ddp.inter_node_bytes_per_step / diloco.inter_node_bytes_per_step:.0f}x",
                     f"{100 * ddp.compute_utilisation:.0f}%", f"{100 * diloco.compute_utilisation:.0f}%",
                     f"{diloco.speedup_vs_ddp:.2f}x"])
    head = ["Gbit/s between nodes", "DDP MB/step per node", "DiLoCo MB/step per node", "fewer bytes",
            "DDP utilisation", "DiLoCo utilisation", "DiLoCo speed-up"]
    return (f"400M parameters, 8 nodes x 8 GPUs, one replica per node, H = 500, "
            f"{workload.step_compute_s:.3f} s compute per step\n\n" + _md(head, rows))


DILOCOX_SPEEDUP = 357.0


def dilocox_paper() -> str:
    """DiLoCoX's setting: 107B parameters; 2 clusters of PP=8 x DP=2 (each DP worker, a pipeline of 8 GPUs, counted
    as one "GPU" and one DiLoCo replica); 1 Gbit/s read per cluster, or per worker (16 per cluster)."""
    params = 107_000_000_000
    rows = []
    for gbps, link in ((1.0, "1 per cluster"), (16.0, "1 per worker = 16 per cluster")):
        cluster = Cluster(nodes=2, gpus_per_node=2, inter_gbps=gbps)
        for grad in ("fp32", "bf16"):
            grad_bytes = 4 if grad == "fp32" else 2
            (ddp,) = plan(["ddp"], Workload.from_params(params, 1.0, grad_bytes=grad_bytes), cluster)
            needed = ddp.comm_time_s / (DILOCOX_SPEEDUP - 1 / 3)  # speed-up of fully hidden comm: 1/3 + t_AR / c
            for compute in sorted((0.6, 2.0, needed, 30.0)):
                workload = Workload.from_params(params, compute, grad_bytes=grad_bytes)
                ddp, diloco, dilocox = plan(["ddp", "diloco:replica_size=1", "diloco_x:replica_size=1"], workload,
                                            cluster)
                rows.append([link, grad, f"{compute:.3g}", f"{ddp.comm_time_s:,.0f}", f"{diloco.speedup_vs_ddp:.0f}x",
                             f"{dilocox.speedup_vs_ddp:.0f}x", f"{100 * dilocox.compute_utilisation:.0f}%"])
    head = ["Gbit/s", "DDP gradients", "compute s/step", "AllReduce s/step", "diloco (H=500)", "diloco_x (H=500)",
            "diloco_x utilisation"]
    return _md(head, rows)


def cluster_grid(params: int) -> str:
    """Speed-up vs DDP of every flag on 4-32 nodes of 8 GPUs at 1, 10 and 100 Gbit/s."""
    compute = compute_seconds(params, TOKENS_PER_GPU_STEP, **H100)
    workload = Workload.from_params(params, compute)
    nodes_list = (4, 8, 16, 32)
    links = (1.0, 10.0, 100.0)
    columns = [(n, g) for g in links for n in nodes_list]
    rows = {flag: [] for flag in STRATEGY_DEFAULTS}
    utilisation = []
    for nodes, gbps in columns:
        cluster = Cluster(nodes=nodes, gpus_per_node=GPUS_PER_NODE, intra_gbps=INTRA_GBPS, inter_gbps=gbps)
        for r in plan(list(STRATEGY_DEFAULTS), workload, cluster):
            rows[r.flag].append(f"{r.speedup_vs_ddp:.3g}x")
            if r.flag == "ddp":
                utilisation.append(f"{100 * r.compute_utilisation:.0f}%")
    head = ["strategy"] + [f"{n}n @{g:g}G" for n, g in columns]
    body = [["DDP utilisation", *utilisation]] + [[flag, *cells] for flag, cells in rows.items()]
    return (f"{params / 1e9:g}B parameters, {compute:.3f} s compute per step (16k tokens per GPU, H100 at 40% MFU); "
            f"columns: nodes of 8 GPUs @ Gbit/s between nodes; cells: modeled throughput / DDP's\n\n" + _md(head, body))


def benchmark_figures() -> str:
    """The measured figures of ``benchmarks/communication.py`` (full runs) next to the planner's speed-up on the
    benchmark's GPU cluster setting (``CLUSTER`` there), as that benchmark now prints them."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("communication_benchmark", REPO / "benchmarks" / "communication.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    rows = []
    for name in ("communication.json", "communication_custom.json"):
        path = REPO / "benchmarks" / "results" / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for label, res in data["results"].items():
            if label == "ddp" and rows:
                continue
            ratios = data["ratios_vs_ddp"][label]
            model = bench.cluster_model(bench.Spec(label, res["strategy"], res["options"]))
            rows.append([bench.planner_spec(bench.Spec(label, res["strategy"], res["options"])),
                         f"{res['val_loss']:.4f}", f"{ratios['val_loss_ratio']:.3f}", f"{ratios['bytes_ratio']:.1f}x",
                         f"{model['speedup_vs_ddp']:.3g}x", f"{100 * model['compute_utilisation']:.0f}%"])
    c = bench.CLUSTER
    head = ["strategy", "val loss (CPU)", "loss / DDP's", "fewer bytes (measured)",
            f"modeled speed-up, {c['params'] / 1e9:g}B on {c['nodes']}x{c['gpus_per_node']} @{c['inter_gbps']:g}G",
            "modeled utilisation"]
    return _md(head, rows)


def plots() -> list[Path]:
    ASSETS.mkdir(parents=True, exist_ok=True)
    specs = [StrategySpec(f) for f in STRATEGY_DEFAULTS]
    out = []
    figures = ((1_300_000_000, 4, "planning-1.3b-4x8.png"), (7_000_000_000, 16, "planning-7b-16x8.png"))
    for params, nodes, name in figures:
        workload = Workload.from_params(params, compute_seconds(params, TOKENS_PER_GPU_STEP, **H100))
        cluster = Cluster(nodes=nodes, gpus_per_node=GPUS_PER_NODE, intra_gbps=INTRA_GBPS, inter_gbps=10.0)
        plot_speedup(str(ASSETS / name), specs, workload, cluster)
        out.append(ASSETS / name)
    return out


def main() -> None:
    print("## DiLoCo\n")
    print(diloco_paper())
    print("\n## DiLoCoX\n")
    print(dilocox_paper())
    for params in (1_300_000_000, 7_000_000_000):
        print(f"\n## {params / 1e9:g}B\n")
        print(cluster_grid(params))
    print("\n## Benchmark figures\n")
    print(benchmark_figures())
    for path in plots():
        print(f"\nplot: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
