"""``benchmarks/gpu.py --device cpu --tiny``: every part of the GPU benchmark runs end to end on the CPU (in the
default suite, so that the benchmark a GPU session will run cannot rot unnoticed). Sizes are tiny: the figures
are not checked, only that each one is there, finite and of the right kind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# set in this process by earlier in-process DDP tests; the port may still be held by their store
DISTRIBUTED_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
                         "LOCAL_WORLD_SIZE", "GROUP_RANK"}


def test_benchmark_dry_run_writes_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    inherited = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env = {**inherited, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_cpu_tiny.json").read_text())
    assert (tmp_path / "gpu_cpu_tiny.png").stat().st_size > 10_000
    parts = report["parts"]
    assert set(parts) == {"grokfast", "surgery", "privacy", "compression"}
    numbers = [*parts["grokfast"]["step_ms"].values(), *parts["grokfast"]["overhead_pct"].values(),
               *parts["compression"]["gb_per_s"].values(), parts["compression"]["powersgd_share_of_ddp_step"]]
    numbers += [r for row in parts["surgery"]["ratio"].values() for r in row.values()]
    assert set(parts["grokfast"]["overhead_pct"]) == {"ema", "ma"}
    assert set(parts["surgery"]["ratio"]) == {"2", "8"}
    assert set(parts["compression"]["gb_per_s"]) == {"powersgd", "topk", "sign", "fp16", "bf16"}
    if "skipped" not in parts["privacy"]:
        assert set(parts["privacy"]["relative"]) == {"hooks", "ghost"}
        numbers += list(parts["privacy"]["samples_per_s"].values())
    assert all(math.isfinite(x) for x in numbers)
    assert all(x > 0 for x in parts["compression"]["gb_per_s"].values())
    for key in ("grokfast/target/ema", "surgery/T8/target/pcgrad", "compression/powersgd_share_of_ddp_step"):
        assert f"{key}: " in run.stdout
