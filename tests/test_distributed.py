"""The collective accounting, the network model and rank-consistent decisions."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_optx.distributed import (
    STRICT_ENV,
    CollectiveRecord,
    CommLedger,
    Communicator,
    LinkModel,
    agree,
    all_reduce_mean_coalesced_,
    strict_collectives,
    strict_collectives_enabled,
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
        assert kinds == [("all_reduce", 12, "grad", 5), ("all_gather", 8, "idx", 5), ("all_reduce", 28, "params", 5),
                         ("all_reduce", 4, "control", 5), ("all_reduce", 4, "control", 5)]


def test_strict_mode_rejects_a_host_tensor_where_nccl_would():
    """Under strict collectives a tensor built without ``device=`` is not on the group's device: it fails."""
    comm = Communicator(device="cpu", check_devices=True)
    model_tensor = torch.ones(3)
    with strict_collectives(True):
        stray = torch.tensor([0.5])  # what `_adapt` used to all-reduce: a host tensor, fatal under NCCL
        placed = torch.tensor([0.5], device=comm.device)
        derived = torch.zeros_like(model_tensor)
    assert stray.device.type == "meta"
    message = r"all_reduce \(tag 'control'\) was given a tensor on meta.*takes tensors on cpu"
    with pytest.raises(RuntimeError, match=message):
        comm.all_reduce_(stray, op="mean", tag="control")
    comm.all_reduce_(placed, op="mean", tag="control")
    comm.all_reduce_(derived)
    with pytest.raises(RuntimeError, match="all_gather"):
        comm.all_gather(stray)
    relaxed = Communicator(device="cpu", check_devices=False)
    relaxed.all_reduce_(stray)  # the check is a test mode: off by default


def test_strict_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    assert Communicator().check_devices and strict_collectives_enabled()
    monkeypatch.setenv(STRICT_ENV, "0")
    assert not Communicator().check_devices
    with strict_collectives():
        assert torch.tensor([1.0]).device.type == "cpu"


def test_diloco_adaptive_compression_control_message_lives_on_the_group_device():
    from lightning_optx import DiLoCoStrategy

    strategy = DiLoCoStrategy(inner_steps=2, compressor="powersgd", adaptive_compression=True)
    comm = Communicator(device="cpu", check_devices=True)
    t = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    with strict_collectives(True):
        strategy._adapt([t * 0.5], [t], comm)  # relative error 0.5: within the thresholds, level unchanged
    assert strategy._last_relative_error == pytest.approx(0.5)


def test_ledger_is_constant_time_per_step_and_splits_link_classes():
    ledger = CommLedger(keep_records=False)
    for step in range(10_000):
        ledger.add(CollectiveRecord("all_reduce", 10, 4, step=step, link="intra_node"))
        ledger.add(CollectiveRecord("all_reduce", 3, 2, step=step, link="inter_node"))
    # per-step sums do not come from a scan of the records (none are kept here) and stay bounded in size
    assert ledger.records == [] and ledger.bytes_for_step(9_999) == 13
    assert len(ledger._step_bytes) <= CommLedger.STEP_WINDOW
    assert (ledger.intra_node_bytes, ledger.inter_node_bytes, ledger.total_bytes) == (100_000, 30_000, 130_000)
    fresh = CommLedger()
    fresh.load_state_dict(ledger.state_dict())
    assert (fresh.intra_node_bytes, fresh.inter_node_bytes) == (100_000, 30_000)
    old = CommLedger()
    old.load_state_dict({"total_bytes": 5, "total_collectives": 1})  # a checkpoint from before link classes
    assert old.bytes_by_link == {"intra_node": 0, "inter_node": 0}


def test_link_model_prices_each_link_class_at_its_own_speed():
    link = LinkModel(bandwidth_gbit=80.0, latency_s=1e-6, inter_node_bandwidth_gbit=8.0, inter_node_latency_s=1e-3)
    intra = CollectiveRecord("all_reduce", 1_000_000, 2, link="intra_node")
    inter = CollectiveRecord("all_reduce", 1_000_000, 2, link="inter_node")
    assert link.seconds(intra) == pytest.approx(1e6 / 1e10 + 2e-6)
    assert link.seconds(inter) == pytest.approx(1e6 / 1e9 + 2e-3)
    # without inter-node figures every record is priced at the one link speed (the original API)
    assert LinkModel(8.0, 0.0).seconds(inter) == LinkModel(8.0, 0.0).seconds(intra) == pytest.approx(1e-3)
