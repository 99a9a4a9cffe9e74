"""GradES target discovery and metrics."""

from __future__ import annotations

import pytest
import torch

from lightning_optx.functional import grades as F
from lightning_optx.functional.grades import group_components, group_mean_abs, mean_abs, update_reference

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


# ---------------------------------------------------------------- fp32 norms, LoRA components, references


def test_fp16_norms_accumulate_in_float32():
    """A 256 x 256 fp16 gradient of 8s has an L1 norm of 524288: an fp16 sum overflows to inf."""
    grad = torch.full((256, 256), 8.0, dtype=torch.float16)
    assert torch.isinf(torch.linalg.vector_norm(grad, ord=1))  # what the old fp16 accumulation returned
    assert mean_abs([grad]).tolist() == [8.0]
    assert mean_abs([grad]).dtype == torch.float32


def test_group_mean_abs_is_the_pooled_mean():
    a, b, c = torch.tensor([1.0, -3.0]), torch.zeros(6), torch.tensor([4.0])
    assert group_mean_abs([a, b, c], [2, 1]).tolist() == [0.5, 4.0]  # (1 + 3 + 0) / 8, then 4 / 1
    with pytest.raises(ValueError, match=r"`sizes` must add up to the number of tensors \(3\)"):
        group_mean_abs([a, b, c], [1, 1])


def test_lora_factors_form_one_component_per_layer_and_adapter():
    names = [
        "enc.layer.0.attention.self.query.lora_A.default.weight",
        "enc.layer.0.attention.self.query.lora_B.default.weight",
        "enc.layer.0.attention.self.query.lora_A.other.weight",
        "enc.layer.0.attention.self.value.lora_B.default.weight",
        "enc.layer.0.attention.self.value.lora_A.default.weight",
        "blocks.0.fc1.weight",
        "custom.lora_A.weight",
        "custom.lora_B.weight",
    ]
    assert group_components(names) == {
        "enc.layer.0.attention.self.query.lora[default]": names[:2],
        "enc.layer.0.attention.self.query.lora[other]": [names[2]],
        "enc.layer.0.attention.self.value.lora[default]": [names[3], names[4]],
        "blocks.0.fc1.weight": [names[5]],
        "custom.lora": names[6:],
    }


def test_a_zero_initialised_lora_pair_has_a_non_zero_metric():
    """PEFT's init: lora_B = 0, so lora_A's gradient is exactly 0; the pair's metric is lora_B's share."""
    a, b = torch.randn(4, 16), torch.zeros(16, 4)
    x = torch.randn(8, 16)
    a.requires_grad_(True)
    b.requires_grad_(True)
    (x @ a.T @ b.T * torch.randn(8, 16)).sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) > 0
    pair = group_mean_abs([a.grad, b.grad], [2])
    assert pair.item() == pytest.approx(b.grad.abs().sum().item() / (a.numel() + b.numel()), rel=1e-6)
    assert pair.item() > 0


def test_reference_is_the_running_max_of_finite_values():
    ref = None
    for value in [float("nan"), 0.0, float("inf"), 3.0, 1.0, float("-inf"), 5.0, 2.0]:
        ref = update_reference(ref, value)
    assert ref == 5.0
    assert update_reference(None, float("nan")) is None
