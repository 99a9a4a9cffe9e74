"""Modules for the configurations users really run: fp16 overflow, late branches, float dropout rates, LoRA.

Each module records, per training batch, the optimizer-step round and every scheduled dropout rate, so a
test can check which rates were applied when.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_optx.callbacks._steps import rounds_after_batch
from tests.helpers.models import TinyModule


class LlamaStyleAttention(nn.Module):
    """Self-attention that keeps its dropout rate as a plain float (``attention_dropout``), as Llama does."""

    def __init__(self, dim: int, heads: int = 2, attention_dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        att = nn.functional.dropout(att, p=self.attention_dropout, training=self.training)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class DropPath(nn.Module):
    """timm-style stochastic depth on the residual branch (``drop_prob``)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


class DropoutBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LlamaStyleAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.fc2(self.drop(torch.relu(self.fc1(self.norm2(x))))))


class DropoutTransformer(nn.Module):
    """A transformer with every kind of rate: ``nn.Dropout``, a float ``attention_dropout`` and per-depth
    DropPath built as ``linspace(0, 0.1, depth)`` (timm's rule)."""

    def __init__(self, in_dim: int = 8, dim: int = 16, depth: int = 3, out_dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        rates = torch.linspace(0, 0.1, depth).tolist()
        self.blocks = nn.ModuleList(DropoutBlock(dim, r) for r in rates)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


def scheduled_rates(module: nn.Module) -> dict[str, list[float]]:
    """Every rate DropoutSchedule may drive, by kind, in module order."""
    return {
        "dropout": [m.p for m in module.modules() if isinstance(m, nn.Dropout)],
        "attention_dropout": [m.attention_dropout for m in module.modules() if isinstance(m, LlamaStyleAttention)],
        "drop_path": [m.drop_prob for m in module.modules() if isinstance(m, DropPath)],
    }


class ConfigModule(TinyModule):
    """A :class:`DropoutTransformer` task with the knobs of the configurations suite.

    Args:
        overflow_rounds: optimizer-step rounds whose loss is multiplied by 1e38: under fp16 AMP the scaled
            loss overflows, every gradient is inf/NaN and the grad scaler skips the step.
        late_branch: an extra ``expert`` block first used at round 1 (a branch reached later).
        filtered_optimizer: ``configure_optimizers`` keeps only ``p.requires_grad`` parameters.
        manual: manual optimization with two optimizers (body: SGD, head: Adam), each stepping every batch.
        compile: compile the network (``backend`` of torch.compile) in ``configure_model``.
        loss_scale: multiply the loss (large gradients, for ``16-true``).
    """

    def __init__(self, overflow_rounds: tuple[int, ...] = (), late_branch: bool = False,
                 filtered_optimizer: bool = False, manual: bool = False, compile: Any = None,
                 loss_scale: float = 1.0, **kwargs: Any) -> None:
        kwargs = {"model": "transformer", "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, **kwargs}
        super().__init__(**kwargs)
        self.net = DropoutTransformer()
        self.expert = DropoutBlock(16, 0.0) if late_branch else None
        self.automatic_optimization = not manual
        self.seen: list[tuple[int, dict[str, list[float]]]] = []

    def configure_model(self) -> None:
        if self.hparams.compile and self.hparams.late_branch:
            raise ValueError("ConfigModule: compile and late_branch do not combine")
        if self.hparams.compile and not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):
            self.net = torch.compile(self.net, backend=self.hparams.compile)

    def round(self) -> int:
        loop = self.trainer.fit_loop.epoch_loop
        return self.trainer.global_step if self.automatic_optimization else loop._batches_that_stepped

    def forward(self, x: Tensor) -> Tensor:
        if self.expert is None or self.trainer.global_step < 1:
            return self.net(x)
        h = self.net.embed(x)
        for block in self.net.blocks:
            h = block(h)
        return self.net.head(self.expert(h).mean(dim=1))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y) * self.hparams.loss_scale
        if self.round() in self.hparams.overflow_rounds:
            loss = loss * 1e38
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append((self.round(), scheduled_rates(self)))
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        if self.automatic_optimization:
            return loss
        body, head = self.optimizers()  # type: ignore[misc]
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad or not self.hparams.filtered_optimizer]
        if not self.automatic_optimization:
            head_ids = {id(p) for p in self.net.head.parameters()}
            body = [p for p in params if id(p) not in head_ids]
            head = [p for p in params if id(p) in head_ids]
            return [torch.optim.SGD(body, lr=0.05, momentum=0.9), torch.optim.Adam(head, lr=1e-2)]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _named(module: nn.Module) -> dict[str, Tensor]:
    # names as before `torch.compile` wrapped a submodule (callbacks set up before `configure_model`)
    return {n.replace("_orig_mod.", ""): p.detach().clone() for n, p in module.named_parameters()}


class RoundRecorder(Callback):
    """Snapshots the parameters after every training batch, keyed by optimizer-step rounds completed."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, Tensor]]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records.append((rounds_after_batch(trainer) - 1 if not pl_module.automatic_optimization
                             else trainer.global_step, _named(pl_module)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.records.append((rounds_after_batch(trainer), _named(pl_module)))


def recorded(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """``TrainJob.inspect`` hook: the rates seen per batch, the parameter snapshots (the first one taken at
    the start of training) and, for a module compiled with a counting backend, its number of compiles."""
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, RoundRecorder))
    backend = getattr(getattr(module, "hparams", {}), "get", lambda *_: None)("compile")
    grades = [cb for cb in trainer.callbacks if type(cb).__name__ == "GradES"]
    return {"seen": getattr(module, "seen", None), "records": recorder.records,
            "frozen_parameters": grades[0].frozen_parameter_names if grades else None,
            "final_rates": scheduled_rates(module), "compile_frames": getattr(backend, "frame_count", None)}


def lora_minilm(lr: float = 5e-3, batch_size: int = 8) -> pl.LightningModule:
    """MiniLM with PEFT LoRA adapters (r=4) on query and value, PEFT's default init (``lora_B = 0``); the
    optimizer takes only ``p.requires_grad`` parameters (the adapters and the head), the usual LoRA idiom."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers.minilm import MiniLMClassifier

    class LoraMiniLM(MiniLMClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    module = LoraMiniLM(lr=lr, batch_size=batch_size)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    module.encoder = get_peft_model(module.encoder, config)
    return module
