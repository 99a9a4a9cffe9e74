"""The planner's bytes per step against the bytes real runs measure, for every registered strategy flag.

Every :data:`CASES` row is trained for real on CPU processes (gloo); what each rank put into collectives per
optimizer step (the strategy's ``CommLedger``; for plain DDP a counting comm hook on DDP's own buckets) must
equal the planner's count for the same model within 1%, per link class: the payload bytes (the ledger's unit)
and the bytes on the wire (the planner counts one direction, the ledger sent plus received: half of it). All
rows of one process layout run one after the other inside ONE set of spawned processes, so each layout costs
one start-up.

Rows with ``run=TWO_BY_TWO`` run 4 processes as 2 nodes x 2 (the variables torchrun sets) and are compared
with the planner's 2 x 2 cluster link class by link class; the one-off broadcast of replica 0's weights at the
start (tag ``"init"``) is not a per-step cost and is left out. That layout's fits are ``slow``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_optx.planning import Cluster, StrategySpec, Workload, collectives_for, plan
from tests.helpers.models import TinyModule
from tests.helpers.runner import _spawn

pytestmark = pytest.mark.multiprocess


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


TWO_BY_TWO = RunLayout(processes=2, num_nodes=2)


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
    # 2 nodes x 2 processes: node replicas (DDP inside the node, averages across), hierarchical compressed DDP
    Case("local_sgd:period=4", 8, run=TWO_BY_TWO, planned=((2, 2),)),
    Case("diloco:inner_steps=4", 8, run=TWO_BY_TWO, planned=((2, 2),)),
    Case("ddp_sign", 4, run=TWO_BY_TWO, planned=((2, 2),)),
    Case("ddp_powersgd", 4, run=TWO_BY_TWO, planned=((2, 2),)),
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
        mark = _LedgerMark()
        trainer = pl.Trainer(callbacks=[mark],
            accelerator="cpu", devices=case.run.processes, num_nodes=case.run.num_nodes,
            strategy=_build_strategy(spec), max_steps=case.steps, max_epochs=case.steps,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        module = _module(case.module)
        if spec.flag == "ddp":
            module.on_fit_start = functools.partial(_register_hook, trainer, hook)  # type: ignore[method-assign]
        trainer.fit(module)
        out.append({"steps": trainer.global_step, **_bytes_by_link(trainer, hook, mark.records)})
    return out


class _LedgerMark(pl.Callback):
    """How many records the ledger held when training ended, before the strategy's end-of-fit synchronisation
    (a partial round, e.g. a fragment's, is not a per-step cost the planner models)."""

    records: int | None = None

    def on_train_end(self, trainer: Any, module: Any) -> None:
        finish = getattr(trainer.strategy, "_finish_pending", None)
        if finish is not None:  # an overlapped round issued during training: its collectives count (and are merged
            finish()            # into the ledger when waited for); the end-of-fit sync would wait for it first
        comm = getattr(trainer.strategy, "comm", None)
        self.records = None if comm is None else len(comm.ledger.records)


def _bytes_by_link(trainer: Any, hook: _Counter, upto: int | None) -> dict[str, float]:
    """Payload and wire bytes (sent + received) this rank put on each link class during training, the one-off
    "init" excluded."""
    comm = getattr(trainer.strategy, "comm", None)
    if comm is None:  # plain DDP on one node: the counted buckets, all-reduced among the ranks
        world = trainer.world_size
        return {"intra_node": hook.bytes, "intra_node_wire": 4 * (world - 1) * hook.bytes / world,
                "inter_node": 0, "inter_node_wire": 0}
    records = [r for r in comm.ledger.records[:upto] if r.tag != "init"]
    out: dict[str, float] = {}
    for link in ("intra_node", "inter_node"):
        out[link] = sum(r.payload_bytes for r in records if r.link == link)
        out[f"{link}_wire"] = sum(r.wire_bytes for r in records if r.link == link)
    return out


def _register_hook(trainer: Any, counter: _Counter) -> None:
    trainer.strategy.model.register_comm_hook(counter, _counting_hook)


class _Measured:
    """Bytes measured per case; each process layout is run (all its cases in one spawn) when a test first asks."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, float]] = {}
        self.layouts: set[RunLayout] = set()

    def of(self, case: Case) -> dict[str, float]:
        if case.run not in self.layouts:
            self.layouts.add(case.run)
            cases = tuple(c for c in CASES if c.run == case.run)
            world = case.run.processes * case.run.num_nodes
            ranks = _spawn(_entry_all, (cases,), world, 600.0, case.run.num_nodes)
            for i, c in enumerate(cases):
                per_rank = [r[i] for r in ranks]
                assert all(r == per_rank[0] for r in per_rank), f"{c.spec}: ranks measured differently: {per_rank}"
                self.results[_key(c)] = per_rank[0]
        return self.results[_key(case)]


@pytest.fixture(scope="module")
def measured() -> _Measured:
    return _Measured()


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


# option rows beyond one case per registered flag: slow (the default run keeps one fit per flag)
SLOW_OPTION_ROWS = {
    "ddp_powersgd:rank=2", "ddp_topk:density=0.1", "local_sgd:period=4,average_optimizer_state=true",
    "local_sgd:period=4,average_buffers=false+buffers", "diloco:inner_steps=4,fragments=2",
    "diloco:inner_steps=4,compressor=sign", "diloco:inner_steps=4,overlap=true,compressor=topk,density=0.05",
}


def _case_param(case: Case) -> Any:
    name = f"{case.spec}{'+buffers' if case.module.get('buffer_numel') else ''}"
    if case.run.num_nodes > 1:
        return pytest.param(case, id=f"2x2-{name}", marks=pytest.mark.slow)
    if name in SLOW_OPTION_ROWS:
        return pytest.param(case, id=name, marks=pytest.mark.slow)
    return pytest.param(case, id=name)


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_planner_bytes_equal_measured_bytes(case: Case, measured: _Measured) -> None:
    got = measured.of(case)
    assert got["steps"] == case.steps
    workload = Workload.from_module(_module(case.module), step_compute_s=1.0)
    for nodes, gpus in case.planned:
        cluster = Cluster(nodes=nodes, gpus_per_node=gpus)
        (row,) = plan([case.spec], workload, cluster)
        found = collectives_for(case.spec, workload, cluster)
        planned_wire = {"inter": row.inter_node_bytes_per_step, "intra": row.intra_node_bytes_per_step}
        for link in ("intra", "inter"):
            payload = sum(c.record.payload_bytes / c.every for c in found if c.link == link)
            if case.run.num_nodes > 1:
                measured_link = f"{link}_node"
            elif (link == "inter") != (nodes > 1):  # a 2-rank run planned as 2 nodes x 1 or 1 node x 2: one class
                assert payload == 0, (case.spec, (nodes, gpus), link)
                continue
            else:
                measured_link = "intra_node"  # on one node the ledger counts everything as intra-node
            measured_payload = got[measured_link] / got["steps"]
            measured_wire = got[f"{measured_link}_wire"] / got["steps"] / 2  # the ledger: sent + received
            assert payload == pytest.approx(measured_payload, rel=0.01), (case.spec, (nodes, gpus), link)
            assert planned_wire[link] == pytest.approx(measured_wire, rel=0.01), (case.spec, (nodes, gpus), link)
        assert got["intra_node"] + got["inter_node"] > 0
