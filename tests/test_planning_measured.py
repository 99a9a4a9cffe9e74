"""The planner's bytes per step against the bytes real runs measure, for every registered strategy flag.

Every :data:`CASES` row is trained for real on CPU processes (gloo); what each rank put into collectives per
optimizer step (the strategy's ``CommLedger``; for plain DDP a counting comm hook on DDP's own buckets) must
equal the planner's count for the same model within 1%. All rows of one process layout run one after the
other inside ONE pair of spawned processes, so the whole table costs one start-up.

To add a layout (2 nodes x 2 processes once node replicas exist), add rows whose ``run`` is that layout and
whose ``planned`` names the planner cluster(s) and link class each measured byte belongs to; the harness for
4 processes as 2 nodes goes in :func:`_measure_layout`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_optx.planning import Cluster, StrategySpec, Workload, collectives_for, plan, wire_bytes
from tests.helpers.models import TinyModule
from tests.helpers.runner import _spawn

pytestmark = pytest.mark.multiprocess

STEPS_PER_EPOCH = 4  # 64 samples, batch 8, 2 ranks


@dataclass(frozen=True)
class RunLayout:
    """How the real run is launched: processes per node and nodes (today: 2 processes on one node)."""

    processes: int = 2
    num_nodes: int = 1


@dataclass(frozen=True)
class Case:
    """One strategy to run for real and to plan: ``spec`` as the command line takes it, ``steps`` (whole rounds),
    the test module's options, and the planner clusters ``(nodes, gpus_per_node)`` whose bytes per step must equal
    what each rank measured (on the only link class the cluster has)."""

    spec: str
    steps: int
    module: dict[str, Any] = field(default_factory=dict)
    run: RunLayout = RunLayout()
    planned: tuple[tuple[int, int], ...] = ((2, 1), (1, 2))


CASES: tuple[Case, ...] = (
    Case("ddp", 4),
    Case("local_sgd", 16),  # the default period, 8: two rounds
    Case("local_sgd:period=4,average_optimizer_state=true", 8, {"optimizer": "adamw"}),
    Case("ddp_powersgd", 4),
    Case("ddp_powersgd:rank=2", 4),
    Case("ddp_topk", 4),
    Case("ddp_topk:density=0.1", 4),
    Case("ddp_sign", 4),
    Case("ddp_fp16", 4),
    Case("ddp_bf16", 4),
    Case("diloco:inner_steps=4", 8),
    Case("diloco:inner_steps=4,fragments=2", 8),
    Case("diloco:inner_steps=4,compressor=sign", 8),
    Case("diloco:inner_steps=4,overlap=true,compressor=topk,density=0.05", 8),
    Case("diloco_x:inner_steps=4", 4),  # one round: adaptive compression changes the rank after the first
    Case("local_sgd:period=4", 8, {"buffer_numel": 37}),  # average_buffers defaults to true
    Case("local_sgd:period=4,average_buffers=false", 8, {"buffer_numel": 37}),
)


def _module(options: dict[str, Any]) -> TinyModule:
    """The wide MLP; ``buffer_numel``: with a floating buffer of that many entries (and an integer one, which no
    strategy averages), as a BatchNorm's statistics would be."""
    options = dict(options)
    buffer_numel = options.pop("buffer_numel", 0)
    module = TinyModule(model="wide_mlp", **options)
    if buffer_numel:
        module.register_buffer("running_stat", torch.zeros(buffer_numel))
        module.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
    return module


class _Counter:
    """Bytes of every gradient bucket plain DDP all-reduced (plain DDP has no ledger)."""

    def __init__(self) -> None:
        self.bytes = 0


def _counting_hook(state: _Counter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.bytes += buffer.numel() * buffer.element_size()
    buffer.div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


# DDP checks the hook's annotations by identity; `from __future__ import annotations` made them strings.
_counting_hook.__annotations__ = {"state": _Counter, "bucket": dist.GradBucket,
                                  "return": torch.futures.Future[torch.Tensor]}


def _build_strategy(spec: StrategySpec) -> Any:
    """The registered class with its registered init params, overridden by ``spec``'s options as the planner
    resolves them (compressor options go to ``compressor_options``)."""
    from lightning_optx.strategies import _REGISTERED

    if spec.flag == "ddp":
        return "ddp"
    cls, _, registered = _REGISTERED[spec.flag]
    settings = spec.resolved()
    kwargs = dict(registered)
    for key, value in spec.options.items():
        if key in settings and key not in ("compressor_options", "optimizer_state_tensors"):  # planner only
            kwargs[key] = value
    if "compressor_options" in settings and settings.get("compressor") is not None:
        kwargs["compressor_options"] = settings["compressor_options"]
    return cls(**kwargs)


def _measure_layout(cases: tuple[Case, ...]) -> list[dict[str, float]]:
    """On this rank (inside the spawned group): fit every case and return its bytes per optimizer step."""
    import lightning.pytorch as pl

    import lightning_optx  # noqa: F401  (registers the strategy names)

    out = []
    for case in cases:
        pl.seed_everything(0, workers=True, verbose=False)
        hook = _Counter()
        spec = StrategySpec.parse(case.spec)
        trainer = pl.Trainer(
            accelerator="cpu", devices=case.run.processes, num_nodes=case.run.num_nodes,
            strategy=_build_strategy(spec), max_steps=case.steps, max_epochs=case.steps // STEPS_PER_EPOCH + 1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        module = _module(case.module)
        if spec.flag == "ddp":
            module.on_fit_start = functools.partial(_register_hook, trainer, hook)  # type: ignore[method-assign]
        trainer.fit(module)
        comm = getattr(trainer.strategy, "comm", None)
        total = hook.bytes if comm is None else comm.ledger.total_bytes
        out.append({"steps": trainer.global_step, "bytes": total})
    return out


def _register_hook(trainer: Any, counter: _Counter) -> None:
    trainer.strategy.model.register_comm_hook(counter, _counting_hook)


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, float]]:
    layouts = sorted({c.run for c in CASES}, key=lambda r: (r.processes, r.num_nodes))
    results: dict[str, dict[str, float]] = {}
    for layout in layouts:
        cases = tuple(c for c in CASES if c.run == layout)
        ranks = _spawn(_entry_all, (cases,), layout.processes * layout.num_nodes, 600.0)
        for i, case in enumerate(cases):
            per_rank = [r[i] for r in ranks]
            assert all(r == per_rank[0] for r in per_rank), f"{case.spec}: ranks measured differently: {per_rank}"
            results[_key(case)] = per_rank[0]
    return results


def _key(case: Case) -> str:
    return f"{case.spec} {sorted(case.module.items())}"


def _entry_all(cases: tuple[Case, ...]) -> list[dict[str, float]]:
    return _measure_layout(cases)


def test_cases_cover_every_registered_flag() -> None:
    from lightning_optx.strategies import _REGISTERED

    assert {StrategySpec.parse(c.spec).flag for c in CASES} == {"ddp", *_REGISTERED}


def test_a_case_averages_buffers() -> None:
    """Local SGD runs on a model with buffers with and without averaging them, and the plans tell them apart."""
    with_buffers = {StrategySpec.parse(c.spec).resolved()["average_buffers"]: c for c in CASES
                    if c.module.get("buffer_numel")}
    assert set(with_buffers) == {True, False}
    bytes_per_step = {}
    for averaged, case in with_buffers.items():
        workload = Workload.from_module(_module(case.module), step_compute_s=1.0)
        assert workload.buffer_numel == case.module["buffer_numel"]  # the integer buffer is not averaged
        (row,) = plan([case.spec], workload, Cluster(nodes=2))
        bytes_per_step[averaged] = row.inter_node_bytes_per_step
    assert bytes_per_step[True] - bytes_per_step[False] == pytest.approx(4 * 37 / 4)  # fp32, every 4 steps


@pytest.mark.parametrize("case", CASES, ids=[f"{c.spec}{'+buffers' if c.module.get('buffer_numel') else ''}"
                                               for c in CASES])
def test_planner_bytes_equal_measured_bytes(case: Case, measured: dict[str, dict[str, float]]) -> None:
    got = measured[_key(case)]
    assert got["steps"] == case.steps
    measured_per_step = got["bytes"] / got["steps"]
    assert measured_per_step > 0
    workload = Workload.from_module(_module(case.module), step_compute_s=1.0)
    for nodes, gpus in case.planned:
        cluster = Cluster(nodes=nodes, gpus_per_node=gpus)
        (row,) = plan([case.spec], workload, cluster)
        planned = row.inter_node_bytes_per_step if nodes > 1 else row.intra_node_bytes_per_step
        assert planned == pytest.approx(measured_per_step, rel=0.01), (case.spec, (nodes, gpus))
        # on 2 ranks a collective's wire bytes equal its payload, the ledger's unit: check that reading too
        payload = sum(c.record.payload_bytes / c.every for c in collectives_for(case.spec, workload, cluster))
        assert payload == pytest.approx(measured_per_step, rel=0.01)
        assert all(wire_bytes(c.record) == pytest.approx(c.record.payload_bytes)
                   for c in collectives_for(case.spec, workload, cluster))
