"""GradES benchmark: wall-clock, accuracy and backward FLOPs of fine-tuning MiniLM with and without GradES.

What it measures. For each seed, one invocation fine-tunes the same model (the bundled all-MiniLM-L6-v2
encoder + mean pooling + linear head, ``examples/text_data.py``) on the same data (VADER word polarity, the
split fixed by seed 0; the seed sets the head's initial weights, the batch order and the dropout masks) for
the same planned number of optimizer steps, twice:

1. **baseline**: plain fine-tuning, all planned steps. A recording callback stores, at every optimizer step,
   the GradES metric of every target matrix (mean absolute gradient of the 36 attention/FFN matrices, measured
   where ``GradES`` measures it: ``on_before_optimizer_step``).
2. **GradES**: the same, plus ``GradES(tau, grace_fraction=0.55, metric="grad")``, which freezes converged
   matrices after the grace period and stops training once all are frozen.

``tau`` is calibrated per seed from the baseline's recorded metric curves, in the same invocation, by a rule
fixed in advance (no look at any GradES result): ``tau`` = the largest, over the 36 matrices, of the
matrix's mean metric over the last 10% of the baseline's steps. In words: a matrix counts as converged once
its gradient is as small as the gradient the slowest matrix still has at the end of full training.
``--tau`` (absolute) or ``--tau-mode relative --tau 0.2`` replaces the rule.

Reported per seed and as mean/min/max over seeds:

* ``val_acc`` of both runs (the validation after the last step each run took; validation runs every
  ``steps / evaluations`` steps in both runs, and once more where GradES stops) and their difference;
* ``fit_s``: wall-clock of ``Trainer.fit`` (validation included) and ``speedup`` = baseline / GradES; also
  ``speedup_train_only`` with the validation time taken out, and ``speedup_cpu_time``, the same ratio of the
  process's CPU time (with one thread this is the work done, nearly independent of other processes' load
  on a shared machine);
* ``stop_step`` (the step at which GradES stopped, or the planned steps) and ``first_freeze_step``;
* FLOPs, computed analytically per step from the batch's shape (``tokens`` = batch x padded length) and from
  which matrices were frozen during that step: forward = ``tokens * sum(2 * in * out)`` over every
  ``nn.Linear`` plus the attention score/value matmuls (``4 * tokens * seq_len * width`` per layer); backward
  = 2 x forward; a frozen ``nn.Linear(in, out)`` saves its weight-gradient matmul, ``2 * in * out`` FLOPs per
  token. ``backward_flops_saved_by_freezing``: saved / full backward over the steps GradES ran (freezing only);
  ``backward_flops_saved_total``: 1 - GradES backward / baseline backward over the planned steps (freezing and
  the early stop); ``train_flops_saved_total``: the same for forward + backward;
* ``tau`` and a ``tau_sensitivity`` table: for ``tau`` x 0.25 ... 4, the step at which every matrix would first
  be below that threshold after the grace period, predicted from the baseline's curves (exact up to the
  first freeze, since until then the GradES run *is* the baseline run; approximate after it).

Reading the result. Until the first freeze the GradES run is the baseline run (same seed, same batches, same
dropout masks; ``pre_freeze_validations_match`` checks it), so GradES's accuracy is that of the baseline's
model at the step where it stopped. The metric is one minibatch's mean absolute gradient and moves by a
factor of 2-3 from one step to the next, while its trend falls slowly; a single-step threshold is therefore
crossed by every matrix within a few steps of the end of the grace period for any ``tau`` within 4x of the
calibrated one (see the ``tau_sensitivity`` lines). Here GradES amounts to stopping at ``grace_fraction`` of
the planned steps: the speed-up is close to ``1 / grace_fraction`` and almost none of it comes from skipped
weight-gradient matmuls (``backward_flops_saved_by_freezing``), all of it from the steps not taken.

Targets (PASS/FAIL lines, on the means over seeds): ``speedup >= 1.5`` and GradES accuracy not more than 0.5
points below the baseline's (``val_acc_diff >= -0.5``; being higher is fine).

Threads: each run uses ``--threads`` (default 1) intra-op threads: on a shared 2-core machine two OpenMP
threads slow down badly as soon as another process holds a core, which would add noise to the ratio.

Run::

    python benchmarks/grades.py --quick                 # 1 seed, 120 steps (about 3 minutes on 2 cores)
    nohup python benchmarks/grades.py > benchmarks/results/grades_full.log 2>&1 &   # 2 seeds, 640 steps (~14 min)
    python benchmarks/grades.py --seeds 0,1,2           # three seeds (about 21 minutes)

Prints ``name: value`` lines, writes ``benchmarks/results/grades.json`` (``grades_quick.json`` with
``--quick``) and ``benchmarks/results/grades.png`` (``grades_quick.png``): validation accuracy against
wall-clock for both runs of every seed, and GradES's frozen fraction against step.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "examples"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import lightning.pytorch as pl  # noqa: E402
import text_data  # noqa: E402  (examples/text_data.py)
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import nn  # noqa: E402

from lightning_optx import GradES  # noqa: E402
from lightning_optx.functional.grades import find_targets, mean_abs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SPEEDUP_TARGET = 1.5
ACC_TOLERANCE_POINTS = 0.5
TAU_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Settings:
    """Everything both runs of a seed share."""

    steps: int  # planned optimizer steps
    seeds: tuple[int, ...]
    batch_size: int = 16
    lr: float = 1e-4
    evaluations: int = 5  # validations per run (every steps / evaluations steps)
    grace_fraction: float = 0.55
    metric: str = "grad"
    calibration_window: float = 0.1  # tau rule: last 10% of the baseline's steps
    max_length: int = 16
    split_seed: int = 0
    threads: int = 1


QUICK = Settings(steps=120, seeds=(0,), evaluations=3)
FULL = Settings(steps=640, seeds=(0, 1))  # 640 steps of 16 = 1.9 epochs of the 5,454 training words


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class RunRecord:
    """What one run did, step by step."""

    name: str
    step_end_s: list[float] = field(default_factory=list)  # wall-clock since train start, after each step
    tokens: list[int] = field(default_factory=list)  # batch x padded length
    seq_len: list[int] = field(default_factory=list)
    saved_per_token: list[int] = field(default_factory=list)  # weight-grad FLOPs/token skipped (frozen matrices)
    frozen_count: list[int] = field(default_factory=list)  # frozen targets during the step
    final_frozen_count: int = 0  # frozen targets when training ended
    metrics: list[list[float]] = field(default_factory=list)  # per step, per target: mean |grad| (baseline)
    validations: list[dict[str, float]] = field(default_factory=list)  # step, wall_s, val_acc, val_loss
    val_s: float = 0.0  # time spent in validation
    fit_s: float = 0.0
    fit_cpu_s: float = 0.0  # CPU time of this process during fit (less sensitive to other processes' load)


class Recorder(Callback):
    """Records, per optimizer step, the batch shape, which targets are frozen, the time and (optionally) metrics."""

    def __init__(self, record: RunRecord, linear_flops: dict[str, int], record_metrics: bool) -> None:
        self.r, self.linear_flops, self.record_metrics = record, linear_flops, record_metrics
        self.targets: dict[str, nn.Parameter] = {}
        self._t0 = 0.0
        self._val_t0 = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        named = dict(pl_module.named_parameters())
        self.targets = {n: named[n] for n in find_targets(named)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        frozen = [n for n, p in self.targets.items() if not p.requires_grad]
        self.r.tokens.append(int(batch["input_ids"].numel()))
        self.r.seq_len.append(int(batch["input_ids"].shape[1]))
        self.r.saved_per_token.append(sum(self.linear_flops[n] for n in frozen))
        self.r.frozen_count.append(len(frozen))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.record_metrics:
            self.r.metrics.append(mean_abs([p.grad for p in self.targets.values()]).tolist())  # type: ignore[misc]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.r.step_end_s.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.r.final_frozen_count = sum(not p.requires_grad for p in self.targets.values())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.r.val_s += time.perf_counter() - self._val_t0
        m = trainer.callback_metrics
        self.r.validations.append({"step": int(trainer.global_step), "wall_s": time.perf_counter() - self._t0,
                                   "val_acc": float(m["val_acc"]), "val_loss": float(m["val_loss"])})


# ---------------------------------------------------------------------------------------------- runs


def quiet() -> None:
    """Hide Lightning's and transformers' info lines and warnings that do not apply here."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def train(name: str, s: Settings, seed: int, encoder: nn.Module, tokenizer: Any, data: tuple[list, list],
          callbacks: list[Callback], record_metrics: bool) -> tuple[RunRecord, text_data.TextClassifier]:
    """One seeded fine-tuning run of ``s.steps`` planned steps with ``callbacks`` added; returns its record."""
    pl.seed_everything(seed, verbose=False)
    module = text_data.TextClassifier(copy.deepcopy(encoder), lr=s.lr, freeze_embeddings=True)
    dm = text_data.TextDataModule(data[0], data[1], tokenizer, batch_size=s.batch_size, max_length=s.max_length,
                                  seed=seed)
    record = RunRecord(name)
    recorder = Recorder(record, text_data.linear_flops_per_token(module), record_metrics)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=s.steps, val_check_interval=s.steps // s.evaluations,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, *callbacks],
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=dm)
    record.fit_s = time.perf_counter() - start
    record.fit_cpu_s = time.process_time() - cpu_start
    return record, module


def calibrate_tau(metrics: list[list[float]], window: float) -> float:
    """The largest, over matrices, of each matrix's mean metric over the last ``window`` of the steps."""
    rows = metrics[-max(1, math.ceil(window * len(metrics))):]
    return max(sum(col) / len(col) for col in zip(*rows))


def predicted_freezes(metrics: list[list[float]], tau: float, grace_steps: int) -> tuple[int | None, int | None]:
    """(first freeze, all frozen) steps if the run followed the recorded curves; ``None``: never.

    Row ``i`` is the gradient of optimizer step ``i + 1`` (``trainer.global_step`` when GradES checks it).
    """
    firsts: list[int | None] = []
    for col in zip(*metrics):
        firsts.append(next((i + 1 for i, v in enumerate(col) if i + 1 >= grace_steps and v < tau), None))
    hit = [f for f in firsts if f is not None]
    return (min(hit) if hit else None), (max(hit) if len(hit) == len(firsts) else None)


def flops(record: RunRecord, module: text_data.TextClassifier, linear_per_token: int) -> dict[str, float]:
    """Forward, full backward and saved weight-gradient FLOPs summed over the run's steps."""
    cfg = module.encoder.config  # type: ignore[union-attr]
    layers, width = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    fwd = sum(t * linear_per_token + layers * 4 * t * L * width for t, L in zip(record.tokens, record.seq_len))
    saved = sum(t * sv for t, sv in zip(record.tokens, record.saved_per_token))
    return {"forward": float(fwd), "backward_full": 2.0 * fwd, "backward_saved": float(saved)}


def run_seed(s: Settings, seed: int, encoder: nn.Module, tokenizer: Any, data: tuple[list, list],
             tau: float | None, tau_mode: str) -> tuple[dict[str, Any], RunRecord, RunRecord]:
    print(f"seed {seed}: baseline ({s.steps} steps)", flush=True)
    base, module = train("baseline", s, seed, encoder, tokenizer, data, [], record_metrics=True)
    grace_steps = math.ceil(s.grace_fraction * s.steps)
    calibrated = tau is None
    tau_value = calibrate_tau(base.metrics, s.calibration_window) if calibrated else float(tau)  # type: ignore[arg-type]
    print(f"seed {seed}: GradES (tau {tau_value:.3e} {tau_mode}{', calibrated' if calibrated else ''})", flush=True)
    grades = GradES(tau=tau_value, grace_fraction=s.grace_fraction, metric=s.metric, tau_mode=tau_mode)  # type: ignore[arg-type]
    ges, _ = train("grades", s, seed, encoder, tokenizer, data, [grades], record_metrics=False)

    linear_per_token = sum(text_data.linear_flops_per_token(module).values())
    fb, fg = flops(base, module, linear_per_token), flops(ges, module, linear_per_token)
    acc_b, acc_g = base.validations[-1]["val_acc"], ges.validations[-1]["val_acc"]
    stop_step = len(ges.tokens)
    sensitivity = {}
    if tau_mode == "absolute":
        for f in TAU_FACTORS:
            first, last = predicted_freezes(base.metrics, f * tau_value, grace_steps)
            sensitivity[f"x{f:g}"] = {"tau": f * tau_value, "first_freeze_step": first, "all_frozen_step": last}
    # Until the first freeze the GradES run repeats the baseline: validations before it must agree.
    first_freeze = min(grades.frozen.values(), default=None)
    limit = first_freeze if first_freeze is not None else stop_step
    base_acc = {v["step"]: v["val_acc"] for v in base.validations}
    shared = [(base_acc[g["step"]], g["val_acc"]) for g in ges.validations
              if g["step"] <= limit and g["step"] in base_acc]
    out = {
        "seed": seed,
        "tau": tau_value,
        "tau_mode": tau_mode,
        "tau_calibrated": calibrated,
        "grace_steps": grace_steps,
        "baseline_val_acc": acc_b,
        "grades_val_acc": acc_g,
        "val_acc_diff_points": 100 * (acc_g - acc_b),
        "baseline_fit_s": base.fit_s,
        "grades_fit_s": ges.fit_s,
        "speedup": base.fit_s / ges.fit_s,
        "speedup_train_only": (base.fit_s - base.val_s) / (ges.fit_s - ges.val_s),
        "baseline_fit_cpu_s": base.fit_cpu_s,
        "grades_fit_cpu_s": ges.fit_cpu_s,
        "speedup_cpu_time": base.fit_cpu_s / ges.fit_cpu_s,
        "baseline_val_s": base.val_s,
        "grades_val_s": ges.val_s,
        "stop_step": stop_step,
        "stopped_early": stop_step < s.steps,
        "first_freeze_step": first_freeze,
        "frozen_fraction": len(grades.frozen) / len(grades.target_names),
        "backward_flops_saved_by_freezing": fg["backward_saved"] / fg["backward_full"],
        "backward_flops_saved_total": 1 - (fg["backward_full"] - fg["backward_saved"]) / fb["backward_full"],
        "train_flops_saved_total": 1 - (fg["forward"] + fg["backward_full"] - fg["backward_saved"])
        / (fb["forward"] + fb["backward_full"]),
        "baseline_train_flops": fb["forward"] + fb["backward_full"],
        "pre_freeze_validations_match": bool(shared) and all(abs(a - b) < 1e-9 for a, b in shared),
        "tau_sensitivity": sensitivity,
        "baseline_validations": base.validations,
        "grades_validations": ges.validations,
        "grades_frozen_count": ges.frozen_count,
        "matrices": len(grades.target_names),
    }
    return out, base, ges


# ---------------------------------------------------------------------------------------------- report


def aggregate(per_seed: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [float(r[key]) for r in per_seed]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def plot(runs: list[tuple[int, RunRecord, RunRecord]], planned: int, grace: int, matrices: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (seed, base, ges) in enumerate(runs):
        c = f"C{i}"
        for rec, style, label in ((base, "-", "baseline"), (ges, "--", "GradES")):
            ax1.plot([v["wall_s"] for v in rec.validations], [100 * v["val_acc"] for v in rec.validations], style,
                     marker="o", color=c, label=f"{label} seed {seed} ({rec.fit_s:.0f}s)")
        n = len(ges.frozen_count)
        frac = [k / matrices for k in [*ges.frozen_count, ges.final_frozen_count]]  # during each step, then at end
        ax2.step([*range(n), n], frac, where="post", color=c, label=f"seed {seed}: stopped at step {n}")
    ax1.set_xlabel("wall-clock since training start (s)")
    ax1.set_ylabel("validation accuracy (%)")
    ax1.set_title("MiniLM on VADER word polarity")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.axvline(grace, color="gray", ls=":", lw=1, label=f"grace period ends ({grace})")
    ax2.set_xlim(0, planned)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("optimizer step (of the planned)")
    ax2.set_ylabel("frozen fraction of the attention/FFN matrices")
    ax2.set_title("GradES: matrices frozen")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 120 steps")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 quick, 0,1 full)")
    parser.add_argument("--steps", type=int, default=None, help="planned optimizer steps (default: 120 / 640)")
    parser.add_argument("--tau", type=float, default=None, help="fixed tau instead of the calibration rule")
    parser.add_argument("--tau-mode", choices=["absolute", "relative"], default="absolute")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tau_mode == "relative" and args.tau is None:
        raise SystemExit("--tau-mode relative needs --tau (a fraction, e.g. 0.2)")
    s = QUICK if args.quick else FULL
    if args.seeds is not None:
        s = replace(s, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    s = replace(s, threads=args.threads)
    custom = args.seeds is not None or args.steps is not None or args.tau is not None
    suffix = ("_quick" if args.quick else "") + ("_custom" if custom else "")
    quiet()
    torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    tokenizer, encoder = text_data.load_minilm()
    data = text_data.vader_polarity_dataset(seed=s.split_seed)

    def line(name: str, value: Any) -> None:
        print(f"{name}: {value}", flush=True)

    line("settings", json.dumps(asdict(s)))
    line("data", f"{len(data[0])} train / {len(data[1])} val VADER entries")
    per_seed: list[dict[str, Any]] = []
    runs: list[tuple[int, RunRecord, RunRecord]] = []
    for seed in s.seeds:
        out, base, ges = run_seed(s, seed, encoder, tokenizer, data, args.tau, args.tau_mode)
        per_seed.append(out)
        runs.append((seed, base, ges))
        p = f"seed{seed}"
        line(f"{p}/tau", f"{out['tau']:.3e} ({out['tau_mode']}{', calibrated' if out['tau_calibrated'] else ''})")
        line(f"{p}/baseline_val_acc", f"{100 * out['baseline_val_acc']:.2f}")
        line(f"{p}/grades_val_acc", f"{100 * out['grades_val_acc']:.2f}")
        line(f"{p}/val_acc_diff_points", f"{out['val_acc_diff_points']:+.2f}")
        line(f"{p}/baseline_fit_s", f"{out['baseline_fit_s']:.1f}")
        line(f"{p}/grades_fit_s", f"{out['grades_fit_s']:.1f}")
        line(f"{p}/speedup", f"{out['speedup']:.2f}")
        line(f"{p}/speedup_train_only", f"{out['speedup_train_only']:.2f}")
        line(f"{p}/speedup_cpu_time", f"{out['speedup_cpu_time']:.2f} ({out['baseline_fit_cpu_s']:.1f}s / "
                                      f"{out['grades_fit_cpu_s']:.1f}s of process CPU time)")
        line(f"{p}/stop_step", f"{out['stop_step']} of {s.steps} (grace ends at {out['grace_steps']})")
        line(f"{p}/first_freeze_step", out["first_freeze_step"])
        line(f"{p}/frozen_fraction", f"{out['frozen_fraction']:.3f}")
        line(f"{p}/backward_flops_saved_by_freezing", f"{out['backward_flops_saved_by_freezing']:.3f}")
        line(f"{p}/backward_flops_saved_total", f"{out['backward_flops_saved_total']:.3f}")
        line(f"{p}/train_flops_saved_total", f"{out['train_flops_saved_total']:.3f}")
        line(f"{p}/pre_freeze_validations_match", out["pre_freeze_validations_match"])
        for k, v in out["tau_sensitivity"].items():
            line(f"{p}/tau_sensitivity_{k}", f"tau {v['tau']:.2e}: first freeze {v['first_freeze_step']}, "
                                             f"all frozen {v['all_frozen_step']} (predicted from the baseline)")

    keys = ("baseline_val_acc", "grades_val_acc", "val_acc_diff_points", "speedup", "speedup_train_only",
            "speedup_cpu_time",
            "baseline_fit_s", "grades_fit_s", "stop_step", "backward_flops_saved_by_freezing",
            "backward_flops_saved_total", "train_flops_saved_total", "tau")
    summary = {k: aggregate(per_seed, k) for k in keys}
    for k in keys:
        a = summary[k]
        scale = 100 if k.endswith("val_acc") else 1
        line(f"{k}_mean_min_max", f"{scale * a['mean']:.4g} / {scale * a['min']:.4g} / {scale * a['max']:.4g}")
    speed_pass = summary["speedup"]["mean"] >= SPEEDUP_TARGET
    acc_pass = summary["val_acc_diff_points"]["mean"] >= -ACC_TOLERANCE_POINTS
    line("target_speedup", f"{'PASS' if speed_pass else 'FAIL'} (mean {summary['speedup']['mean']:.2f}x, "
                           f">= {SPEEDUP_TARGET}x)")
    line("target_accuracy", f"{'PASS' if acc_pass else 'FAIL'} (mean diff {summary['val_acc_diff_points']['mean']:+.2f}"
                            f" points, >= -{ACC_TOLERANCE_POINTS})")
    within = sum(r["val_acc_diff_points"] >= -ACC_TOLERANCE_POINTS for r in per_seed)
    fast = sum(r["speedup"] >= SPEEDUP_TARGET for r in per_seed)
    line("seeds_meeting_targets", f"speed-up {fast}/{len(per_seed)}, accuracy {within}/{len(per_seed)}")
    total = time.perf_counter() - t_start
    line("benchmark_wall_s", f"{total:.0f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"grades{suffix}.png"
    plot(runs, s.steps, math.ceil(s.grace_fraction * s.steps), per_seed[0]["matrices"], png)
    report = {
        "settings": asdict(s), "per_seed": per_seed, "summary": summary,
        "targets": {"speedup": {"target": SPEEDUP_TARGET, "pass": speed_pass},
                    "accuracy": {"tolerance_points": ACC_TOLERANCE_POINTS, "pass": acc_pass}},
        "benchmark_wall_s": total,
        "environment": {"torch": torch.__version__, "lightning": pl.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "threads": s.threads},
    }
    path = RESULTS / f"grades{suffix}.json"
    path.write_text(json.dumps(report, indent=1))
    line("json", path.relative_to(REPO))
    line("png", png.relative_to(REPO))


if __name__ == "__main__":
    main()
