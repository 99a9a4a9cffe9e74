"""Data-parallel training of a small character-level GPT with any of our communication-saving strategies.

What it shows: the same ``LightningModule`` (``examples/lm_data.py``: a small decoder-only transformer on
the documentation of Python's standard library, no download) trained with plain DDP or with a
lightning-optx strategy chosen by one flag, and how many bytes each rank sent to do it:

=================  ==========================================================================
``--strategy``     what travels between the ranks
=================  ==========================================================================
``ddp``            every fp32 gradient, every step (Lightning's ``DDPStrategy``: the baseline)
``local_sgd``      nothing between syncs; the parameters, averaged every ``--period`` steps
``ddp_powersgd``   rank-``--rank`` factors ``P, Q`` of every gradient matrix (PowerSGD)
``ddp_topk``       the ``--density`` largest gradient entries and their indices
``ddp_sign``       one bit per gradient entry plus one scale per matrix
``ddp_fp16``       every gradient in fp16 (``ddp_bf16``: in bf16)
=================  ==========================================================================

Any other name in Lightning's ``StrategyRegistry`` is accepted too (``import lightning_optx`` registers ours).
The module knows nothing about the strategy: it is built from the flag, here, and given to the ``Trainer``.
At the end rank 0 prints the final train and validation loss, the bytes this rank sent per optimizer step
and the compression ratio (bytes of an fp32 all-reduce of every gradient every step, divided by the bytes
actually sent). Our strategies count their bytes in ``trainer.strategy.comm.ledger``; for plain ``ddp``
the figure is DDP's gradient buckets once per step (what its reducer all-reduces).

Run it

* on one machine, CPU, 2 processes started by Lightning itself (it re-runs this script for rank 1, which is
  why everything happens under ``if __name__ == "__main__"`` and is seeded)::

      python examples/distributed_finetune.py --strategy local_sgd --devices 2 --accelerator cpu --max-steps 200
      python examples/distributed_finetune.py --strategy ddp_powersgd --rank 4 --devices 2 --accelerator cpu

* with ``torchrun`` (Lightning sees the variables torchrun sets and starts nothing itself; ``--devices`` must
  equal ``--nproc-per-node`` and ``--num-nodes`` ``--nnodes``)::

      torchrun --nproc-per-node 2 examples/distributed_finetune.py --strategy ddp_topk --devices 2 --accelerator cpu
      # two GPU nodes; run on each node with its --node-rank
      torchrun --nnodes 2 --nproc-per-node 4 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
          examples/distributed_finetune.py --strategy ddp_sign --devices 4 --num-nodes 2 --accelerator gpu

* under SLURM (Lightning reads the SLURM variables; one task per device)::

      #SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4
      srun python examples/distributed_finetune.py --strategy local_sgd --period 16 --devices 4 --num-nodes 2

TensorBoard logs (losses, ``comm/bytes_per_step``, ``comm/compression_ratio``, ``local_sgd/period``) go to
``--out-dir``: ``tensorboard --logdir runs/distributed_finetune``.

``benchmarks/communication.py`` imports :func:`comm_summary` and :class:`LossHistory` from here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import Strategy, StrategyRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm_data

from lightning_optx import CompressedDDPStrategy, LocalSGDStrategy
from lightning_optx.distributed import CollectiveRecord

__all__ = ["CommSummary", "LossHistory", "build_strategy", "comm_summary", "fp32_grad_bytes", "main", "parse_args"]

DEFAULT_STRATEGIES = ("ddp", "local_sgd", "ddp_powersgd", "ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16")
# which strategy each option belongs to
OPTION_OWNER = {"period": "local_sgd", "rank": "ddp_powersgd", "density": "ddp_topk"}


# ---------------------------------------------------------------------------------------------- strategy


def build_strategy(name: str, period: int | None = None, rank: int | None = None,
                   density: float | None = None) -> str | Strategy:
    """The strategy for ``--strategy name``: the registered string itself, or an object when options are given.

    Raises:
        ValueError: an option given for a strategy that does not take it, or an unknown strategy name.
    """
    options = {"period": period, "rank": rank, "density": density}
    for option, value in options.items():
        if value is not None and OPTION_OWNER[option] != name:
            raise ValueError(f"--{option} applies to --strategy {OPTION_OWNER[option]}, not to --strategy {name}")
    if name not in StrategyRegistry:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(sorted(StrategyRegistry))}")
    if period is not None:
        return LocalSGDStrategy(period=period)
    if rank is not None:
        return CompressedDDPStrategy("powersgd", compressor_options={"rank": rank})
    if density is not None:
        return CompressedDDPStrategy("topk", compressor_options={"density": density})
    return name


# ---------------------------------------------------------------------------------------------- accounting


def fp32_grad_bytes(module: torch.nn.Module) -> int:
    """Bytes of one fp32 all-reduce of every trainable parameter's gradient (the compression baseline)."""
    return sum(4 * p.numel() for p in module.parameters() if p.requires_grad)


def _ddp_bucket_bytes(trainer: pl.Trainer) -> list[int]:
    """Sizes in bytes of the gradient buckets DDP's reducer all-reduces once per step (empty if not DDP)."""
    model = getattr(trainer.strategy, "model", None)
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return []
    try:
        data = model._get_ddp_logging_data()  # private but stable since torch 1.9; the fallback is one bucket
    except Exception:
        return []
    sizes = str(data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or "")
    return [int(s) for s in sizes.split(",") if s.strip().isdigit()]


def _plain_ddp_records(trainer: pl.Trainer, module: torch.nn.Module) -> list[CollectiveRecord]:
    """What plain DDP sent, rebuilt from its buckets: one overlapped all-reduce per bucket and step."""
    if trainer.world_size < 2:
        return []
    buckets = _ddp_bucket_bytes(trainer) or [fp32_grad_bytes(module)]
    return [
        CollectiveRecord("all_reduce", size, trainer.world_size, overlapped=True, tag="grad", step=step)
        for step in range(trainer.global_step)
        for size in buckets
    ]


@dataclass
class CommSummary:
    """What one rank sent during ``fit``.

    ``source`` is ``"ledger"`` for a lightning-optx strategy (its ``CommLedger``) and ``"ddp_buckets"`` for
    plain DDP (rebuilt from the reducer's buckets, overlapped with backward as DDP does).
    """

    steps: int
    total_bytes: int
    fp32_bytes_per_step: int
    source: str
    records: list[CollectiveRecord] = field(default_factory=list)

    @property
    def bytes_per_step(self) -> float:
        return self.total_bytes / self.steps if self.steps else 0.0

    @property
    def compression_ratio(self) -> float:
        """fp32 all-reduce of every gradient every step, divided by the bytes sent (1.0 when nothing is sent)."""
        return self.fp32_bytes_per_step * self.steps / self.total_bytes if self.total_bytes else 1.0


def comm_summary(trainer: pl.Trainer, module: torch.nn.Module) -> CommSummary:
    """Bytes sent by this rank during the last ``fit`` of ``trainer``, from the strategy's ledger or DDP's buckets."""
    comm = getattr(trainer.strategy, "comm", None)
    if comm is not None:
        records = list(comm.ledger.records)
        total, source = sum(r.payload_bytes for r in records), "ledger"
    else:
        records = _plain_ddp_records(trainer, module)
        total, source = sum(r.payload_bytes for r in records), "ddp_buckets"
    return CommSummary(trainer.global_step, total, fp32_grad_bytes(module), source, records)


class LossHistory(Callback):
    """Keeps this rank's training loss at every optimizer step, as ``(step, loss)``."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append((trainer.global_step, float(loss)))

    def tail_mean(self, fraction: float = 0.1) -> float:
        """Mean loss over the last ``fraction`` of the recorded steps (at least one)."""
        if not self.losses:
            return float("nan")
        n = max(1, round(fraction * len(self.losses)))
        return sum(v for _, v in self.losses[-n:]) / n


def val_interval(max_steps: int, evaluations: int = 4) -> int:
    """The largest divisor of ``max_steps`` not above ``max_steps / evaluations``, so the last step validates."""
    target = max(1, max_steps // evaluations)
    return next(d for d in range(target, 0, -1) if max_steps % d == 0)


# ---------------------------------------------------------------------------------------------- script


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--strategy", default="ddp",
                        help=f"one of {', '.join(DEFAULT_STRATEGIES)} or any other registered strategy name")
    parser.add_argument("--devices", type=_devices, default=2, help="devices (processes) per node")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per device and step")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed")
    parser.add_argument("--period", type=int, default=None, help="local_sgd: steps between parameter averagings")
    parser.add_argument("--rank", type=int, default=None, help="ddp_powersgd: approximation rank")
    parser.add_argument("--density", type=float, default=None, help="ddp_topk: fraction of entries sent")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --max-steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/distributed_finetune")
    args = parser.parse_args(argv)
    try:
        args.strategy_obj = build_strategy(args.strategy, args.period, args.rank, args.density)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True, verbose=False)  # same weights and data order on every rank
    data = lm_data.CharDataModule(seq_len=args.seq_len, batch_size=args.batch_size)
    warmup = args.warmup_steps if args.warmup_steps is not None else args.max_steps // 10
    module = lm_data.CharLM(data.vocab_size, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers,
                            n_heads=args.n_heads, lr=args.lr, warmup_steps=warmup, max_steps=args.max_steps)
    history = LossHistory()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy_obj,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=val_interval(args.max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=TensorBoardLogger(args.out_dir, name=args.strategy),
        callbacks=[history],
    )
    trainer.fit(module, datamodule=data)
    summary = comm_summary(trainer, module)
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print(f"strategy: {args.strategy}")
        print(f"world_size: {trainer.world_size}")
        print(f"steps: {trainer.global_step}")
        print(f"train_loss_last_10pct_rank0: {history.tail_mean():.4f}")
        print(f"val_loss: {float(metrics.get('val_loss', float('nan'))):.4f}")
        print(f"bytes_per_step: {summary.bytes_per_step:.0f}")
        print(f"fp32_allreduce_bytes_per_step: {summary.fp32_bytes_per_step}")
        print(f"compression_ratio: {summary.compression_ratio:.2f}")
        print(f"bytes_source: {summary.source}")


if __name__ == "__main__":
    main()
