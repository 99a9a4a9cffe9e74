"""Fine-tune a small sentence encoder on word polarity, with GradES and/or a dropout schedule added from outside.

What it shows: an ordinary ``LightningModule`` (``examples/text_data.py``: the bundled all-MiniLM-L6-v2
encoder, mean pooling, dropout, linear head) fine-tuned on the VADER lexicon (is a word, slang term or
emoticon positive or negative?, about 5,500 training and 1,400 validation entries, no download), with
lightning-optx callbacks switched on by flags:

* ``--grades``: :class:`lightning_optx.GradES` freezes each attention/FFN matrix whose gradient has settled
  (after ``--grace-fraction`` of the planned steps) and stops training once all are frozen. Printed: the
  step at which training stopped and the fraction of the 36 matrices (and of their parameters) frozen.
* ``--dropout early|late|standard``: :class:`lightning_optx.DropoutSchedule` drives every dropout rate of the
  model (encoder and head): ``early`` = ``--dropout-p`` for the first ``--dropout-cutoff`` of training then 0,
  ``late`` = 0 then ``--dropout-p``, ``standard`` = ``--dropout-p`` throughout (default, the usual
  fine-tuning recipe). ``none`` sets every dropout rate to 0 and adds no callback.

The module knows nothing about either callback. ``--strategy`` takes any name in Lightning's
``StrategyRegistry`` (``import lightning_optx`` adds ours: ``local_sgd``, ``ddp_powersgd``, ...).

Run (a few minutes each on a 2-core CPU; on a busy shared machine add ``--threads 1``)::

    python examples/finetune_text.py --max-steps 300                                  # plain fine-tuning
    python examples/finetune_text.py --max-steps 300 --grades --dropout early         # GradES + early dropout
    python examples/finetune_text.py --max-steps 100 --strategy ddp --devices 2 --accelerator cpu
    python examples/finetune_text.py --model bert-base-uncased --dataset imdb --max-length 256   # needs the Hub
    tensorboard --logdir runs/finetune_text

Under ``--strategy ddp --devices 2`` Lightning re-runs this script for rank 1, which is why everything happens
under ``if __name__ == "__main__"`` and every rank is seeded the same. Without ``--model``/``--dataset``
nothing touches the network (the Hugging Face offline variables are set). With them the model/dataset come
from the Hugging Face Hub (``--dataset`` also needs the ``datasets`` package); offline, a clear error says so.

Choosing ``--grades-tau``: ``benchmarks/grades.py`` calibrates it from a baseline run's gradient curves (the
largest matrix's mean metric over the last 10% of a full run) and prints the value; the default (``1e-3``,
absolute, metric ``grad``) is what that rule gives for this task at the default batch size (16) and learning
rate (1e-4): 1.05e-3 and 1.22e-3 for seeds 0 and 1. The metric is one batch's mean absolute gradient, so it
scales with the batch's noise: recalibrate for another batch size, learning rate, model or dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import StrategyRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))

import text_data

from lightning_optx import DropoutSchedule, GradES

__all__ = ["build_callbacks", "main", "parse_args", "parse_cutoff", "val_interval"]

DEFAULT_TAU = 1e-3


def parse_cutoff(value: str) -> int | float:
    """``"0.2"`` -> 0.2 (a fraction of the planned steps), ``"150"`` -> 150 (optimizer steps)."""
    number = float(value)
    if number.is_integer() and number >= 1:
        return int(number)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"cutoff must be a fraction in (0, 1) or a step count >= 1, got {value}")
    return number


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def val_interval(max_steps: int, evaluations: int = 5) -> int:
    """The largest divisor of ``max_steps`` not above ``max_steps / evaluations``, so the last step validates."""
    target = max(1, max_steps // evaluations)
    return next(d for d in range(target, 0, -1) if max_steps % d == 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("GradES")
    g.add_argument("--grades", action="store_true", help="add the GradES callback")
    g.add_argument("--grades-tau", type=float, default=DEFAULT_TAU, help="convergence threshold")
    g.add_argument("--grades-tau-mode", choices=["absolute", "relative"], default="absolute",
                   help="relative: tau is a fraction (< 1) of each matrix's metric at the first step")
    g.add_argument("--grades-metric", choices=["grad", "weight_delta"], default="grad")
    g.add_argument("--grace-fraction", type=float, default=0.55, help="fraction of planned steps never frozen")
    g.add_argument("--grades-stop", action=argparse.BooleanOptionalAction, default=True,
                   help="stop training once every matrix is frozen (--no-grades-stop: run all steps)")
    d = parser.add_argument_group("dropout")
    d.add_argument("--dropout", choices=["none", "early", "late", "standard"], default="standard",
                   help="none: every dropout rate 0; otherwise a DropoutSchedule over every dropout of the model")
    d.add_argument("--dropout-p", type=float, default=0.1)
    d.add_argument("--dropout-cutoff", type=parse_cutoff, default=None,
                   help="fraction of planned steps (or a step count); default 0.2 for early, 0.5 for late")
    t = parser.add_argument_group("training")
    t.add_argument("--strategy", default="auto", help="'auto' or any name in Lightning's StrategyRegistry")
    t.add_argument("--devices", type=_devices, default=1, help="devices (processes) per node, or 'auto'")
    t.add_argument("--accelerator", default="auto")
    t.add_argument("--epochs", type=int, default=3, help="used when --max-steps is not given")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=16, help="per device")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup-fraction", type=float, default=0.1)
    t.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (default: torch's choice); 1 is much faster on a busy "
                        "shared CPU")
    t.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the word/position embedding tables fixed (a third of the optimizer's work on CPU)")
    m = parser.add_argument_group("model and data")
    m.add_argument("--model", default=None, help="Hugging Face model name or local directory (default: bundled "
                                                 "all-MiniLM-L6-v2, offline)")
    m.add_argument("--dataset", default=None, help="Hugging Face `datasets` name (default: the VADER lexicon)")
    m.add_argument("--dataset-config", default=None, help="dataset configuration, e.g. sst2 for --dataset glue")
    m.add_argument("--text-field", default=None, help="text column (default: text/sentence/content/review)")
    m.add_argument("--max-length", type=int, default=16, help="tokens per example (truncation)")
    parser.add_argument("--out-dir", default="runs/finetune_text")
    args = parser.parse_args(argv)
    if args.strategy != "auto" and args.strategy not in StrategyRegistry:
        parser.error(f"unknown --strategy {args.strategy!r}; registered: auto, {', '.join(sorted(StrategyRegistry))}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    return args


def build_callbacks(args: argparse.Namespace) -> tuple[list[Callback], GradES | None]:
    """The callbacks the flags ask for, and the ``GradES`` instance (or ``None``) to read its result from."""
    callbacks: list[Callback] = []
    grades = None
    if args.grades:
        grades = GradES(tau=args.grades_tau, grace_fraction=args.grace_fraction, metric=args.grades_metric,
                        tau_mode=args.grades_tau_mode, stop_when_all_frozen=args.grades_stop)
        callbacks.append(grades)
    if args.dropout != "none":
        cutoff = args.dropout_cutoff if args.dropout_cutoff is not None else (0.5 if args.dropout == "late" else 0.2)
        shape = "constant" if args.dropout == "late" else "linear"
        callbacks.append(DropoutSchedule(mode=args.dropout, p=args.dropout_p, cutoff=cutoff, shape=shape))
    return callbacks, grades


def _load(args: argparse.Namespace) -> tuple[Any, torch.nn.Module, list, list, int]:
    tokenizer, encoder = text_data.load_encoder(args.model)
    if args.dataset is None:
        train, val = text_data.vader_polarity_dataset(seed=args.seed)
        num_labels = 2
    else:
        train, val, num_labels = text_data.hf_text_dataset(args.dataset, args.dataset_config, seed=args.seed,
                                                           text_field=args.text_field)
    return tokenizer, encoder, train, val, num_labels


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None and args.dataset is None:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)  # same head init and data order on every rank
    tokenizer, encoder, train, val, num_labels = _load(args)
    data = text_data.TextDataModule(train, val, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                                    seed=args.seed)
    module = text_data.TextClassifier(encoder, num_labels=num_labels, dropout=args.dropout_p, lr=args.lr,
                                      weight_decay=args.weight_decay, warmup_fraction=args.warmup_fraction,
                                      freeze_embeddings=args.freeze_embeddings)
    if args.dropout == "none":
        text_data.set_dropout(module, 0.0)
    callbacks, grades = build_callbacks(args)
    steps: dict[str, Any] = ({"max_steps": args.max_steps, "val_check_interval": val_interval(args.max_steps),
                              "check_val_every_n_epoch": None}
                             if args.max_steps is not None else {"max_epochs": args.epochs})
    name = "_".join(["grades" if args.grades else "baseline", f"dropout-{args.dropout}", args.strategy])
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=TensorBoardLogger(args.out_dir, name=name),
        callbacks=callbacks,
        **steps,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print(f"run: {name}")
        print(f"world_size: {trainer.world_size}")
        print(f"planned_steps: {int(trainer.estimated_stepping_batches)}")
        print(f"steps: {trainer.global_step}")
        print(f"val_acc: {float(metrics.get('val_acc', float('nan'))):.4f}")
        print(f"val_loss: {float(metrics.get('val_loss', float('nan'))):.4f}")
        print(f"wall_clock_s: {wall:.1f}")
        ledger = getattr(getattr(trainer.strategy, "comm", None), "ledger", None)
        if ledger is not None:  # our strategies record every collective
            print(f"comm_bytes_total: {ledger.total_bytes} (wire: {ledger.total_wire_bytes})")
        if grades is not None:
            sizes = {n: p.numel() for n, p in module.named_parameters() if n in grades.target_names}
            frozen_numel, total_numel = sum(sizes[n] for n in grades.frozen), sum(sizes.values())
            print(f"grades_frozen_fraction: {len(grades.frozen) / max(len(grades.target_names), 1):.3f} "
                  f"({len(grades.frozen)}/{len(grades.target_names)} matrices)")
            print(f"grades_frozen_param_fraction: {frozen_numel / max(total_numel, 1):.3f}")
            stopped = trainer.global_step < trainer.estimated_stepping_batches and not grades.active_names
            print(f"grades_stopped_at_step: {trainer.global_step if stopped else 'not stopped (ran all steps)'}")
            first = min(grades.frozen.values(), default=None)
            print(f"grades_first_freeze_step: {first}")


if __name__ == "__main__":
    main()
