"""GradES target discovery and metrics."""

from __future__ import annotations

import pytest
import torch

from lightning_optx.functional import grades as F

BERT = [f"encoder.layer.0.{n}.weight" for n in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")] + [
    "embeddings.word_embeddings.weight", "encoder.layer.0.attention.output.LayerNorm.weight",
    "encoder.layer.0.attention.self.query.bias", "pooler.dense.weight", "classifier.weight"]
LLAMA = [f"model.layers.3.{n}.weight" for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["model.norm.weight", "lm_head.weight"]
GPT2 = [f"transformer.h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + [
    "transformer.wte.weight", "transformer.h.0.ln_1.weight"]
MHA = ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj.weight",
       "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight", "encoder.layers.0.norm1.weight",
       "encoder.layers.0.self_attn.in_proj_bias"]


@pytest.mark.parametrize(("names", "expected"), [
    (BERT, BERT[:6]), (LLAMA, LLAMA[:7]), (GPT2, GPT2[:4]), (MHA, MHA[:4]),
])
def test_auto_targets_find_attention_and_ffn_matrices_only(names, expected):
    assert F.find_targets(names) == expected


def test_lora_adapters_are_the_targets_when_present():
    names = [*LLAMA, "model.layers.3.self_attn.q_proj.lora_A.default.weight",
             "model.layers.3.self_attn.q_proj.lora_B.default.weight"]
    assert F.find_targets(names) == names[-2:]


def test_regex_targets_and_bad_regex():
    assert F.find_targets(["fc1.weight", "fc2.weight", "head.weight", "fc1.bias"], [r"fc\d\.weight$"]) == [
        "fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match=r"`targets` holds an invalid regular expression '\(unclosed'"):
        F.find_targets(["a"], ["(unclosed"])


def test_mean_abs_and_freeze_mask():
    metrics = F.mean_abs([torch.tensor([[1.0, -3.0], [0.0, 4.0]]), torch.full((5,), -0.5)])
    assert metrics.tolist() == [2.0, 0.5]
    assert F.freeze_mask(metrics, tau=1.0).tolist() == [False, True]
    assert F.freeze_mask(metrics, tau=0.5, reference=torch.tensor([5.0, 0.5])).tolist() == [True, False]


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"tau": 0.0}, r"`tau` must be a positive float, got tau=0.0"),
    ({"grace_fraction": 1.0}, r"`grace_fraction` must be in \[0, 1\), got grace_fraction=1.0"),
    ({"metric": "hessian"}, r"`metric` must be 'grad' or 'weight_delta', got metric='hessian'"),
    ({"tau_mode": "percent"}, r"`tau_mode` must be 'absolute' or 'relative', got tau_mode='percent'"),
    ({"tau": 2.0, "tau_mode": "relative"}, r"must be < 1, got tau=2.0"),
])
def test_argument_errors(kwargs, pattern):
    args = {"tau": 1e-3, "grace_fraction": 0.5, "metric": "grad", "tau_mode": "absolute", **kwargs}
    with pytest.raises(ValueError, match=pattern):
        F.check_grades_args(**args)
