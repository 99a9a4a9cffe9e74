"""The collective accounting, the network model and rank-consistent decisions."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_optx.distributed import (
    CollectiveRecord,
    CommLedger,
    Communicator,
    LinkModel,
    agree,
    all_reduce_mean_coalesced_,
    tensor_bytes,
)
from tests.helpers import run_distributed


def test_tensor_bytes():
    assert tensor_bytes(torch.zeros(3, 4)) == 48
    assert tensor_bytes([torch.zeros(10, dtype=torch.float16), torch.zeros(2, dtype=torch.int64)]) == 36


def test_ring_allreduce_model_by_hand():
    link = LinkModel(bandwidth_gbit=8.0, latency_s=1e-3)  # 1e9 bytes/s
    rec = CollectiveRecord("all_reduce", payload_bytes=1_000_000, world_size=4)
    # 2 (n-1)/n * b / B + 2 (n-1) lat = 1.5e6 / 1e9 + 6e-3
    assert link.seconds(rec) == pytest.approx(1.5e-3 + 6e-3)
    gather = CollectiveRecord("all_gather", payload_bytes=1_000_000, world_size=4)
    assert link.seconds(gather) == pytest.approx(3e-3 + 3e-3)
    assert link.seconds(CollectiveRecord("all_reduce", 10**6, world_size=1)) == 0.0


def test_ledger_totals_survive_state_dict():
    ledger = CommLedger()
    ledger.add(CollectiveRecord("all_reduce", 100, 2, step=0))
    ledger.add(CollectiveRecord("all_gather", 30, 2, step=1))
    assert (ledger.total_bytes, ledger.total_collectives, ledger.bytes_for_step(1)) == (130, 2, 30)
    fresh = CommLedger()
    fresh.load_state_dict(ledger.state_dict())
    assert (fresh.total_bytes, fresh.total_collectives) == (130, 2)


def test_single_process_collectives_are_free_noops():
    comm = Communicator()
    t = torch.arange(4.0)
    comm.all_reduce_(t, op="mean")
    assert torch.equal(t, torch.arange(4.0))
    assert comm.all_gather(t)[0] is t
    assert agree(True, comm) and not agree(False, comm)
    assert comm.ledger.total_bytes == 0


def _collectives_on_two_ranks():
    rank = dist.get_rank()
    comm = Communicator()
    comm.step = 5
    t = torch.full((3,), float(rank + 1))
    comm.all_reduce_(t, op="mean", tag="grad")
    gathered = comm.all_gather(torch.tensor([rank * 10.0, 1.0]), tag="idx")
    tensors = [torch.full((2, 2), float(rank)), torch.full((3,), 2.0 * rank)]
    all_reduce_mean_coalesced_(tensors, comm, tag="params")
    return {
        "mean": t, "gathered": gathered, "coalesced": tensors,
        "all": agree(rank == 0, comm, "all"), "any": agree(rank == 0, comm, "any"),
        "records": comm.ledger.as_dicts(),
    }


@pytest.mark.multiprocess
def test_collectives_and_their_records_on_two_ranks():
    r0, r1 = run_distributed(_collectives_on_two_ranks, world_size=2)
    for r in (r0, r1):
        assert torch.equal(r["mean"], torch.full((3,), 1.5))
        assert [g.tolist() for g in r["gathered"]] == [[0.0, 1.0], [10.0, 1.0]]
        assert torch.equal(r["coalesced"][0], torch.full((2, 2), 0.5))
        assert torch.equal(r["coalesced"][1], torch.full((3,), 1.0))
        assert r["all"] is False and r["any"] is True
        kinds = [(x["kind"], x["payload_bytes"], x["tag"], x["step"]) for x in r["records"]]
        assert kinds == [("all_reduce", 12, "grad", 5), ("all_gather", 8, "idx", 5), ("all_reduce", 28, "params", 5)]
