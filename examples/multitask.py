"""Multi-task learning on overlaid handwritten digits with gradient surgery (PCGrad, CAGrad, SAM-GS, GCond).

What it shows: a plain ``LightningModule`` (a shared MLP trunk and one head per task) trained on several tasks
at once, where the tasks compete for the trunk, and the same module trained with each aggregation method of
``lightning_optx.GradientSurgery``, added from outside by one flag. The module only honours the callback's
contract: ``training_step`` returns ``{"loss": sum of the task losses, "task_losses": {task: loss}}``.

Data (no download: scikit-learn's bundled ``load_digits``, 1,797 images of 8x8 pixels), MultiMNIST-style:
two digits are pasted side by side on a 8x12 canvas, overlapping by 4 columns (the pixel-wise maximum where
they overlap), so the trunk must untangle both from the same pixels. Digits are split into train and
validation images first (seeded), and pairs are drawn within each split, so no validation pair shares an
image with training. Three tasks (``--tasks``):

* ``left`` and ``right``: 10-class classification of the left and of the right digit;
* ``sum``: regression of ``left + right`` (standardised with the training targets' mean and spread).

``--tasks left,right`` keeps the two classification tasks only. Validation reports per-task accuracy
(classification) or MSE and R^2 = 1 - MSE / Var(target) (regression), all from ``torchmetrics``, and the
combined score: the mean over tasks of accuracy (classification) or R^2 (regression), each in [0, 1] for a
useful model (R^2 is clipped at 0 below). The conflict rate logged by the callback, the fraction of task
pairs whose gradients on the shared trunk have a negative inner product, is averaged over the training steps.

Training: Adam, learning rate 1e-2 (the best of 5e-3, 1e-2, 2e-2 for equal weighting), batch 64, 15 epochs
of 3,000 training pairs; 2,000 validation pairs. Per-method settings the methods' authors prescribe are on by
default (``auto``, see :func:`method_settings`): SAM-GS clips the gradient norm to 1 (Lightning's
``gradient_clip_val``, which clips all gradients together; the authors clip the shared ones); GCond runs with
Adam's ``beta1 = 0`` because it keeps its own momentum.

Run it (``--method sum`` is equal weighting, the baseline; about 15 s of training per run on a 2-core CPU)::

    python examples/multitask.py --method sum
    python examples/multitask.py --method pcgrad
    python examples/multitask.py --method cagrad --cagrad-c 0.4
    python examples/multitask.py --method sam_gs            # --gradient-clip-val 1 by default
    python examples/multitask.py --method gcond             # --adam-beta1 0 by default
    python examples/multitask.py --method mean --tasks left,right
    # two CPU processes (Lightning re-launches this script for rank 1, hence everything is under __main__):
    python examples/multitask.py --method pcgrad --strategy ddp --devices 2 --accelerator cpu
    tensorboard --logdir runs/multitask

``GradientSurgery`` supports single-device training, ``ddp`` (it averages each task's gradient across ranks
itself) and lightning_optx's strategies (``local_sgd``/``diloco``/``diloco_x``: surgery on each replica's own
gradients between syncs; ``ddp_powersgd`` etc.: each task's gradient compressed, see
``docs/methods/gradient-surgery.md``); any other ``--strategy`` is refused by the callback with a clear error.
``--batch-size`` is per device. It prints the final validation metrics, the combined score and the mean conflict
rate (rank 0); TensorBoard logs go to ``--out-dir``. ``benchmarks/surgery.py`` imports
:func:`build_data`, :class:`MultiTaskNet`, :func:`task_loss`, :func:`method_settings` and :func:`train` from here.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_optx  # noqa: F401  (registers our strategy names, so --strategy accepts them)
from lightning_optx import GradientSurgery
from lightning_optx.functional.surgery import METHODS

__all__ = [
    "ConflictRecorder",
    "MultiTaskData",
    "MultiTaskModule",
    "MultiTaskNet",
    "RunResult",
    "Task",
    "build_data",
    "main",
    "method_options",
    "method_settings",
    "parse_args",
    "quiet",
    "task_loss",
    "train",
]

TASKS = ("left", "right", "sum")
CANVAS_WIDTH = 12  # two 8-wide digits overlapping by 4 columns
DEFAULTS: dict[str, Any] = dict(
    tasks="left,right,sum",
    hidden=64,
    depth=2,
    epochs=15,
    batch_size=64,
    lr=1e-2,  # the best of {5e-3, 1e-2, 2e-2} for equal weighting (sum), seeds 0 and 1, 15 epochs
    train_pairs=3000,
    val_pairs=2000,
    val_fraction=0.3,
    seed=0,
)
SAM_GS_CLIP = 1.0  # the SAM-GS authors' trainer clips the shared gradients' norm to 1


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Task:
    """One task: a name, ``"class"`` (with ``num_classes``) or ``"reg"``."""

    name: str
    kind: str
    num_classes: int = 1

    @property
    def out_dim(self) -> int:
        return self.num_classes if self.kind == "class" else 1


@dataclass
class MultiTaskData:
    """Inputs and per-task targets, split into train and validation."""

    tasks: list[Task]
    x_train: Tensor  # (n, 96) float32 in [0, 1]
    y_train: Tensor  # (n, T): class index or standardised regression target, as float32
    x_val: Tensor
    y_val: Tensor

    @property
    def in_dim(self) -> int:
        return self.x_train.shape[1]


def _overlay(left: Tensor, right: Tensor) -> Tensor:
    """Two (n, 8, 8) digit images on an (n, 8, 12) canvas, overlapping in the middle 4 columns."""
    canvas = torch.zeros(left.shape[0], 8, CANVAS_WIDTH)
    canvas[:, :, :8] = left
    shift = CANVAS_WIDTH - 8
    canvas[:, :, shift:] = torch.maximum(canvas[:, :, shift:], right)
    return canvas


def _pairs(images: Tensor, labels: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` random (left, right) pairs of the given images: flattened canvases, left labels, right labels."""
    i = torch.randint(len(images), (n,), generator=gen)
    j = torch.randint(len(images), (n,), generator=gen)
    return _overlay(images[i], images[j]).flatten(1), labels[i], labels[j]


def _task_list(names: Sequence[str]) -> list[Task]:
    unknown = sorted(set(names) - set(TASKS))
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"tasks must be at least 2 distinct names among {TASKS}, got {list(names)}")
    return [Task(n, "reg") if n == "sum" else Task(n, "class", 10) for n in names]


def build_data(tasks: Sequence[str] = ("left", "right", "sum"), train_pairs: int = 3000, val_pairs: int = 2000,
               val_fraction: float = 0.3, seed: int = 0) -> MultiTaskData:
    """Overlaid digit pairs from ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download).

    The 1,797 images are split (seeded) into train and validation images, then pairs are drawn within each
    split. Regression targets are standardised with the training mean and standard deviation.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    n_val = round(val_fraction * len(images))
    tr, va = perm[n_val:], perm[:n_val]
    x_tr, l_tr, r_tr = _pairs(images[tr], labels[tr], train_pairs, gen)
    x_va, l_va, r_va = _pairs(images[va], labels[va], val_pairs, gen)
    task_list = _task_list(tasks)

    def targets(left: Tensor, right: Tensor) -> dict[str, Tensor]:
        return {"left": left.float(), "right": right.float(), "sum": (left + right).float()}

    raw_tr, raw_va = targets(l_tr, r_tr), targets(l_va, r_va)
    mean, std = raw_tr["sum"].mean(), raw_tr["sum"].std()
    for raw in (raw_tr, raw_va):
        raw["sum"] = (raw["sum"] - mean) / std
    y_tr = torch.stack([raw_tr[t.name] for t in task_list], dim=1)
    y_va = torch.stack([raw_va[t.name] for t in task_list], dim=1)
    return MultiTaskData(task_list, x_tr, y_tr, x_va, y_va)


# --------------------------------------------------------------------------------------------- model


class MultiTaskNet(nn.Module):
    """A shared MLP trunk (``depth`` layers of ``hidden`` units, ReLU) and one linear head per task."""

    def __init__(self, in_dim: int, tasks: Sequence[Task], hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t.name: nn.Linear(hidden, t.out_dim) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


def task_loss(task: Task, output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for a classification task, MSE for a regression task."""
    if task.kind == "class":
        return F.cross_entropy(output, target.long())
    return F.mse_loss(output.squeeze(-1), target)


class MultiTaskModule(pl.LightningModule):
    """The shared trunk and task heads, trained with Adam on the sum of the task losses.

    ``training_step`` returns ``{"loss": sum, "task_losses": {task: loss}}``: without a callback Lightning
    minimises the sum (equal weighting); with ``GradientSurgery`` the per-task losses are what counts.
    Validation logs ``val/<task>/acc`` (classification) or ``val/<task>/mse`` and ``val/<task>/r2``
    (regression), and ``val/combined``, the mean of the per-task scores (accuracy or R^2 clipped at 0).
    """

    def __init__(self, tasks: Sequence[Task], in_dim: int, hidden: int = 64, depth: int = 2, lr: float = 1e-2,
                 val_target_var: Sequence[float] | None = None, adam_beta1: float = 0.9) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.lr, self.adam_beta1 = lr, adam_beta1
        self.net = MultiTaskNet(in_dim, self.tasks, hidden, depth)
        self.val_target_var = list(val_target_var) if val_target_var is not None else [1.0] * len(self.tasks)
        self.val_metrics = nn.ModuleDict({
            t.name: torchmetrics.classification.MulticlassAccuracy(t.num_classes, average="micro")
            if t.kind == "class" else torchmetrics.MeanSquaredError()
            for t in self.tasks
        })

    def task_losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        outputs = self.net(x)
        return {t.name: task_loss(t, outputs[t.name], y[:, i]) for i, t in enumerate(self.tasks)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        losses = self.task_losses(*batch)
        total = torch.stack(list(losses.values())).sum()
        self.log("train/loss", total, on_step=True, on_epoch=False)
        return {"loss": total, "task_losses": losses}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        outputs = self.net(x)
        for i, t in enumerate(self.tasks):
            out = outputs[t.name]
            if t.kind == "class":
                self.val_metrics[t.name].update(out, y[:, i].long())
            else:
                self.val_metrics[t.name].update(out.squeeze(-1), y[:, i])

    def on_validation_epoch_end(self) -> None:
        values: dict[str, float] = {}
        scores = []
        for i, t in enumerate(self.tasks):
            metric = self.val_metrics[t.name]
            value = float(metric.compute())  # torchmetrics syncs across ranks here
            metric.reset()
            if t.kind == "class":
                values[f"val/{t.name}/acc"] = value
                scores.append(value)
            else:
                r2 = 1.0 - value / self.val_target_var[i]
                values[f"val/{t.name}/mse"] = value
                values[f"val/{t.name}/r2"] = r2
                scores.append(max(r2, 0.0))
        values["val/combined"] = sum(scores) / len(scores)
        self.log_dict(values, sync_dist=False)  # already global

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(self.adam_beta1, 0.999))


class ConflictRecorder(Callback):
    """Collects ``surgery/conflict_rate`` (logged by ``GradientSurgery``) at every optimizer step."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        value = trainer.callback_metrics.get("surgery/conflict_rate")
        if value is not None and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.rates.append(float(value))

    @property
    def mean(self) -> float:
        return sum(self.rates) / len(self.rates) if self.rates else math.nan


# ---------------------------------------------------------------------------------------------- training


@dataclass
class RunResult:
    """What one ``fit`` produced (the final validation)."""

    method: str
    metrics: dict[str, float]
    combined: float
    conflict_rate_mean: float
    conflict_rates: list[float] = field(default_factory=list)
    steps: int = 0
    world_size: int = 1
    is_global_zero: bool = True
    fit_s: float = 0.0


def method_settings(method: str) -> dict[str, Any]:
    """What the method's authors prescribe beyond the aggregation, used by ``auto`` below and the benchmark.

    ``{"options": GradientSurgery options, "gradient_clip_val": ..., "adam_beta1": ...}``:

    * ``sam_gs``: the authors' trainer clips the shared gradients to norm 1 (its modulation branch can blow up
      the gradient's scale): ``gradient_clip_val=1`` (Lightning clips all gradients, heads included);
    * ``gcond``: it keeps its own momentum of the resolved gradient, and its README advises switching the
      optimizer's first moment off: ``adam_beta1=0``;
    * every other method: Adam's defaults, no clipping.
    """
    return {
        "options": {},
        "gradient_clip_val": SAM_GS_CLIP if method == "sam_gs" else None,
        "adam_beta1": 0.0 if method == "gcond" else 0.9,
    }


def method_options(method: str, cagrad_c: float | None = None, sam_gs_gamma: float | None = None) -> dict[str, Any]:
    """The ``GradientSurgery`` options given on the command line for ``method`` (only its own)."""
    options: dict[str, Any] = {}
    if cagrad_c is not None:
        if method != "cagrad":
            raise ValueError(f"--cagrad-c applies to --method cagrad, not to --method {method}")
        options["c"] = cagrad_c
    if sam_gs_gamma is not None:
        if method != "sam_gs":
            raise ValueError(f"--sam-gs-gamma applies to --method sam_gs, not to --method {method}")
        options["gamma"] = sam_gs_gamma
    return options


def quiet() -> None:
    """Hide Lightning's info lines and the warnings that do not apply to this small example."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*", ".*number of training batches.*",
                    ".*sync_dist=True.*"):
        warnings.filterwarnings("ignore", message=message)


def train(data: MultiTaskData, method: str, options: dict[str, Any] | None = None, *, epochs: int = 15,
          batch_size: int = 64, lr: float = 1e-2, hidden: int = 64, depth: int = 2, seed: int = 0,
          gradient_clip_val: float | None = None, adam_beta1: float = 0.9, strategy: Any = "auto",
          devices: int | str = 1, accelerator: str = "cpu", logger: Any = False,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train :class:`MultiTaskModule` with ``GradientSurgery(method, **options)`` and return the final validation.

    Every method, the baselines ``sum`` and ``mean`` included, goes through the callback, so every run logs the
    conflict rate and differs from the others only in the aggregation (and in ``gradient_clip_val``).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    var = data.y_val.var(dim=0, unbiased=False).tolist()
    module = MultiTaskModule(data.tasks, data.in_dim, hidden, depth, lr, val_target_var=var, adam_beta1=adam_beta1)
    train_loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=512)
    recorder = ConflictRecorder()
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=epochs,
        gradient_clip_val=gradient_clip_val, logger=logger, log_every_n_steps=10, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, deterministic=True,
        callbacks=[GradientSurgery(method, **(options or {})), recorder, *callbacks],
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    fit_s = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return RunResult(method, metrics, metrics["val/combined"], recorder.mean, recorder.rates, trainer.global_step,
                     trainer.world_size, trainer.is_global_zero, fit_s)


# ---------------------------------------------------------------------------------------------- script


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _clip_value(value: str) -> float | str | None:
    if value == "auto":
        return value
    return None if value.lower() in ("none", "off", "0") else float(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="pcgrad", help="aggregation; sum/mean are the baselines")
    parser.add_argument("--cagrad-c", type=float, default=None, help="cagrad: radius c of the ball (default 0.5)")
    parser.add_argument("--sam-gs-gamma", type=float, default=None, help="sam_gs: similarity threshold (default 0.1)")
    parser.add_argument("--gradient-clip-val", type=_clip_value, default="auto",
                        help=f"gradient norm clipping ('none': off); auto: {SAM_GS_CLIP} for sam_gs, off otherwise")
    parser.add_argument("--adam-beta1", type=lambda v: v if v == "auto" else float(v), default="auto",
                        help="Adam's beta1; auto: 0 for gcond (it has its own momentum), 0.9 otherwise")
    parser.add_argument("--tasks", default=DEFAULTS["tasks"], help=f"comma-separated, among {', '.join(TASKS)}")
    parser.add_argument("--strategy", default="auto",
                        help="any registered strategy name (ddp, local_sgd, diloco, ddp_powersgd, ...)")
    parser.add_argument("--devices", type=_devices, default=1, help="devices (processes) per node")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="per device")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate")
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="trunk width")
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"], help="trunk layers")
    parser.add_argument("--train-pairs", type=int, default=DEFAULTS["train_pairs"])
    parser.add_argument("--val-pairs", type=int, default=DEFAULTS["val_pairs"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="data split, pairs, weights, batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the model is tiny)")
    parser.add_argument("--out-dir", default="runs/multitask", help="TensorBoard logs")
    args = parser.parse_args(argv)
    if args.strategy not in StrategyRegistry and args.strategy != "auto":
        parser.error(f"unknown strategy {args.strategy!r}; registered: {', '.join(sorted(StrategyRegistry))}")
    try:
        args.options = method_options(args.method, args.cagrad_c, args.sam_gs_gamma)
        args.task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        _task_list(args.task_names)
    except ValueError as err:
        parser.error(str(err))
    auto = method_settings(args.method)
    if args.gradient_clip_val == "auto":
        args.gradient_clip_val = auto["gradient_clip_val"]
    if args.adam_beta1 == "auto":
        args.adam_beta1 = auto["adam_beta1"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    data = build_data(args.task_names, args.train_pairs, args.val_pairs, seed=args.seed)
    logger = TensorBoardLogger(args.out_dir, name=args.method)
    result = train(data, args.method, args.options, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   hidden=args.hidden, depth=args.depth, seed=args.seed, gradient_clip_val=args.gradient_clip_val,
                   adam_beta1=args.adam_beta1,
                   strategy=args.strategy, devices=args.devices, accelerator=args.accelerator, logger=logger)
    if result.is_global_zero:
        print(f"method: {args.method}")
        print(f"options: {args.options}")
        print(f"gradient_clip_val: {args.gradient_clip_val}")
        print(f"adam_beta1: {args.adam_beta1}")
        print(f"world_size: {result.world_size}")
        print(f"steps: {result.steps}")
        for name, value in sorted(result.metrics.items()):
            if name == "val/combined":
                continue
            print(f"{name}: {value:.4f}")
        print(f"combined: {result.combined:.4f}")
        print(f"conflict_rate_mean: {result.conflict_rate_mean:.4f}")
        print(f"fit_s: {result.fit_s:.1f}")


if __name__ == "__main__":
    main()
