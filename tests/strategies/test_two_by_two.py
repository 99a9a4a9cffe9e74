"""2 nodes x 2 processes: checkpoint mid-round (crash-style) and resume bit-exact, every rank ending identical; no
hidden traffic and per-rank checkpoint files with the two-stage sign across nodes. All slow (4 processes each);
``test_replicas.py`` keeps a 2 x 2 run in the default suite."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_optx import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy
from tests.helpers import TrainJob, assert_tree_equal, run_job
from tests.helpers.models import TinyModule
from tests.helpers.resume import check_resume_equivalence
from tests.strategies.test_consensus import BNModule, CollectiveCounter, counted

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # 3 fits of 4 processes each


def _job(strategy):
    # 64 samples / 4 ranks / batch 8: 2 optimizer steps per epoch
    module = functools.partial(TinyModule, model="wide_mlp", optimizer="adamw", lr=1e-2)
    return TrainJob(module=module, strategy=strategy, trainer_kwargs={"max_epochs": 3})


@pytest.mark.parametrize("strategy", [
    pytest.param(lambda: CompressedDDPStrategy("sign"), id="ddp_sign"),  # two-stage sign across nodes
    pytest.param(lambda: LocalSGDStrategy(period=3), id="local_sgd", marks=pytest.mark.slow),
    pytest.param(lambda: DiLoCoStrategy(inner_steps=3), id="diloco", marks=pytest.mark.slow),
    pytest.param(lambda: DiLoCoStrategy(inner_steps=3, overlap=True, compressor="powersgd",
                                        compressor_options={"rank": 2}, adaptive_compression=True),
                 id="diloco_x", marks=pytest.mark.slow),
    pytest.param(lambda: CompressedDDPStrategy("powersgd", compressor_options={"rank": 2}), id="ddp_powersgd",
                 marks=pytest.mark.slow),
])
def test_two_nodes_of_two_resume_mid_round_bit_exact(tmp_path, strategy):
    straight, resumed = check_resume_equivalence(_job(strategy()), total_epochs=3, split_epoch=1,
                                                 tmp_dir=str(tmp_path), world_size=4, num_nodes=2)
    for ranks in (straight, resumed):
        for r in ranks[1:]:
            assert_tree_equal(ranks[0].params, r.params, f"rank {r.rank} at the end of fit")
    for key in ("comm/bytes_total", "comm/intra_node_bytes", "comm/inter_node_bytes"):
        assert resumed[0].series(key)[-1] == straight[0].series(key)[-1], key


def test_two_stage_sign_across_nodes_has_no_hidden_traffic():
    job = TrainJob(module=functools.partial(BNModule, optimizer="sgd"), strategy=CompressedDDPStrategy("sign"),
                   callbacks=[CollectiveCounter()], trainer_kwargs={"max_steps": 3}, inspect=counted)
    for r in run_job(job, world_size=4, num_nodes=2):
        facts = r.inspected
        assert facts["ledger"] > 0
        assert len(facts["calls"]) == facts["ledger"], f"rank {r.rank}: {facts['calls']}"
        assert facts["lightning"] == ["broadcast in _broadcast_sigterm_tensor"] * r.global_step


def test_two_stage_sign_across_nodes_checkpoint_files(tmp_path):
    """save_top_k=1 leaves one checkpoint and its 3 rank files; a weights-only checkpoint has no rank files and no
    strategy state."""
    full, weights = str(tmp_path / "full"), str(tmp_path / "weights")
    job = TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="adamw"),
                   strategy=CompressedDDPStrategy("sign"),
                   callbacks=[ModelCheckpoint(dirpath=full, every_n_train_steps=2, save_top_k=1, filename="{step}"),
                              ModelCheckpoint(dirpath=weights, every_n_train_steps=3, save_top_k=1, filename="{step}",
                                              save_weights_only=True)],
                   trainer_kwargs={"max_steps": 6, "enable_checkpointing": True})
    run_job(job, world_size=4, num_nodes=2)
    assert sorted(os.listdir(full)) == ["step=6.ckpt"] + [f"step=6.ckpt.rank{r}.pt" for r in (1, 2, 3)]
    assert sorted(os.listdir(weights)) == ["step=6.ckpt"]
    saved = torch.load(os.path.join(weights, "step=6.ckpt"), weights_only=False)
    assert "optimizer_states" not in saved
    assert saved["lightning_optx"]["weights_only"] is True
    assert not any(k in saved["lightning_optx"] for k in ("shared", "rank0", "comm"))
