"""Node replicas on 4 CPU processes laid out as 2 nodes x 2 (the variables torchrun sets, Trainer(num_nodes=2)).

Inside a node the ranks form one replica (DDP on the node's group: gradients all-reduced every step, so the
ranks of a node are identical after every step); averaging and outer steps run across nodes only. The
ledger separates the bytes on intra-node links from those on inter-node links.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_optx import DiLoCoStrategy, LocalSGDStrategy
from tests.helpers import TrainJob, assert_tree_equal, run_job
from tests.helpers.models import TinyModule
from tests.helpers.recorder import StepRecorder

pytestmark = pytest.mark.multiprocess

PARAM_BYTES = sum(p.numel() * 4 for p in TinyModule(model="mlp").parameters())


def layout(trainer, module):
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, StepRecorder))
    s = trainer.strategy
    return {"records": recorder.records, "replica_size": s.replica_size, "node_rank": trainer.node_rank,
            "intra": s.comm.ledger.intra_node_bytes, "inter": s.comm.ledger.inter_node_bytes,
            "tags": sorted({(r.tag, r.link) for r in s.comm.ledger.records})}


def two_by_two(strategy, epochs=4):
    # 64 samples / 4 ranks / batch 8: 2 optimizer steps per epoch
    return TrainJob(module=functools.partial(TinyModule, model="mlp", optimizer="sgd"), strategy=strategy,
                    callbacks=[StepRecorder()], trainer_kwargs={"max_epochs": epochs}, inspect=layout)


def check_node_replicas(ranks, sync_steps):
    assert [r.inspected["node_rank"] for r in ranks] == [0, 0, 1, 1]
    assert all(r.inspected["replica_size"] == 2 for r in ranks)
    records = [r.inspected["records"] for r in ranks]
    for step_records in zip(*records):
        step = step_records[0]["step"]
        # ranks of a node: identical after every step
        assert_tree_equal(step_records[0]["params"], step_records[1]["params"], f"node 0 at step {step}")
        assert_tree_equal(step_records[2]["params"], step_records[3]["params"], f"node 1 at step {step}")
        nodes_equal = all(torch.equal(step_records[0]["params"][n], step_records[2]["params"][n])
                          for n in step_records[0]["params"])
        assert nodes_equal == (step in sync_steps), f"step {step}: nodes identical={nodes_equal}"
    for r in ranks[1:]:  # the final synchronisation: every rank ends with the consensus
        assert_tree_equal(ranks[0].params, r.params, f"rank {r.rank} at the end of fit")


def test_local_sgd_two_nodes_of_two():
    ranks = run_job(two_by_two(LocalSGDStrategy(period=3)), world_size=4, num_nodes=2)
    steps = ranks[0].global_step
    assert steps == 8
    check_node_replicas(ranks, sync_steps={3, 6})
    for r in ranks:
        # intra-node: the gradient all-reduce inside the node, every step; inter-node: replica 0's weights once
        # at the start, then the parameter average at steps 3 and 6 and the final one at step 8
        assert r.inspected["intra"] == steps * PARAM_BYTES
        assert r.inspected["inter"] == (1 + 3) * PARAM_BYTES
        assert r.inspected["tags"] == [("grad", "intra_node"), ("init", "inter_node"), ("params", "inter_node")]
        assert r.series("comm/inter_node_bytes")[-1] == 3 * PARAM_BYTES  # logged at step 8, before the final sync


@pytest.mark.slow
def test_diloco_two_nodes_of_two():
    ranks = run_job(two_by_two(DiLoCoStrategy(inner_steps=2, outer_lr=0.7)), world_size=4, num_nodes=2)
    check_node_replicas(ranks, sync_steps={2, 4, 6, 8})
    for r in ranks:
        assert r.inspected["intra"] == 8 * PARAM_BYTES
        assert r.inspected["inter"] == (1 + 4) * PARAM_BYTES


@pytest.mark.slow
def test_explicit_replica_size_one_on_two_nodes_is_every_rank_its_own_replica():
    ranks = run_job(two_by_two(LocalSGDStrategy(period=4, replica_size=1), epochs=2), world_size=4, num_nodes=2)
    for r in ranks:
        assert r.inspected["replica_size"] == 1
        assert r.inspected["intra"] == 0
        assert r.inspected["inter"] == PARAM_BYTES  # one average over all 4 ranks, which span both nodes


def test_replica_size_must_divide_the_world_size():
    with pytest.raises(ValueError, match=r"`replica_size` must be None \(one replica per node\) or an integer >= 1, "
                                         r"got replica_size=0"):
        LocalSGDStrategy(replica_size=0)
    with pytest.raises(ValueError, match=r"got replica_size=-2"):
        DiLoCoStrategy(replica_size=-2)
    job = TrainJob(module=functools.partial(TinyModule, model="mlp"), strategy=LocalSGDStrategy(replica_size=2),
                   trainer_kwargs={"max_steps": 1})
    with pytest.raises(ValueError, match=r"must divide the world size \(1 processes\), got replica_size=2"):
        run_job(job, world_size=1)


def compressed_facts(trainer, module):
    s = trainer.strategy
    shapes = [torch.empty(p.shape) for _, p in s._named_trainable_params()]
    return {"payload": s.compressor.payload_bytes(shapes, 2), "wire": s.compressor.wire_bytes(shapes, 2),
            "intra": s.comm.ledger.intra_node_bytes,
            "inter": s.comm.ledger.inter_node_bytes}


@pytest.mark.slow
def test_compressed_ddp_reduces_inside_nodes_at_full_precision_and_compresses_across():
    from lightning_optx import CompressedDDPStrategy

    job = TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="sgd"),
                   strategy=CompressedDDPStrategy("sign"), trainer_kwargs={"max_epochs": 2}, inspect=compressed_facts)
    ranks = run_job(job, world_size=4, num_nodes=2)
    for r in ranks[1:]:
        assert_tree_equal(ranks[0].params, r.params, f"rank {r.rank}")
    raw = sum(p.numel() * 4 for p in TinyModule(model="wide_mlp").parameters())
    steps = ranks[0].global_step
    for r in ranks:
        assert r.inspected["intra"] == steps * raw
        assert r.inspected["inter"] == steps * r.inspected["payload"]
        # against plain DDP over all 4 ranks (3 x raw on the wire per step): the fp32 stage inside the node
        # (2 x raw on 2 ranks) plus the two-stage sign across the nodes
        expected = 3 * raw / (2 * raw + r.inspected["wire"])
        assert r.series("comm/compression_ratio")[-1] == pytest.approx(expected, rel=1e-3)
