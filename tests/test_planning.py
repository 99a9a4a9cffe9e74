"""The communication planner: its byte counts, timing and exposure rules, defaults and command line."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch

from lightning_optx import plan as cli
from lightning_optx.compression import get_compressor
from lightning_optx.distributed import CollectiveRecord, LinkModel
from lightning_optx.planning import (
    BACKWARD_FRACTION,
    IGNORED_OPTIONS,
    STRATEGY_DEFAULTS,
    Cluster,
    StrategySpec,
    Workload,
    collectives_for,
    compute_seconds,
    plan,
    transformer_shapes,
    wire_bytes,
)
from tests.helpers.models import TinyModule

P = 1_300_000_000


def one(spec: str, workload: Workload, cluster: Cluster):
    (row,) = plan([spec], workload, cluster)
    return row


# ---------------------------------------------------------------------------------------------- defaults


def registered_settings(flag: str) -> dict:
    """The registered class's constructor defaults updated by its registered init params."""
    from lightning_optx.strategies import _REGISTERED

    cls, _, init_params = _REGISTERED[flag]
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **init_params}


# node replicas (scale issue): checked against the class once it takes them; the optimizer's state tensors per
# parameter is a property of the optimizer, not of the strategy
PLANNER_ONLY = {"replica_size", "optimizer_state_tensors"}


@pytest.mark.parametrize("flag", [f for f in STRATEGY_DEFAULTS if f != "ddp"])
def test_planner_defaults_equal_the_registered_strategies(flag):
    actual = registered_settings(flag)
    for key, value in STRATEGY_DEFAULTS[flag].items():
        if key not in actual:
            assert key in PLANNER_ONLY, f"{flag}: the planner models {key!r}, which the strategy does not take"
            continue
        registered = actual[key] if key != "compressor_options" else (actual[key] or {})
        assert value == registered, f"{flag}: planner default {key}={value!r}, strategy {registered!r}"


@pytest.mark.parametrize("flag", [f for f in STRATEGY_DEFAULTS if f != "ddp"])
def test_ignored_options_are_real_arguments_of_the_strategy(flag):
    actual = registered_settings(flag)
    assert set(IGNORED_OPTIONS[flag]) <= set(actual)


def test_ignored_options_change_nothing():
    w, cluster = Workload.from_params(P, 1.0), Cluster(nodes=4, gpus_per_node=8)
    base, tuned = plan(["diloco_x", "diloco_x:outer_lr=0.5,adaptive_compression=false,error_feedback=false"], w,
                       cluster)
    assert tuned.inter_node_bytes_per_step == base.inter_node_bytes_per_step
    assert tuned.step_time_s == base.step_time_s


def test_overriding_the_compressor_drops_the_registered_compressor_options():
    w, cluster = Workload.from_params(P, 1.0), Cluster(nodes=4, gpus_per_node=8)
    (row,) = plan(["diloco_x:compressor=topk,density=0.01"], w, cluster)
    (ref,) = plan(["diloco:overlap=true,compressor=topk,density=0.01"], w, cluster)
    assert row.inter_node_bytes_per_step == ref.inter_node_bytes_per_step
    (plain,) = plan(["diloco_x:compressor=none,adaptive_compression=false"], w, cluster)
    assert plain.inter_node_bytes_per_step == pytest.approx(2 * 3 / 4 * 4 * P / 500)


def test_planner_knows_every_registered_flag():
    from lightning_optx.strategies import _REGISTERED

    assert set(STRATEGY_DEFAULTS) == {"ddp", *_REGISTERED}


# ---------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("params", [1, 1000, 125_000_000, P, 7_000_000_000, 107_000_000_000])
def test_transformer_shapes_hold_exactly_the_parameters(params):
    assert sum(math.prod(s) for s in transformer_shapes(params)) == params


def test_wire_bytes_are_the_link_model_at_one_byte_per_second():
    link = LinkModel(bandwidth_gbit=80.0, latency_s=0.0)  # 1e10 bytes/s
    for kind in ("all_reduce", "all_gather", "broadcast"):
        for n in (2, 3, 8):
            record = CollectiveRecord(kind, 1_000_000, n)
            assert wire_bytes(record) == pytest.approx(link.seconds(record) * 1e10)
    assert wire_bytes(CollectiveRecord("all_reduce", 800, 4)) == pytest.approx(2 * 3 / 4 * 800)
    assert wire_bytes(CollectiveRecord("all_gather", 800, 4)) == pytest.approx(3 * 800)


def test_ddp_sends_the_hierarchical_all_reduce():
    w = Workload.from_params(P, 1.0)
    row = one("ddp", w, Cluster(nodes=4, gpus_per_node=8))
    assert row.inter_node_bytes_per_step == pytest.approx(2 * 3 / 4 * 4 * P)
    assert row.intra_node_bytes_per_step == pytest.approx(2 * 7 / 8 * 4 * P)
    bf16 = one("ddp", Workload.from_params(P, 1.0, grad_bytes=2), Cluster(nodes=4, gpus_per_node=8))
    assert bf16.inter_node_bytes_per_step == pytest.approx(row.inter_node_bytes_per_step / 2)


def test_diloco_paper_setup_sends_h_times_fewer_bytes():
    """DiLoCo: H = 500, 8 replicas (one per node): 500x fewer inter-node bytes than DDP."""
    w = Workload.from_params(P, 1.0)
    cluster = Cluster(nodes=8, gpus_per_node=8)
    ddp, diloco = plan(["ddp", "diloco"], w, cluster)
    assert ddp.inter_node_bytes_per_step / diloco.inter_node_bytes_per_step == pytest.approx(500)


def test_compressed_bytes_are_the_compressors_own_count():
    module = TinyModule(model="transformer")
    w = Workload.from_module(module, 1.0)
    params = [p for p in module.parameters() if p.requires_grad]
    for flag, name, options in [("ddp_powersgd", "powersgd", {}), ("ddp_topk", "topk", {}), ("ddp_sign", "sign", {}),
                                ("ddp_fp16", "fp16", {}), ("ddp_powersgd:rank=2", "powersgd", {"rank": 2})]:
        found = collectives_for(flag, w, Cluster(nodes=2))
        expected = get_compressor(name, **options).payload_bytes(params, 2)
        assert sum(c.record.payload_bytes for c in found) == expected, flag


def test_sign_all_gather_grows_with_nodes_two_stage_does_not():
    w = Workload(shapes=((4096, 4096),) * 8, step_compute_s=1.0)  # matrices only: no raw fp32 all-reduce
    gather = [plan([StrategySpec("ddp_sign", sparse_collective="all_gather")], w, Cluster(nodes=n))[0]
              .inter_node_bytes_per_step for n in (2, 8, 64)]
    two_stage = [one("ddp_sign", w, Cluster(nodes=n)).inter_node_bytes_per_step for n in (2, 8, 64)]  # the default
    assert gather[2] / gather[0] == pytest.approx(63)
    # about 2 (n-1)/n of the 1-bit code, plus 4-byte scales gathered from every rank
    assert two_stage[2] / two_stage[0] == pytest.approx(2 * 63 / 64, rel=1e-3)
    assert two_stage[0] == pytest.approx(gather[0], rel=1e-3)  # on 2 nodes both send about the code once


def test_two_stage_plan_is_what_the_compressors_record():
    """The planner's collectives for sign / top-k are the compressors' own: kinds and payloads per world size."""
    w = Workload(shapes=((64, 48), (48,), (10, 64)), step_compute_s=1.0)
    for flag, name, options in (("ddp_sign", "sign", {}), ("ddp_topk", "topk", {"density": 0.1})):
        compressor = get_compressor(name, **options)
        params = [torch.empty(s) for s in w.shapes]
        for nodes in (2, 3, 8):
            spec = f"{flag}:density=0.1" if name == "topk" else flag
            found = collectives_for(spec, w, Cluster(nodes=nodes))
            assert sum(c.record.payload_bytes for c in found) == compressor.payload_bytes(params, nodes), (flag, nodes)
            assert {c.record.kind for c in found} == {"all_reduce", "all_to_all", "all_gather"}


def test_node_replicas_move_the_per_step_traffic_inside_the_node():
    w = Workload.from_params(P, 1.0)
    row = one("local_sgd:period=16", w, Cluster(nodes=2, gpus_per_node=2))
    kinds = {(c.link, c.every, c.record.kind, c.record.tag, c.record.world_size) for c in row.collectives}
    # process i of each node averages the whole model with process i of the other node: no gather follows
    assert kinds == {("intra", 1, "all_reduce", "grad", 2), ("inter", 16, "all_reduce", "params", 2)}
    assert row.intra_node_bytes_per_step == pytest.approx(4 * P)  # 2 (2-1)/2 x 4P every step
    assert row.inter_node_bytes_per_step == pytest.approx(4 * P / 16)
    flat = one("local_sgd:period=16,replica_size=1", w, Cluster(nodes=2, gpus_per_node=2))
    assert flat.inter_node_bytes_per_step == pytest.approx(row.inter_node_bytes_per_step)
    assert flat.intra_node_bytes_per_step == pytest.approx(4 * P / 16)  # no per-step all-reduce


def test_compressed_ddp_reduces_at_full_precision_inside_the_node():
    w = Workload.from_params(P, 1.0)
    row = one("ddp_fp16", w, Cluster(nodes=2, gpus_per_node=4))
    assert row.intra_node_bytes_per_step == pytest.approx(2 * 3 / 4 * 4 * P)
    assert row.inter_node_bytes_per_step == pytest.approx(2 * P)  # 2 (2-1)/2 x 2 bytes x P


def test_fragments_split_bytes_not_their_total():
    w = Workload.from_params(P, 1.0)
    one_fragment = one("diloco:inner_steps=100", w, Cluster(nodes=4))
    four = one("diloco:inner_steps=100,fragments=4", w, Cluster(nodes=4))
    assert four.inter_node_bytes_per_step == pytest.approx(one_fragment.inter_node_bytes_per_step, rel=1e-9)
    assert len(four.collectives) == 4 * len(one_fragment.collectives)


# ---------------------------------------------------------------------------------------------- timing


def test_times_come_from_the_link_model():
    w = Workload.from_params(P, 10.0)
    cluster = Cluster(nodes=4, gpus_per_node=1, inter_gbps=10.0, latency_s=1e-3)
    row = one("ddp_fp16", w, cluster)
    expected = LinkModel(10.0, 1e-3).seconds(CollectiveRecord("all_reduce", 2 * P, 4))
    assert row.comm_time_s == pytest.approx(expected)
    assert row.exposed_comm_s == pytest.approx(expected)  # compressed DDP blocks
    assert row.step_time_s == pytest.approx(10.0 + expected)


def test_ddp_hides_behind_the_backward_pass_only():
    cluster = Cluster(nodes=2, inter_gbps=100.0, latency_s=0.0)
    comm = 4 * P / (100e9 / 8)  # 2 (2-1)/2 x 4P bytes at 100 Gbit/s
    hidden = one("ddp", Workload.from_params(P, 1.5 * comm / BACKWARD_FRACTION), cluster)
    assert hidden.exposed_comm_s == 0.0 and hidden.comm_time_s == pytest.approx(comm)
    exposed = one("ddp", Workload.from_params(P, comm), cluster)
    assert exposed.exposed_comm_s == pytest.approx(comm - BACKWARD_FRACTION * comm)


def test_overlap_hides_a_round_local_sgd_blocks():
    cluster = Cluster(nodes=4, inter_gbps=1.0)
    w = Workload.from_params(P, 1.0)
    diloco, overlapped, local = plan(["diloco:inner_steps=100", "diloco:inner_steps=100,overlap=true",
                                      "local_sgd:period=100"], w, cluster)
    assert overlapped.comm_time_s == pytest.approx(diloco.comm_time_s)
    assert diloco.exposed_comm_s == pytest.approx(diloco.comm_time_s)
    assert local.exposed_comm_s == pytest.approx(local.comm_time_s)
    round_comm = diloco.comm_time_s * 100
    assert overlapped.exposed_comm_s == pytest.approx(max(0.0, round_comm - 100 * 1.0) / 100)
    assert overlapped.speedup_vs_ddp > diloco.speedup_vs_ddp


def test_speedup_is_step_time_ratio_and_ddp_is_one():
    w = Workload.from_params(P, 0.5)
    rows = plan(list(STRATEGY_DEFAULTS), w, Cluster(nodes=4, gpus_per_node=8, inter_gbps=10.0))
    ddp = rows[0]
    assert ddp.speedup_vs_ddp == 1.0
    for r in rows:
        assert r.speedup_vs_ddp == pytest.approx(ddp.step_time_s / r.step_time_s)
        assert r.compute_utilisation == pytest.approx(0.5 / r.step_time_s)
        assert 0 <= r.exposed_comm_s <= r.comm_time_s + 1e-12


def test_compute_seconds_formula():
    assert compute_seconds(10**9, 1000, gpu_tflops=100, mfu=0.5) == pytest.approx(6 * 10**12 / (50 * 10**12))


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("spec", "message"), [
    ("foo", "unknown strategy 'foo'"),
    ("diloco:bar=1", "unknown option 'bar'"),
    ("local_sgd:rank=4", "unknown option 'rank'"),
    ("ddp_powersgd:bar=1", "unknown option 'bar'"),
    ("ddp_topk:density=2", "density"),
    ("local_sgd:period=0", "period"),
    ("diloco:compressor=zip", "compressor"),
    ("diloco:inner_steps=4,fragments=0", "fragments"),
    ("diloco:inner_steps=6,fragments=4", "fragments"),
    ("local_sgd:period=2.5", "period"),
    ("local_sgd:qsr_alpha=0.02", "qsr_alpha"),
])
def test_bad_strategies_are_rejected_naming_the_option(spec, message):
    with pytest.raises(ValueError, match=message):
        plan([spec], Workload.from_params(P, 1.0), Cluster(nodes=2, gpus_per_node=8))


def test_bad_replica_size_is_rejected():
    with pytest.raises(ValueError, match="replica_size=3"):
        plan(["diloco:replica_size=3"], Workload.from_params(P, 1.0), Cluster(nodes=2, gpus_per_node=8))


@pytest.mark.parametrize(("kwargs", "name"), [({"nodes": 0}, "nodes"), ({"gpus_per_node": -1}, "gpus_per_node"),
                                              ({"inter_gbps": 0.0}, "inter_gbps"), ({"latency_s": -1.0}, "latency")])
def test_bad_cluster_is_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Cluster(**kwargs)


# ---------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(("argv", "flag"), [
    (["--params", "0", "--step-compute-s", "1"], "--params"),
    (["--params", "-5", "--step-compute-s", "1"], "--params"),
    (["--params", "1e9", "--step-compute-s", "0"], "--step-compute-s"),
    (["--params", "1e9", "--step-compute-s", "1", "--nodes", "0"], "--nodes"),
    (["--params", "1e9", "--step-compute-s", "1", "--gpus-per-node", "1.5"], "--gpus-per-node"),
    (["--params", "1e9", "--step-compute-s", "1", "--inter-node-gbps", "0"], "--inter-node-gbps"),
    (["--params", "1e9", "--step-compute-s", "1", "--intra-node-gbps", "nan"], "--intra-node-gbps"),
    (["--params", "1e9", "--step-compute-s", "1", "--latency-ms", "-1"], "--latency-ms"),
    (["--params", "1e9", "--tokens-per-step", "100", "--mfu", "1.5"], "--mfu"),
    (["--params", "1e9", "--step-compute-s", "1", "--strategy", "nope"], "--strategy"),
    (["--params", "1e9", "--step-compute-s", "1", "--strategy", "diloco:inner=5"], "--strategy"),
    (["--params", "1e9"], "--step-compute-s"),
    (["--params", "1e30", "--step-compute-s", "1"], "--params"),
    (["--params", "1.5", "--step-compute-s", "1"], "--params"),
    (["--params", "1e9", "--step-compute-s", "1", "--grad-dtype", "fp8"], "--grad-dtype"),
    (["--model", "no_such_module:Model", "--step-compute-s", "1"], "--model"),
    (["--model", "builtins:int", "--step-compute-s", "1"], "--model"),
    (["--params", "1e6", "--tokens-per-step", "1e-300", "--gpu-tflops", "1e300"], "--tokens-per-step"),
    (["--params", "1e6", "--tokens-per-step", "1e300", "--gpu-tflops", "1e-300"], "--tokens-per-step"),
    (["--params", "1e6", "--step-compute-s", "1", "--inter-node-gbps", "1e-320"], "--inter-node-gbps"),
    (["--params", "1e6", "--step-compute-s", "1", "--intra-node-gbps", "1e-320"], "--intra-node-gbps"),
    (["--params", "1e6", "--step-compute-s", "1", "--strategy", "diloco:overlap=maybe"], "--strategy"),
    (["--params", "1e6", "--step-compute-s", "1", "--strategy", "diloco:outer_lr=-1"], "--strategy"),
    (["--params", "1e6", "--step-compute-s", "1", "--json", "--plot", "/nonexistent/dir/x.png"], "--plot"),
    (["--params", "1e6", "--step-compute-s", "1", "--plot", "speedup.txt"], "--plot"),
])
def test_bad_input_exits_2_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and flag in err, err
    assert out == ""  # checked before anything is printed


def test_json_output_has_the_documented_fields(capsys):
    assert cli.main(["--params", "1.3e9", "--tokens-per-step", "16384", "--nodes", "4", "--gpus-per-node", "8",
                     "--inter-node-gbps", "10", "--json", "--strategy", "ddp", "diloco:inner_steps=100"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["ddp", "diloco:inner_steps=100"]
    for key in ("strategy", "inter_node_bytes_per_step", "intra_node_bytes_per_step", "comm_time_s", "exposed_comm_s",
                "step_time_s", "speedup_vs_ddp"):
        assert key in rows[0]
    assert rows[0]["inter_node_bytes_per_step"] / rows[1]["inter_node_bytes_per_step"] == pytest.approx(100)
    compute = compute_seconds(1_300_000_000, 16384, 989.0, 0.4)
    assert rows[0]["step_time_s"] >= compute


def test_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "speedup.png"
    assert cli.main(["--params", "7e9", "--step-compute-s", "2", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in STRATEGY_DEFAULTS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid, curves = cli.speedup_curves([StrategySpec("ddp"), StrategySpec("diloco")], Workload.from_params(P, 1.0),
                                      Cluster(nodes=4, gpus_per_node=8), points=5)
    assert grid[0] == pytest.approx(0.1) and grid[-1] == pytest.approx(400.0)
    assert curves["ddp"] == [1.0] * 5 and curves["diloco"][0] > curves["diloco"][-1]


def test_model_flag_counts_a_modules_parameters(capsys):
    assert cli.main(["--model", "tests.helpers.models:TinyModule", "--step-compute-s", "0.01", "--nodes", "2",
                     "--gpus-per-node", "1", "--json", "--strategy", "ddp"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in TinyModule().parameters())
    assert row["inter_node_bytes_per_step"] == pytest.approx(4 * params)


def test_help_from_a_fresh_interpreter():
    done = subprocess.run([sys.executable, "-m", "lightning_optx.plan", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--inter-node-gbps" in done.stdout


def test_meta_module_needs_no_memory():
    with torch.device("meta"):
        module = torch.nn.Linear(100_000, 100_000)  # 40 GB in fp32
    assert Workload.from_module(module, 1.0).params == 100_000 * 100_001


# ---------------------------------------------------------------------------------------------- benchmark


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "communication.py"
    spec = importlib.util.spec_from_file_location("communication_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_models_time_with_the_planner():
    bench = load_benchmark()
    steps, compute = 10, 0.01
    records = [CollectiveRecord("all_reduce", 4_000_000, 2, overlapped=True, tag="grad", step=s) for s in range(steps)]
    t = LinkModel(1.0, bench.LATENCY_S).seconds(records[0])
    got = bench.timing(records, compute, steps)["1gbit"]
    assert got["wire_s"] == pytest.approx(steps * t)
    assert got["exposed_s"] == pytest.approx(steps * max(0.0, t - BACKWARD_FRACTION * compute))
    assert got["total_s"] == pytest.approx(steps * compute + got["exposed_s"])
    specs = {s.name: s for s in bench.STRATEGIES}
    assert bench.planner_spec(specs["ddp_powersgd"]) == "ddp_powersgd:rank=4"
    assert bench.cluster_model(specs["ddp"])["speedup_vs_ddp"] == 1.0
    assert all(bench.cluster_model(s)["speedup_vs_ddp"] > 0 for s in bench.STRATEGIES)


def test_benchmark_long_mode_parses_to_the_long_config_and_summarises_seeds(tmp_path):
    bench = load_benchmark()
    args = bench.parse_args(["--long"])
    cfg = bench.config_for(args)
    assert cfg == bench.LONG and cfg["steps"] >= 1500 and len(bench.LONG_SEEDS) >= 3
    assert [s.name for s in bench.selected_specs(args)] == [
        s.name for s in bench.STRATEGIES if s.name in bench.LONG_STRATEGIES]
    diloco = next(s for s in bench.STRATEGIES if s.name == "diloco")
    assert cfg["steps"] % diloco.options["inner_steps"] == 0  # whole DiLoCo rounds
    assert cfg["steps"] // diloco.options["inner_steps"] >= 15
    with pytest.raises(SystemExit, match="exclude"):
        bench.config_for(bench.parse_args(["--long", "--quick"]))
    def fit(val_loss, kind, nbytes):
        mix = [{"kind": kind, "tag": "grad", "overlapped": False, "count": 100, "bytes": nbytes}]
        return {"val_loss": val_loss, "bytes_total": nbytes, "bytes_per_step": nbytes / 100, "steps": 100,
                "step_s": 0.1, "collective_mix": mix}

    run = {"ddp": fit(2.0, "all_reduce", 800.0), "ddp_sign": fit(2.2, "all_to_all", 40.0)}
    other = {"ddp": {**run["ddp"], "val_loss": 2.5}, "ddp_sign": {**run["ddp_sign"], "val_loss": 2.4}}
    row = bench.seed_statistics({0: run, 1: other})["ddp_sign"]
    assert row["val_loss_ratio"] == pytest.approx([1.1, 0.96])
    assert row["val_loss_ratio_mean"] == pytest.approx(1.03)
    assert row["val_loss_ratio_std"] == pytest.approx(0.14 / 2**0.5)
    # 2 ranks: a ring all-reduce sends and receives its input once, an all-to-all only the half it gives away
    assert row["bytes_ratio"] == pytest.approx(20.0) and row["wire_bytes_ratio"] == pytest.approx(40.0)
    assert row["bytes_ok"]
    assert row["passed"] and row["loss_ratio_excess"] == pytest.approx(-0.02)
    saved = tmp_path / "communication_long.json"
    saved.write_text(json.dumps({"config": cfg, "results": {"1": other}, "benchmark_wall_s": 12.5,
                                 "environment": {"start": "then"}}))
    assert bench.load_long(saved, cfg) == ({1: other}, 12.5, "then")  # --resume keeps seed 1's fits
    with pytest.raises(SystemExit, match="--resume"):
        bench.load_long(saved, {**cfg, "steps": 10})
    worse = bench.seed_statistics({0: {**run, "ddp_sign": {**run["ddp_sign"], "val_loss": 2.3}}})["ddp_sign"]
    assert not worse["passed"] and worse["loss_ratio_excess"] == pytest.approx(0.10)


def test_a_single_gpu_communicates_nothing():
    rows = plan(list(STRATEGY_DEFAULTS), Workload.from_params(P, 1.0), Cluster())
    assert all(r.comm_time_s == 0 and r.speedup_vs_ddp == 1.0 and r.inter_node_bytes_per_step == 0 for r in rows)


# ---------------------------------------------------------------------------------------------- option checks


@pytest.mark.parametrize(("spec", "message"), [
    ("diloco:overlap=maybe", "`overlap` must be true or false"),
    ("diloco_x:overlap=2", "`overlap` must be true or false"),
    ("local_sgd:average_buffers=3", "`average_buffers` must be true or false"),
    ("local_sgd:average_optimizer_state=none", "`average_optimizer_state` must be true or false"),
    ("ddp_powersgd:error_feedback=banana", "`error_feedback` must be true or false"),
    ("ddp_fp16:check_finite=sometimes", "`check_finite` must be true or false"),
    ("diloco:outer_lr=banana", "`outer_lr` must be a finite number"),
    ("diloco:outer_lr=nan", "`outer_lr` must be a finite number"),
    ("diloco:inner_steps=true", "`inner_steps` must be an integer"),
    ("diloco:compression_bounds=5:1", "`compression_bounds` must be low:high"),
    ("local_sgd:optimizer_state_tensors=-1", "optimizer_state_tensors"),
])
def test_options_are_typed_strictly(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        plan([spec], Workload.from_params(P, 1.0), Cluster(nodes=2, gpus_per_node=8))
    assert str(info.value).startswith(spec.partition(":")[0])


@pytest.mark.parametrize(("flag", "kwargs", "spec", "name"), [
    ("diloco", {"outer_lr": -1.0}, "diloco:outer_lr=-1", "outer_lr"),
    ("diloco", {"outer_momentum": 1.0}, "diloco:outer_momentum=1", "outer_momentum"),
    ("diloco", {"outer_optimizer": "adam"}, "diloco:outer_optimizer=adam", "outer_optimizer"),
    ("diloco", {"adaptive_compression": True}, "diloco:adaptive_compression=true", "adaptive_compression"),
    ("diloco_x", {"compressor": None, "compressor_options": None}, "diloco_x:compressor=none",
     "adaptive_compression"),
    ("local_sgd", {"warmup_steps": -5}, "local_sgd:warmup_steps=-5", "warmup_steps"),
    ("local_sgd", {"min_period": 0}, "local_sgd:min_period=0", "min_period"),
    ("ddp_topk", {"compressor_options": {"density": 1.5}}, "ddp_topk:density=1.5", "density"),
])
def test_ignored_options_are_rejected_where_the_strategy_rejects_them(flag, kwargs, spec, name):
    from lightning_optx.strategies import _REGISTERED

    cls, _, registered = _REGISTERED[flag]
    with pytest.raises(ValueError, match=name):
        cls(**{**registered, **kwargs})
    with pytest.raises(ValueError, match=name):
        plan([spec], Workload.from_params(P, 1.0), Cluster(nodes=2, gpus_per_node=8))


@pytest.mark.parametrize("word", ["no", "false", "0", "No", "FALSE"])
def test_boolean_words_mean_what_they_say(word):
    w, cluster = Workload.from_params(P, 1.0), Cluster(nodes=4, gpus_per_node=8, inter_gbps=1.0)
    blocking, overlapped, off = plan(["diloco_x:overlap=false", "diloco_x", f"diloco_x:overlap={word}"], w, cluster)
    assert off.exposed_comm_s == pytest.approx(blocking.exposed_comm_s)
    assert overlapped.exposed_comm_s < off.exposed_comm_s


def test_optimizer_state_tensors_scale_the_averaged_state():
    w, cluster = Workload.from_params(P, 1.0), Cluster(nodes=2, gpus_per_node=1)
    plain, adam, sgd = plan(["local_sgd", "local_sgd:average_optimizer_state=yes",
                             "local_sgd:average_optimizer_state=1,optimizer_state_tensors=1"], w, cluster)
    assert adam.inter_node_bytes_per_step == pytest.approx(3 * plain.inter_node_bytes_per_step)
    assert sgd.inter_node_bytes_per_step == pytest.approx(2 * plain.inter_node_bytes_per_step)


def test_node_replicas_average_the_whole_payload_on_every_process():
    """As the strategies do (``OptxDDPStrategy._build_groups``): process i of every replica averages the whole
    payload with process i of the other replicas, each on its own link; no gather follows."""
    w = Workload.from_params(P, 1.0)
    diloco = one("diloco", w, Cluster(nodes=4, gpus_per_node=8))
    grads = 2 * 7 / 8 * 4 * P  # DDP inside the node every step
    assert diloco.intra_node_bytes_per_step == pytest.approx(grads)
    assert diloco.inter_node_bytes_per_step == pytest.approx(2 * 3 / 4 * 4 * P / 500)
    two_nodes = one("diloco:replica_size=16", w, Cluster(nodes=4, gpus_per_node=8))
    # two replicas of two nodes: DDP across the replica's 2 nodes every step (2 (2-1)/2 x 4P); per round every
    # process all-reduces the whole payload with its peer in the other replica
    assert two_nodes.inter_node_bytes_per_step == pytest.approx(4 * P + 4 * P / 500)


# ---------------------------------------------------------------------------------------------- import weight


def test_the_planner_imports_no_lightning():
    """The planner's modules, and every lightning_optx module they import, import nothing from Lightning (the
    package's own ``__init__`` does, to register the strategy flags: Lightning has no hook to do it later)."""
    import ast
    from pathlib import Path

    root = Path(cli.__file__).resolve().parents[1]
    todo, seen = ["lightning_optx.planning", "lightning_optx.plan"], set()
    while todo:
        name = todo.pop()
        if name in seen or name in ("lightning_optx",):
            continue
        seen.add(name)
        path = root / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = root / name.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for imported in names:
                assert imported.split(".")[0] not in ("lightning", "pytorch_lightning"), (name, imported)
                if imported.startswith("lightning_optx."):
                    todo.append(imported)
    assert {"lightning_optx.planning.model", "lightning_optx.planning.options", "lightning_optx.distributed",
            "lightning_optx.compression"} <= seen


def test_overlapped_records_are_exposed_beyond_their_window():
    """A ledger's overlapped records are not free: the planner exposes what exceeds the window that hides them."""
    from lightning_optx.planning import exposed_seconds, run_collectives

    link = Cluster(nodes=2, inter_gbps=1.0, latency_s=0.0)
    records = [CollectiveRecord("all_reduce", 125_000_000, 2),  # 1 s, blocking
               CollectiveRecord("all_reduce", 125_000_000, 2, overlapped=True, tag="grad"),  # 1 s, behind backward
               CollectiveRecord("all_reduce", 125_000_000, 2, overlapped=True, tag="pseudo_grad")]  # behind compute
    wire, exposed = exposed_seconds(run_collectives(records, steps=1), link, compute_s=0.75)
    assert wire == pytest.approx(3.0)
    assert exposed == pytest.approx(1.0 + (1.0 - BACKWARD_FRACTION * 0.75) + (1.0 - 0.75))
