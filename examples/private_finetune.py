"""Private fine-tuning with DP-SGD: a digit classifier fine-tuned on "private" data at a chosen epsilon.

What it shows: an ordinary ``LightningModule`` (a small MLP with GroupNorm on scikit-learn's 8x8 handwritten
digits, which ship with scikit-learn: no download) trained with ``lightning_optx.DifferentialPrivacy``. The
callback attaches Opacus' per-sample gradient hooks, wraps the optimizer in Opacus' DP optimizer, replaces the
training loader's sampler with Poisson sampling and keeps the privacy ledger; the module only makes sure an
empty batch gives a loss of 0 rather than NaN, and uses GroupNorm, not BatchNorm (which mixes the samples of a
batch and has no per-sample gradients).

The data set is split three ways: a small "public" part (5%) on which the model is first pre-trained without
privacy (plain PyTorch, before the Trainer), the "private" training part that DP-SGD fine-tunes on, and a test
part. The (epsilon, delta) guarantee covers the private training part only: not the public data, not the
pre-trained weights, not the choice of hyperparameters.

Run it::

    python examples/private_finetune.py --target-epsilon 3                 # one process
    python examples/private_finetune.py --target-epsilon 3 --grad-sample-mode ghost
    python examples/private_finetune.py --target-epsilon 8 --strategy ddp --devices 2 --accelerator cpu

With ``--strategy ddp --devices 2`` Lightning starts a second process that re-runs this script, which is why
everything happens under ``if __name__ == "__main__"`` and is seeded: both ranks pre-train the same weights,
Poisson-sample their half of the private data, and apply the same noisy update. ``--batch-size`` is per device,
so the expected batch per step (and epsilon, for the same epochs) is that of one process with twice the batch.

``--lora`` runs the second example: a sentiment classifier fine-tuned from the bundled all-MiniLM-L6-v2 (no
download) on the word-polarity task of ``examples/text_data.py`` (VADER lexicon), with LoRA adapters from the
``peft`` package on the attention's query and value projections: only the adapters and the classification
head train (19k of 22.6M parameters), so the per-sample gradients, and the noise, are those of the
adapters alone. The data comes from a ``LightningDataModule`` (``trainer.fit(model, datamodule=...)``); the
callback rebuilds its loader with Poisson sampling. ``--target-epsilon inf`` gives the non-private baseline with
the same hyperparameters::

    python examples/private_finetune.py --lora --target-epsilon 3
    python examples/private_finetune.py --lora --target-epsilon inf

Measured (one seed, shared 2-core CPU, ~9 min each): validation accuracy 0.887 at epsilon 2.99, 0.901 without DP.

Rank 0 prints ``name: value`` lines: the noise multiplier the callback calibrated for ``--target-epsilon``,
the epsilon reached (Opacus' accountant, for the optimizer steps actually taken), and the test accuracy before
and after fine-tuning. ``benchmarks/privacy.py`` imports the data, model and training helpers from here.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# One set of hyperparameters for every epsilon (tuning them on the private data would itself leak): a small
# model (DP noise grows with the parameter count), a large expected batch (the noise is divided by it), a
# moderate learning rate with momentum, and a clipping bound below the typical per-sample gradient norm.
DEFAULTS: dict[str, Any] = dict(
    target_epsilon=3.0,
    delta=1e-5,
    epochs=15,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    max_grad_norm=0.5,
    hidden=64,
    pretrain_epochs=20,
    public_fraction=0.05,
    test_fraction=0.2,
    seed=0,
)
#: the --lora example: LoRA rank 8 on query/value, AdamW; small enough for a few CPU minutes
LORA_DEFAULTS: dict[str, Any] = dict(epochs=3, batch_size=384, lr=1e-2, max_grad_norm=1.0, rank=2, max_train=3072)


# ---------------------------------------------------------------------------------------------- data


def load_digits_splits(seed: int = 0, public_fraction: float = 0.05,
                       test_fraction: float = 0.2) -> dict[str, TensorDataset]:
    """scikit-learn's digits (1797 8x8 images, 10 classes), scaled to [0, 1], split into public/private/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_public, n_test = int(public_fraction * len(x)), int(test_fraction * len(x))
    public, test, private = order[:n_public], order[n_public:n_public + n_test], order[n_public + n_test:]
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in
            (("public", public), ("private", private), ("test", test))}


# ---------------------------------------------------------------------------------------------- model


def make_net(hidden: int = 64) -> nn.Module:
    """64 -> hidden -> hidden -> 10 with GroupNorm (per-sample normalisation, DP-compatible)."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.GroupNorm(8, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.GroupNorm(8, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class DigitsClassifier(pl.LightningModule):
    """A plain classifier. The only concession to DP: ``training_step`` copes with the empty batches Poisson
    sampling can draw (the mean of no loss is NaN; the sum is 0, and so is its gradient)."""

    def __init__(self, net: nn.Module, train_data: TensorDataset, batch_size: int = 128, lr: float = 0.1,
                 momentum: float = 0.9) -> None:
        super().__init__()
        self.net = net
        self.train_data = train_data
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        per_sample = F.cross_entropy(self(x), y, reduction="none")
        loss = per_sample.mean() if len(per_sample) else per_sample.sum()
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=max(len(y), 1))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def train_dataloader(self) -> DataLoader:
        # shuffle/sampler do not matter under DifferentialPrivacy: it replaces them with Poisson sampling
        return DataLoader(self.train_data, batch_size=self.batch_size, shuffle=True)


def pretrain(net: nn.Module, data: TensorDataset, epochs: int, seed: int = 0, lr: float = 0.1) -> None:
    """Non-private pre-training on the public split (plain PyTorch, deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=32, shuffle=True, generator=generator):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(net: nn.Module, data: TensorDataset) -> float:
    net.eval()
    x, y = data.tensors
    return float((net(x).argmax(dim=1) == y).float().mean())


def build_trainer(callbacks: list[pl.Callback], epochs: int, strategy: str = "auto", devices: int | str = 1,
                  accelerator: str = "cpu", **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- main


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--target-epsilon", type=float, default=DEFAULTS["target_epsilon"],
                        help="privacy budget at --delta after --epochs epochs; 'inf' trains without DP")
    parser.add_argument("--delta", type=float, default=DEFAULTS["delta"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="private fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="expected Poisson batch per device")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--max-grad-norm", type=float, default=DEFAULTS["max_grad_norm"],
                        help="per-sample clipping bound")
    parser.add_argument("--grad-sample-mode", choices=["hooks", "functorch", "ghost"], default="hooks")
    parser.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    parser.add_argument("--pretrain-epochs", type=int, default=DEFAULTS["pretrain_epochs"],
                        help="non-private epochs on the public split (0: from scratch)")
    parser.add_argument("--strategy", default="auto", help="e.g. auto, ddp")
    parser.add_argument("--devices", type=_devices, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (fp16 is refused)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (the model is tiny: more threads mostly add overhead)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--lora", action="store_true",
                        help="the MiniLM + LoRA (peft) example instead of digits; --epochs, --batch-size, --lr and "
                             "--max-grad-norm then default to LORA_DEFAULTS")
    args = parser.parse_args(argv)
    if args.lora:
        for key, value in LORA_DEFAULTS.items():
            if key in vars(args) and getattr(args, key) == DEFAULTS.get(key):
                setattr(args, key, value)
    return args


def lora_main(args: argparse.Namespace) -> None:
    """MiniLM + LoRA adapters (peft), word polarity, DP-SGD through a datamodule."""
    import os
    import sys
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from lightning_optx import DifferentialPrivacy

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import text_data

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    train, val = text_data.vader_polarity_dataset(seed=args.seed)
    train = train[:LORA_DEFAULTS["max_train"]]
    tokenizer, encoder = text_data.load_minilm()
    encoder = get_peft_model(encoder, LoraConfig(r=LORA_DEFAULTS["rank"], lora_alpha=2 * LORA_DEFAULTS["rank"],
                                                 lora_dropout=0.0, target_modules=["query", "value"]))
    module = LoRAClassifier(encoder, lr=args.lr, weight_decay=0.0, warmup_fraction=0.0)
    data = text_data.TextDataModule(train, val, tokenizer, batch_size=args.batch_size, seed=args.seed)
    private = math.isfinite(args.target_epsilon)
    dp = DifferentialPrivacy(target_epsilon=args.target_epsilon, target_delta=args.delta,
                             max_grad_norm=args.max_grad_norm, accountant=args.accountant) if private else None
    trainer = build_trainer([dp] if dp else [], args.epochs, strategy=args.strategy, devices=args.devices,
                            accelerator=args.accelerator, precision=args.precision, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    [metrics] = build_trainer([], 1, accelerator=args.accelerator).validate(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        print(f"private_train_samples: {len(train)}")
        print(f"trainable_parameters: {trainable} of {sum(p.numel() for p in module.parameters())}")
        print(f"steps: {trainer.global_step}")
        if dp is not None:
            print(f"target_epsilon: {args.target_epsilon}")
            print(f"noise_multiplier: {dp.resolved_noise_multiplier:.4f}")
            print(f"epsilon: {dp.epsilon:.4f}")
        else:
            print("epsilon: inf")
        print(f"val_accuracy: {metrics['val_acc']:.4f}")
        print(f"fit_seconds: {wall:.1f}")


def _lora_classifier() -> type:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import text_data

    class _LoRAClassifier(text_data.TextClassifier):
        """``TextClassifier`` whose loss is 0 (not NaN) on an empty Poisson batch."""

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            per_sample = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"],
                                         reduction="none")
            loss = per_sample.mean() if len(per_sample) else per_sample.sum()
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=max(len(per_sample), 1))
            return loss

    return _LoRAClassifier


def LoRAClassifier(*args: Any, **kwargs: Any) -> pl.LightningModule:
    return _lora_classifier()(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    from lightning_optx.callbacks.differential_privacy import DifferentialPrivacy

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.lora:
        pl.seed_everything(args.seed, workers=True, verbose=False)
        lora_main(args)
        return
    pl.seed_everything(args.seed, workers=True, verbose=False)  # same weights and draws on every rank
    splits = load_digits_splits(args.seed, DEFAULTS["public_fraction"], DEFAULTS["test_fraction"])
    net = make_net(DEFAULTS["hidden"])
    pretrain(net, splits["public"], args.pretrain_epochs, seed=args.seed)
    before = accuracy(net, splits["test"])
    net.train()  # Lightning keeps the modes it finds, and Opacus needs training mode to record per-sample inputs

    private = math.isfinite(args.target_epsilon)
    callbacks: list[pl.Callback] = []
    dp = None
    if private:
        dp = DifferentialPrivacy(target_epsilon=args.target_epsilon, target_delta=args.delta,
                                 max_grad_norm=args.max_grad_norm, grad_sample_mode=args.grad_sample_mode,
                                 accountant=args.accountant)
        callbacks.append(dp)
    module = DigitsClassifier(net, splits["private"], batch_size=args.batch_size, lr=args.lr,
                              momentum=DEFAULTS["momentum"])
    trainer = build_trainer(callbacks, args.epochs, strategy=args.strategy, devices=args.devices,
                            accelerator=args.accelerator, precision=args.precision)
    start = time.perf_counter()
    trainer.fit(module)
    wall = time.perf_counter() - start
    after = accuracy(module.net, splits["test"])
    if trainer.is_global_zero:
        print(f"private_train_samples: {len(splits['private'])}")
        print(f"world_size: {trainer.world_size}")
        print(f"steps: {trainer.global_step}")
        if dp is not None:
            print(f"target_epsilon: {args.target_epsilon}")
            print(f"noise_multiplier: {dp.resolved_noise_multiplier:.4f}")
            print(f"sample_rate: {dp.sample_rate:.5f}")
            print(f"epsilon: {dp.epsilon:.4f}")
            print(f"delta: {args.delta}")
        else:
            print("epsilon: inf")
        print(f"test_accuracy_pretrained: {before:.4f}")
        print(f"test_accuracy: {after:.4f}")
        print(f"fit_seconds: {wall:.1f}")


if __name__ == "__main__":
    main()
