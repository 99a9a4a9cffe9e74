"""Per-rank checkpoint files: rank 0 writes O(1) model copies, files follow ModelCheckpoint, callbacks register."""

from __future__ import annotations

import functools
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_optx import LocalSGDStrategy
from lightning_optx.checkpointing import PerRankState, per_rank_state, rank_file
from tests.helpers import TrainJob, check_resume_equivalence, run_job
from tests.helpers.models import TinyModule


def tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


class ForbidGathers(Callback):
    """Makes any gather of objects or tensors to one rank fail (a checkpoint must not gather)."""

    def setup(self, trainer, pl_module, stage):
        def forbidden(*args, **kwargs):
            raise AssertionError("a collective gathered state to one rank")

        for name in ("gather_object", "gather", "all_gather_object"):
            setattr(dist, name, forbidden)


class RankCounter(Callback):
    """Per-rank state registered with the strategy: a tensor that differs per rank (like a filter)."""

    def __init__(self) -> None:
        self.counter: torch.Tensor | None = None  # built per process: spawn shares a tensor's storage
        self.restored_at_start: torch.Tensor | None = None

    def setup(self, trainer, pl_module, stage):
        if self.counter is None:
            self.counter = torch.zeros(3)
        per_rank_state(trainer).register("rank_counter", self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter += trainer.global_rank + 1

    def on_train_start(self, trainer, pl_module):
        self.restored_at_start = self.counter.clone()

    def state_dict(self):
        return {"counter": self.counter.clone()}

    def load_state_dict(self, state):
        self.counter = state["counter"].clone()


class ParamsAtStart(Callback):
    """Records this rank's parameters when training (re)starts: after the restore, before any step."""

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def sizes_and_state(ckpt, trainer, module):
    """Runs on every rank after the fit and the checkpoint: what this rank holds and wrote."""
    model = sum(p.numel() * p.element_size() for p in module.parameters())
    optimizer = tensor_bytes(trainer.optimizers[0].state_dict()["state"])
    weights_only = ckpt + ".weights"
    trainer.save_checkpoint(weights_only, weights_only=True)
    return {"model_bytes": model, "optimizer_bytes": optimizer,
            "params": {n: p.detach().clone() for n, p in module.named_parameters()},
            "weights_only_rank_file": os.path.exists(rank_file(weights_only, trainer.global_rank))}


def local_sgd_job(ckpt: str, **kwargs) -> TrainJob:
    return TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="adam"),
                    strategy=LocalSGDStrategy(period=1000), callbacks=[ForbidGathers()],
                    trainer_kwargs={"max_epochs": 1}, save_checkpoint_to=ckpt,
                    inspect=functools.partial(sizes_and_state, ckpt), **kwargs)


def check_one_model_copy_on_rank0(tmp_path, world_size: int) -> int:
    ckpt = str(tmp_path / f"w{world_size}.ckpt")
    results = run_job(local_sgd_job(ckpt), world_size=world_size, timeout=150.0 * world_size)
    facts = results[0].inspected
    own = facts["model_bytes"] + facts["optimizer_bytes"]
    main = torch.load(ckpt, weights_only=False)
    # rank 0 wrote its model and optimizer state once (Lightning's), and nothing of the other ranks
    assert "per_rank" not in main["lightning_optx"]
    assert own <= tensor_bytes(main) <= own + 1024
    assert not os.path.exists(rank_file(ckpt, 0))
    for r in range(1, world_size):
        side = torch.load(rank_file(ckpt, r), weights_only=False)
        assert side["rank"] == r and side["world_size"] == world_size
        assert tensor_bytes(side) == own
        # the file holds rank r's own (local, unsynchronised) parameters
        saved = side["states"]["strategy"]["module"]
        for name, p in results[r].inspected["params"].items():
            assert torch.equal(saved[name], p), name
        # fit ended on the consensus parameters, but each rank's Adam moments are its own: the file holds them
        mine = side["states"]["strategy"]["optimizer_states"][0]["state"]
        rank0 = main["optimizer_states"][0]["state"]
        assert any(not torch.equal(mine[k]["exp_avg"], rank0[k]["exp_avg"]) for k in rank0)
    # save_weights_only: no strategy, optimizer or residual state anywhere
    weights = torch.load(ckpt + ".weights", weights_only=False)
    assert "optimizer_states" not in weights
    assert set(weights["lightning_optx"]) == {"strategy", "world_size", "optimizer_steps", "weights_only"}
    assert not any(r.inspected["weights_only_rank_file"] for r in results)
    return tensor_bytes(main)


@pytest.mark.multiprocess
def test_rank0_writes_one_model_copy_and_each_rank_its_own_file(tmp_path):
    check_one_model_copy_on_rank0(tmp_path, world_size=2)
    # resumed on one process: the documented fallback to rank 0's model and optimizer state
    ckpt = str(tmp_path / "w2.ckpt")
    resume = TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="adam"),
                      strategy=LocalSGDStrategy(period=1000), callbacks=[ParamsAtStart()],
                      trainer_kwargs={"max_epochs": 2}, ckpt_path=ckpt,
                      inspect=lambda trainer, module: params_at_start(trainer, module)["params"])
    with pytest.warns(UserWarning, match="world size 2, this run has 1; this rank resumes from rank 0's model"):
        (result,) = run_job(resume, world_size=1)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    for name, p in result.inspected.items():
        assert torch.equal(p, saved[name]), name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_rank0_checkpoint_size_does_not_grow_with_world_size(tmp_path):
    assert check_one_model_copy_on_rank0(tmp_path, world_size=4) == check_one_model_copy_on_rank0(tmp_path, 2)


def params_at_start(trainer, module):
    cb = next(c for c in trainer.callbacks if isinstance(c, ParamsAtStart))
    counter = next((c for c in trainer.callbacks if isinstance(c, RankCounter)), None)
    if counter is None:
        return {"params": cb.params}
    return {"params": cb.params, "counter": counter.restored_at_start, "final_counter": counter.counter.clone()}


@pytest.mark.multiprocess
def test_files_follow_model_checkpoint_and_resume_from_last_link(tmp_path):
    """save_top_k=1 removes the older checkpoint's rank files; last.ckpt (a link) resumes each rank's own state."""
    dirpath = str(tmp_path / "ckpts")
    first = TrainJob(
        module=functools.partial(TinyModule, model="mlp", optimizer="adam"),
        strategy=LocalSGDStrategy(period=1000),
        callbacks=[ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=1, save_last="link"),
                   RankCounter(), ParamsAtStart()],
        trainer_kwargs={"max_steps": 6, "enable_checkpointing": True},
        inspect=params_at_start,
    )
    run_job(first, world_size=2)
    files = sorted(os.listdir(dirpath))
    assert files == ["last.ckpt", "step=6.ckpt", "step=6.ckpt.rank1.pt"] or files == [
        "epoch=1-step=6.ckpt", "epoch=1-step=6.ckpt.rank1.pt", "last.ckpt"], files
    assert os.path.islink(os.path.join(dirpath, "last.ckpt"))
    saved = torch.load(rank_file(os.path.realpath(os.path.join(dirpath, "last.ckpt")), 1), weights_only=False)

    resumed = run_job(
        TrainJob(module=functools.partial(TinyModule, model="mlp", optimizer="adam"),
                 strategy=LocalSGDStrategy(period=1000), callbacks=[RankCounter(), ParamsAtStart()],
                 trainer_kwargs={"max_steps": 8}, ckpt_path=os.path.join(dirpath, "last.ckpt"),
                 inspect=params_at_start),
        world_size=2,
    )
    rank0 = torch.load(os.path.join(dirpath, "last.ckpt"), weights_only=False)
    for name, p in resumed[1].inspected["params"].items():
        assert torch.equal(p, saved["states"]["strategy"]["module"][name]), name
    assert not torch.equal(resumed[1].inspected["params"]["net.head.weight"], rank0["state_dict"]["net.head.weight"])
    # the callback's per-rank state: 6 steps of +1 on rank 0, +2 on rank 1
    assert torch.equal(resumed[0].inspected["counter"], torch.full((3,), 6.0))
    assert torch.equal(resumed[1].inspected["counter"], torch.full((3,), 12.0))
    assert torch.equal(resumed[1].inspected["final_counter"], torch.full((3,), 16.0))


# ---------------------------------------------------------------------- single process


class Box:
    def __init__(self, value: float) -> None:
        self.value = torch.tensor([value])

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"].clone()


def test_store_restores_registered_owners_after_restore_and_late_registrations_at_once():
    store = PerRankState()
    early, late = Box(0.0), Box(0.0)
    store.register("early", early)
    store.set_pending({"strategy": {"ignored": 1}, "early": {"value": torch.tensor([1.0])},
                       "late": {"value": torch.tensor([2.0])}})
    assert early.value.item() == 0.0  # nothing is applied before the restore point
    store.restore()
    assert early.value.item() == 1.0
    store.register("late", late)
    assert late.value.item() == 2.0


@pytest.mark.parametrize(("key", "pattern"), [("", "non-empty string"), ("strategy", "other than 'strategy'")])
def test_bad_keys_are_refused(key, pattern):
    with pytest.raises(ValueError, match=pattern):
        PerRankState().register(key, Box(0.0))


def test_object_without_state_dict_is_refused():
    with pytest.raises(TypeError, match="`owner` must have `state_dict` and `load_state_dict`, got int"):
        PerRankState().register("x", 3)  # type: ignore[arg-type]


def test_stale_or_foreign_rank_file_is_ignored_and_links_are_followed(tmp_path):
    target = str(tmp_path / "a.ckpt")
    PerRankState.write(target, {"x": torch.ones(2)}, rank=1, world_size=2, step=4)
    assert PerRankState.read(target, rank=1, world_size=2, step=5) is None  # another checkpoint's step
    assert PerRankState.read(target, rank=1, world_size=4, step=4) is None  # another world size
    link = str(tmp_path / "last.ckpt")
    os.symlink("a.ckpt", link)
    states = PerRankState.read(link, rank=1, world_size=2, step=4)
    assert states is not None and torch.equal(states["x"], torch.ones(2))
    PerRankState.remove(target, 1)
    assert not os.path.exists(rank_file(target, 1))


def test_per_rank_state_is_none_for_other_strategies():
    assert per_rank_state(pl.Trainer(accelerator="cpu", logger=False)) is None


def server_residual_facts(trainer, module):
    return {"server": {k: v.clone() for k, v in trainer.strategy.compressor.server_residuals.items()}}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sign_resume_is_bit_exact_with_per_rank_server_residuals(tmp_path):
    """ddp_sign: worker and server residuals differ per rank and come back from each rank's own file."""
    job = TrainJob(module=functools.partial(TinyModule, model="wide_mlp", optimizer="sgd"), strategy="ddp_sign",
                   inspect=server_residual_facts)
    straight, resumed = check_resume_equivalence(job, total_epochs=3, split_epoch=1, tmp_dir=str(tmp_path),
                                                 world_size=2)
    for s, r in zip(straight, resumed):
        assert set(s.inspected["server"]) == set(r.inspected["server"]) and s.inspected["server"]
        for key, value in s.inspected["server"].items():
            assert torch.equal(value, r.inspected["server"][key]), key
    # each rank holds the residual of its own chunk: per-rank state, not a copy of rank 0's
    assert not torch.equal(straight[0].inspected["server"]["net.fc2.weight"],
                           straight[1].inspected["server"]["net.fc2.weight"])
