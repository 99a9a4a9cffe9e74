"""Tiny deterministic models, data and LightningModules shared by every test."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

ModelName = Literal["mlp", "wide_mlp", "transformer", "mha_transformer", "dropout_mlp"]


class TinyMLP(nn.Module):
    def __init__(self, in_dim: int = 8, hidden: int = 16, out_dim: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TinyAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (the Llama naming)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TinyAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """A 2-layer transformer encoder built from ``nn.Linear``s; input (batch, seq, in_dim)."""

    def __init__(self, in_dim: int = 8, dim: int = 16, heads: int = 2, layers: int = 2, out_dim: int = 4):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


class TinyMHATransformer(nn.Module):
    """``nn.TransformerEncoder`` (fused ``in_proj_weight``, dropout modules and attention dropout)."""

    def __init__(self, in_dim: int = 8, dim: int = 16, out_dim: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class DropoutMLP(nn.Module):
    def __init__(self, in_dim: int = 8, hidden: int = 32, out_dim: int = 4, p: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.drop1 = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(p)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop2(torch.relu(self.fc2(self.drop1(torch.relu(self.fc1(x)))))))


def make_model(name: ModelName) -> nn.Module:
    if name == "mlp":
        return TinyMLP()
    if name == "wide_mlp":  # a 128 x 128 matrix: big enough for every compressor to pay
        return TinyMLP(hidden=128)
    if name == "transformer":
        return TinyTransformer()
    if name == "mha_transformer":
        return TinyMHATransformer()
    if name == "dropout_mlp":
        return DropoutMLP()
    raise ValueError(f"unknown tiny model {name!r}")


def random_dataset(model: ModelName = "mlp", n: int = 64, seed: int = 1234) -> TensorDataset:
    """A fixed regression data set (independent of the global seed)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5, 8) if model in ("transformer", "mha_transformer") else (n, 8)
    x = torch.randn(shape, generator=g)
    y = torch.randn(n, 4, generator=g)
    return TensorDataset(x, y)


class TinyModule(pl.LightningModule):
    """A LightningModule around a tiny model, with knobs for the interaction cases the tests need.

    Args:
        model: ``"mlp"``, ``"wide_mlp"``, ``"transformer"``, ``"mha_transformer"`` or ``"dropout_mlp"``.
        optimizer: ``"sgd"`` (momentum 0.9), ``"plain_sgd"``, ``"adamw"`` or ``"adam"``.
        lr: learning rate.
        two_param_groups: put the head in its own param group with half the learning rate.
        data_size, batch_size: the fixed data set and the loader's batch size (no shuffling).
        shard_in_order: under DDP, give rank r the samples r, r + world_size, ... in order, so that one
            global batch equals the single-process batch of ``world_size * batch_size`` (run the Trainer with
            ``use_distributed_sampler=False``; Lightning's own sampler always shuffles training data).
    """

    def __init__(
        self,
        model: ModelName = "mlp",
        optimizer: str = "sgd",
        lr: float = 0.05,
        two_param_groups: bool = False,
        data_size: int = 64,
        batch_size: int = 8,
        weight_decay: float = 0.0,
        shard_in_order: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_model(model)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.two_param_groups:
            head = list(self.net.head.parameters())
            head_ids = {id(p) for p in head}
            body = [p for p in self.parameters() if id(p) not in head_ids]
            params: Any = [{"params": body}, {"params": head, "lr": hp.lr / 2}]
        else:
            params = self.parameters()
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        if hp.optimizer == "plain_sgd":
            return torch.optim.SGD(params, lr=hp.lr)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr)
        raise ValueError(f"unknown optimizer {hp.optimizer!r}")

    def train_dataloader(self) -> DataLoader:
        data = random_dataset(self.hparams.model, self.hparams.data_size)
        if self.hparams.shard_in_order and self.trainer.world_size > 1:
            sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False)


class TwoOptimizerModule(TinyModule):
    """Manual optimization with two optimizers (body and head), the Lightning 2 way of using several."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        opt_body, opt_head = self.optimizers()  # type: ignore[misc]
        loss = nn.functional.mse_loss(self(x), y)
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_head.step()
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:  # type: ignore[override]
        head = list(self.net.head.parameters())
        head_ids = {id(p) for p in head}
        body = [p for p in self.parameters() if id(p) not in head_ids]
        return [torch.optim.SGD(body, lr=self.hparams.lr, momentum=0.9), torch.optim.Adam(head, lr=1e-2)]


class MultiTaskModule(pl.LightningModule):
    """A shared trunk with one linear head per task; tasks regress conflicting targets of the same input.

    ``training_step`` returns ``{"loss": sum of task losses, "task_losses": {name: loss}}``, the contract of
    ``GradientSurgery``.
    """

    def __init__(self, tasks: int = 2, lr: float = 0.05, batch_size: int = 8, data_size: int = 64,
                 optimizer: str = "sgd", shard_in_order: bool = False, loss_mode: str = "sum") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({f"task{t}": nn.Linear(16, 1) for t in range(tasks)})
        with torch.no_grad():  # identical heads + opposite targets: the tasks pull the trunk in opposite ways
            for head in list(self.heads.values())[1:]:
                head.load_state_dict(self.heads["task0"].state_dict())

    def task_losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {name: nn.functional.mse_loss(head(h).squeeze(-1), y[:, t])
                for t, (name, head) in enumerate(self.heads.items())}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        losses = self.task_losses(x, y)
        total = torch.stack(list(losses.values())).sum()
        if self.hparams.loss_mode == "mean":
            total = total / len(losses)
        self.log("train_loss", total, on_step=True, on_epoch=False)
        return {"loss": total, "task_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(99)
        x = torch.randn(self.hparams.data_size, 8, generator=g)
        base = x[:, :3].sum(1, keepdim=True)
        signs = torch.tensor([(-1.0) ** t for t in range(self.hparams.tasks)])
        y = base * signs + 0.1 * torch.randn(self.hparams.data_size, self.hparams.tasks, generator=g)
        data = TensorDataset(x, y)
        if self.hparams.shard_in_order and self.trainer.world_size > 1:
            sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False)
