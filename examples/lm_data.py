"""An offline character-level language-modelling task: a corpus that ships with Python, and a small GPT.

What it provides (imported by ``examples/distributed_finetune.py`` and ``benchmarks/communication.py``):

* :func:`build_corpus`: the documentation of a fixed list of standard-library modules (the module
  docstring, then the docstrings of its public classes, their public methods and its public functions, in
  sorted order, each text once) plus the Zen of Python, split document by document into train (9 of 10)
  and validation (every 10th document). Nothing is downloaded; the text depends only on the Python version
  (all ranks of a run use the same interpreter, so they build the same corpus). Docstrings are stripped
  under ``python -OO``: the corpus then refuses to build.
* :class:`CharWindows`: fixed-length windows ``(x, y)`` of encoded characters, ``y`` shifted by one.
* :class:`CharDataModule`: train/validation loaders of those windows.
* :class:`GPT` / :class:`CharLM`: a small decoder-only transformer (token and learned position embeddings,
  pre-LayerNorm blocks with causal self-attention and a 4x GELU MLP, final LayerNorm, tied or untied head),
  and an ordinary ``LightningModule`` around it that logs ``train_loss`` and ``val_loss`` and trains with
  AdamW (weight decay on matrices only) under an optional linear warm-up + cosine schedule. It knows
  nothing about distributed strategies.

Run (prints corpus statistics and the model's parameter count)::

    python examples/lm_data.py
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib
import inspect
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "GPT",
    "MODULES",
    "CharCorpus",
    "CharDataModule",
    "CharLM",
    "CharWindows",
    "GPTConfig",
    "build_corpus",
    "parameter_breakdown",
]

# Fixed order: the corpus (and so the vocabulary and the split) is the same in every process.
MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email.message", "enum", "fractions", "functools", "gettext", "glob", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "sched", "secrets", "shlex", "shutil", "socket", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "types",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile",
)
VAL_EVERY = 10  # every 10th document goes to validation
MIN_CHARS = 100_000


# ---------------------------------------------------------------------------------------------- corpus


def _zen_of_python() -> str:
    """The Zen of Python, decoded from ``this.s`` (importing ``this`` prints it: stdout is swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def _public_docs(module: Any) -> Iterator[str | None]:
    """The module docstring, then those of its public classes (and their methods) and functions, sorted."""
    yield module.__doc__
    members = vars(module)
    for name in sorted(members):
        obj = members[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield obj.__doc__
        elif inspect.isclass(obj):
            yield obj.__doc__
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    yield method.__doc__


def _documents(modules: tuple[str, ...]) -> list[str]:
    """Every distinct cleaned docstring of ``modules`` (first occurrence kept), then the Zen of Python."""
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io...) warn when touched
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a module a minimal Python build lacks: the corpus is still deterministic
                continue
            for doc in _public_docs(module):
                text = inspect.cleandoc(doc) if isinstance(doc, str) else ""
                if text and text not in seen:
                    seen.add(text)
                    docs.append(text)
    docs.append(_zen_of_python())
    return docs


@dataclass(frozen=True)
class CharCorpus:
    """Train and validation text and the character vocabulary (the sorted set of all characters)."""

    train_text: str
    val_text: str
    vocab: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


@functools.lru_cache(maxsize=4)
def build_corpus(modules: tuple[str, ...] = MODULES, val_every: int = VAL_EVERY) -> CharCorpus:
    """The standard-library documentation corpus, split by document (every ``val_every``-th to validation).

    Raises:
        RuntimeError: when the docstrings are missing (``python -OO``) and the corpus would be tiny.
    """
    docs = _documents(modules)
    train = "\n\n".join(d for i, d in enumerate(docs) if i % val_every != val_every - 1)
    val = "\n\n".join(d for i, d in enumerate(docs) if i % val_every == val_every - 1)
    if len(train) < MIN_CHARS:
        raise RuntimeError(f"the docstring corpus has only {len(train)} training characters (is Python running "
                           "with -OO, which strips docstrings?)")
    return CharCorpus(train, val, tuple(sorted(set(train) | set(val))))


class CharWindows(Dataset[tuple[Tensor, Tensor]]):
    """Windows of ``seq_len + 1`` characters starting every ``stride`` characters: ``(x, y)``, ``y = x`` shifted."""

    def __init__(self, ids: Tensor, seq_len: int, stride: int | None = None, limit: int | None = None) -> None:
        if ids.numel() <= seq_len:
            raise ValueError(f"need more than seq_len={seq_len} tokens, got {ids.numel()}")
        self.ids = ids
        self.seq_len = seq_len
        self.stride = stride or seq_len
        count = (ids.numel() - seq_len - 1) // self.stride + 1
        self.count = count if limit is None else min(count, limit)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.stride
        chunk = self.ids[start:start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class CharDataModule(pl.LightningDataModule):
    """Shuffled training windows and the first ``val_windows`` validation windows, ``batch_size`` per device.

    Under DDP, Lightning adds a ``DistributedSampler`` so that each rank sees its own shard.
    """

    def __init__(self, seq_len: int = 128, batch_size: int = 16, val_windows: int | None = 256) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_windows = val_windows
        self.corpus = build_corpus()

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        data = CharWindows(self.corpus.encode(self.corpus.train_text), self.seq_len)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        data = CharWindows(self.corpus.encode(self.corpus.val_text), self.seq_len, limit=self.val_windows)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


# ---------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GPTConfig:
    """Shape of :class:`GPT`. ``bias=False`` (as in nanoGPT's recommended setting) leaves LayerNorm weights as
    the only 1-D parameters; ``tie_weights`` shares the token embedding with the output head."""

    vocab_size: int
    seq_len: int = 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = False
    tie_weights: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(hidden, cfg.d_model, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over characters: ``(batch, time)`` ids to ``(batch, time, vocab)`` logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by ``1 / sqrt(2 n_layers)``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos, std=0.02)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of length {t} is longer than seq_len={self.cfg.seq_len}")
        x = self.drop(self.tok(ids) + self.pos[:t])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class CharLM(pl.LightningModule):
    """Character-level language model: next-character cross-entropy (nats), AdamW, warm-up + cosine.

    Args:
        vocab_size: number of distinct characters.
        seq_len, d_model, n_layers, n_heads, dropout, bias, tie_weights: see :class:`GPTConfig`.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not to LayerNorm weights/biases).
        betas: AdamW betas.
        warmup_steps: linear warm-up from 0 to ``lr`` over this many optimizer steps.
        max_steps: with ``max_steps > 0``, cosine decay from ``lr`` to ``min_lr_ratio * lr`` after warm-up,
            reaching it at ``max_steps``; ``0`` keeps ``lr`` constant after warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int = 128,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.0,
        bias: bool = False,
        tie_weights: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        max_steps: int = 0,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = GPTConfig(vocab_size, seq_len, d_model, n_layers, n_heads, dropout=dropout, bias=bias,
                        tie_weights=tie_weights)
        self.model = GPT(cfg)

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        schedule = functools.partial(_warmup_cosine, warmup=hp.warmup_steps, total=hp.max_steps,
                                     floor=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_breakdown(module: nn.Module) -> dict[str, int]:
    """Number of trainable entries in matrices (>= 2-D) and in vectors (1-D: LayerNorm weights, biases)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return {
        "matrix": sum(p.numel() for p in params if p.dim() >= 2),
        "vector": sum(p.numel() for p in params if p.dim() < 2),
    }


if __name__ == "__main__":
    corpus = build_corpus()
    print(f"train_chars: {len(corpus.train_text)}")
    print(f"val_chars: {len(corpus.val_text)}")
    print(f"vocab_size: {corpus.vocab_size}")
    lm = CharLM(corpus.vocab_size)
    for kind, count in parameter_breakdown(lm).items():
        print(f"params_{kind}: {count}")
