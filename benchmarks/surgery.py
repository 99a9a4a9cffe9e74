"""Gradient surgery benchmark: does a surgery method beat equal weighting, and what does the callback cost?

Part 1, quality. The multi-task problem of ``examples/multitask.py`` (two overlaid 8x8 digits from
scikit-learn's bundled ``load_digits``; tasks ``left`` and ``right`` digit classification and ``sum``
regression on a shared MLP trunk, Adam at the learning rate that was best for equal weighting), trained once
per method and seed with ``GradientSurgery(method)``: the baselines ``sum`` and ``mean`` (equal weighting) and
the surgery methods ``pcgrad``, ``cagrad``, ``sam_gs`` and ``gcond``. Same data, initial weights and batch
order for every method of a seed; the only differences are the aggregation and the per-method settings the
methods' authors prescribe (``multitask.method_settings``: SAM-GS clips the gradient norm to 1; GCond keeps
its own momentum, so Adam's first moment is off for it). Full mode adds one control per such setting, so a
gain can be attributed: ``sum+clip`` (equal weighting, clipped like SAM-GS) and ``gcond-no-resolve`` (GCond
with no pair ever treated as conflicting: the task sum through GCond's momentum and Adam without first
moment, i.e. everything GCond does except its conflict resolution). Reported per variant: every task's
validation score (accuracy, or R^2 for the regression) and the combined score (their mean), as mean,
standard deviation and min/max over seeds; the paired difference to ``sum`` on the same seed; the mean rank
over seeds x tasks among the six methods (1 = best) and the mean rank on the combined score; the mean
conflict rate (fraction of task pairs with a negative gradient inner product on the shared trunk).

Part 2, cost. For T = 2, 4, 8 synthetic but conflicting tasks on the same trunk (T heads over the overlaid
digits, task ``t`` classifies ``(a_t * left + b_t * right) mod 10`` for a different ``(a_t, b_t)``), on the same
model and the same batch, in one process, median step time over repeated steps after warm-up of:

(a) ``plain``: Lightning's own step, ``loss = sum of task losses``, one backward;
(b) each method through ``GradientSurgery``: T ``autograd.grad`` calls, flatten, conflict metrics, aggregate,
    write back, ``log_dict`` of T + 2 scalars;
(c) ``bare``: the same Lightning step whose backward is a bare loop of T ``torch.autograd.grad`` calls adding
    into ``.grad`` (the minimum any per-task method needs; nothing else).

All three are full Lightning training steps (``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward, SGD step), so Lightning's fixed per-step cost is in every figure. To attribute the difference
(b) - (c), also reported: ``bare+log`` (the bare loop plus a ``log_dict`` of as many scalars as the callback
logs, at the same hook), the callback's metrics and each method's aggregation timed alone on the real task
gradients, and the loops without Lightning (forward + one backward; forward + T ``autograd.grad``). The
configurations run in rounds, interleaved, so load from other processes hits all of them alike. Two trunk
widths at batch 256: the example's (64: 10k shared parameters, where fixed per-step costs dominate) and a
wider one (512: 311k shared parameters, where the backward passes and the aggregation's memory traffic do).

Targets (PASS/FAIL lines): at least one surgery method's mean combined score is above both ``sum``'s and
``mean``'s (read it with the paired margin and its spread: is it more than seed noise?); the callback's step
is below 1.2x the bare loop, for every T, method and width.

Threads: one intra-op thread (``--threads``): the models are small and the machine is shared.

Run::

    python benchmarks/surgery.py --quick     # 1 seed, short training, 1 timing round (about 2 minutes on 2 cores)
    nohup python benchmarks/surgery.py > benchmarks/results/surgery_full.log 2>&1 &   # 3 seeds (about 12 min)
    nice -n 10 python benchmarks/surgery.py --skip-quality --widths 512 --rounds 5 --clock cpu   # cost only

Prints ``name: value`` lines, writes ``benchmarks/results/surgery.json`` (``surgery_quick.json`` with
``--quick``, ``surgery_cost.json`` with ``--skip-quality``) and the matching ``.png``: the combined score per
method and seed, and the step time relative to plain training against T.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "examples"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import lightning.pytorch as pl  # noqa: E402
import multitask as MT  # noqa: E402  (examples/multitask.py)
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_optx import GradientSurgery  # noqa: E402
from lightning_optx.functional import surgery as S  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BASELINES = ("sum", "mean")
SURGERY = ("pcgrad", "cagrad", "sam_gs", "gcond")
METHODS = BASELINES + SURGERY
CONTROLS = ("sum+clip", "gcond-no-resolve")
RATIO_TARGET = 1.2
# GCond with no pair ever counted as conflicting: the sum of the task gradients through GCond's momentum (and
# Adam without first moment), i.e. everything GCond does except the conflict resolution: its control.
NO_RESOLUTION = {"conflict_thresholds": (-1.0, -1.0, -1.0)}
# task t of the timing part classifies (a * left + b * right) mod 10
MAPPINGS = ((1, 0), (0, 1), (1, 1), (1, 9), (2, 1), (1, 2), (3, 1), (1, 3))


@dataclass(frozen=True)
class Settings:
    """Budgets of one invocation."""

    seeds: tuple[int, ...]
    epochs: int
    train_pairs: int
    val_pairs: int
    task_counts: tuple[int, ...]
    widths: tuple[int, ...]
    timing_batch: int
    warmup_steps: int
    timed_steps: int
    rounds: int
    controls: bool  # also run the baseline with each method's extra settings


QUICK = Settings(seeds=(0,), epochs=4, train_pairs=2000, val_pairs=1000, task_counts=(2, 4, 8), widths=(64, 512),
                 timing_batch=256, warmup_steps=3, timed_steps=8, rounds=1, controls=False)
FULL = Settings(seeds=(0, 1, 2), epochs=MT.DEFAULTS["epochs"], train_pairs=MT.DEFAULTS["train_pairs"],
                val_pairs=MT.DEFAULTS["val_pairs"], task_counts=(2, 4, 8), widths=(64, 512), timing_batch=256,
                warmup_steps=3, timed_steps=12, rounds=3, controls=True)


def line(name: str, value: Any) -> None:
    print(f"{name}: {value}", flush=True)


def _stats(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one value), min and max."""
    vals = [float(v) for v in values]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def _fmt(s: dict[str, float], digits: int = 4) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f})"


# ---------------------------------------------------------------------------------------------- part 1: quality


def task_scores(result: MT.RunResult, tasks: Sequence[MT.Task]) -> dict[str, float]:
    """Each task's score in [0, 1] (higher is better): accuracy, or R^2 clipped at 0."""
    return {t.name: result.metrics[f"val/{t.name}/acc"] if t.kind == "class"
            else max(result.metrics[f"val/{t.name}/r2"], 0.0) for t in tasks}


def average_ranks(values: dict[str, float]) -> dict[str, float]:
    """Rank 1 for the highest value; ties share the mean of their ranks."""
    ordered = sorted(values, key=lambda k: -values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i: j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def quality_runs(settings: Settings) -> tuple[list[MT.Task], dict[str, list[dict[str, Any]]]]:
    """Train every method (and the controls) on every seed; return per-run records keyed by variant name."""
    variants: list[tuple[str, str, dict[str, Any]]] = [(m, m, MT.method_settings(m)) for m in METHODS]
    if settings.controls:
        variants += [(CONTROLS[0], "sum", {**MT.method_settings("sum"), "gradient_clip_val": MT.SAM_GS_CLIP}),
                     (CONTROLS[1], "gcond", {**MT.method_settings("gcond"), "options": NO_RESOLUTION})]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    tasks: list[MT.Task] = []
    for seed in settings.seeds:
        data = MT.build_data(MT.DEFAULTS["tasks"].split(","), settings.train_pairs, settings.val_pairs, seed=seed)
        tasks = data.tasks
        for name, method, cfg in variants:
            r = MT.train(data, method, cfg["options"], epochs=settings.epochs, batch_size=MT.DEFAULTS["batch_size"],
                         lr=MT.DEFAULTS["lr"], hidden=MT.DEFAULTS["hidden"], depth=MT.DEFAULTS["depth"], seed=seed,
                         gradient_clip_val=cfg["gradient_clip_val"], adam_beta1=cfg["adam_beta1"])
            scores = task_scores(r, tasks)
            runs[name].append({"seed": seed, "scores": scores, "combined": r.combined, "metrics": r.metrics,
                               "conflict_rate_mean": r.conflict_rate_mean, "steps": r.steps, "fit_s": r.fit_s})
            line(f"run {name} seed {seed}", f"combined {r.combined:.4f} "
                 + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
                 + f" conflict_rate {r.conflict_rate_mean:.3f} ({r.fit_s:.1f} s)")
    return tasks, runs


def summarize_quality(tasks: Sequence[MT.Task], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: score statistics, paired difference to ``sum``, mean ranks (over the main methods)."""
    names = [t.name for t in tasks]
    n_seeds = len(runs["sum"])
    task_ranks: dict[str, list[float]] = {m: [] for m in METHODS}
    combined_ranks: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(n_seeds):
        for task in names:
            for m, r in average_ranks({m: runs[m][i]["scores"][task] for m in METHODS}).items():
                task_ranks[m].append(r)
        for m, r in average_ranks({m: runs[m][i]["combined"] for m in METHODS}).items():
            combined_ranks[m].append(r)
    summary: dict[str, Any] = {}
    for variant, rs in runs.items():
        diffs = [r["combined"] - b["combined"] for r, b in zip(rs, runs["sum"])]
        summary[variant] = {
            "combined": _stats([r["combined"] for r in rs]),
            "tasks": {t: _stats([r["scores"][t] for r in rs]) for t in names},
            "conflict_rate_mean": _stats([r["conflict_rate_mean"] for r in rs]),
            "combined_minus_sum": _stats(diffs),
            "seeds_above_sum": sum(d > 0 for d in diffs),
            "mean_rank_tasks": statistics.fmean(task_ranks[variant]) if variant in task_ranks else None,
            "mean_rank_combined": statistics.fmean(combined_ranks[variant]) if variant in combined_ranks else None,
        }
    return summary


def quality_target(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Is any surgery method's mean combined score above both baselines'? With the paired margin of the best."""
    best_baseline = max(BASELINES, key=lambda m: summary[m]["combined"]["mean"])
    baseline_value = summary[best_baseline]["combined"]["mean"]
    best = max(SURGERY, key=lambda m: summary[m]["combined"]["mean"])
    winners = [m for m in SURGERY if summary[m]["combined"]["mean"] > baseline_value]
    paired = [r["combined"] - b["combined"] for r, b in zip(runs[best], runs[best_baseline])]
    return {"best_baseline": best_baseline, "best_baseline_combined": baseline_value, "best_surgery": best,
            "best_surgery_combined": summary[best]["combined"]["mean"], "methods_above_both_baselines": winners,
            "best_surgery_minus_best_baseline": _stats(paired),
            "seeds_best_surgery_above_best_baseline": sum(d > 0 for d in paired), "pass": bool(winners)}


def report_quality(tasks: Sequence[MT.Task], summary: dict[str, Any], target: dict[str, Any]) -> None:
    for variant, s in summary.items():
        line(f"{variant} combined", _fmt(s["combined"]))
        for t in tasks:
            what = "acc" if t.kind == "class" else "r2"
            line(f"{variant} {t.name}_{what}", _fmt(s["tasks"][t.name]))
        line(f"{variant} combined_minus_sum (paired)", _fmt(s["combined_minus_sum"])
             + f", above sum on {s['seeds_above_sum']}/{s['combined']['n']} seeds")
        if s["mean_rank_tasks"] is not None:
            line(f"{variant} mean_rank (tasks x seeds, 1 = best of {len(METHODS)})", f"{s['mean_rank_tasks']:.2f}")
            line(f"{variant} mean_rank_combined", f"{s['mean_rank_combined']:.2f}")
        line(f"{variant} conflict_rate_mean", _fmt(s["conflict_rate_mean"], 3))
    line("best baseline", f"{target['best_baseline']} {target['best_baseline_combined']:.4f}")
    line("best surgery method", f"{target['best_surgery']} {target['best_surgery_combined']:.4f}")
    paired = target["best_surgery_minus_best_baseline"]
    line("best surgery minus best baseline (paired, combined)", _fmt(paired)
         + f", above on {target['seeds_best_surgery_above_best_baseline']}/{paired['n']} seeds")
    line("surgery methods above both baselines (mean combined)", ", ".join(target["methods_above_both_baselines"])
         or "none")
    line("target surgery beats equal weighting", "PASS" if target["pass"] else "FAIL")


# ---------------------------------------------------------------------------------------------- part 2: cost


def timing_batch(num_tasks: int, batch_size: int, seed: int = 0) -> tuple[Tensor, Tensor, list[MT.Task]]:
    """One batch of overlaid digits and ``num_tasks`` 10-class targets ``(a_t * left + b_t * right) mod 10``."""
    if num_tasks > len(MAPPINGS):
        raise ValueError(f"at most {len(MAPPINGS)} timing tasks, got {num_tasks}")
    data = MT.build_data(("left", "right"), train_pairs=batch_size, val_pairs=2, seed=seed)
    left, right = data.y_train[:, 0].long(), data.y_train[:, 1].long()
    y = torch.stack([(a * left + b * right) % 10 for a, b in MAPPINGS[:num_tasks]], dim=1).float()
    tasks = [MT.Task(f"t{i}", "class", 10) for i in range(num_tasks)]
    return data.x_train, y, tasks


class TimingModule(pl.LightningModule):
    """The example's network on a fixed batch, SGD; ``training_step`` honours the surgery contract, logs nothing."""

    def __init__(self, x: Tensor, y: Tensor, tasks: Sequence[MT.Task], hidden: int, steps: int) -> None:
        super().__init__()
        self.x, self.y, self.tasks, self.steps = x, y, list(tasks), steps
        self.net = MT.MultiTaskNet(x.shape[1], self.tasks, hidden, MT.DEFAULTS["depth"])

    def task_losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = self.net(x)
        return {t.name: MT.task_loss(t, out[t.name], y[:, i]) for i, t in enumerate(self.tasks)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        losses = self.task_losses(*batch)
        return {"loss": torch.stack(list(losses.values())).sum(), "task_losses": losses}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([(self.x, self.y)] * self.steps, batch_size=None)


# What the cost part times with: wall clock (default) or, with ``--clock cpu``, this process's CPU time. On a
# machine shared with other jobs the wall clock mostly measures waiting for a core; with one intra-op thread
# the process's CPU time measures the work itself (side-by-side ratios stay comparable either way).
_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock_name = "wall"


def clock() -> float:
    return _CLOCKS[_clock_name]()


class StepTimer(Callback):
    """Time of every training step (see :func:`clock`), ``on_train_batch_start`` to ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = clock()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(clock() - self._t0)


class BareTaskGrads(Callback):
    """Replaces ``backward`` by a bare loop of T ``torch.autograd.grad`` calls adding into ``.grad``: the floor.

    With ``log=True`` it also logs as many scalars per step as ``GradientSurgery`` does (T + 2), with the
    same ``log_dict`` call and at the same hook, to show what Lightning's logging alone costs.
    """

    def __init__(self, log: bool = False) -> None:
        self.log_scalars = log  # not ``self.log``: Lightning sets ``callback.log`` to the module's ``log``
        self._num_tasks = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = pl_module.training_step
        captured: dict[str, Any] = {}
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = step(*args, **kwargs)
            captured["losses"] = list(output["task_losses"].values())
            return output

        def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            losses = captured.pop("losses")
            self._num_tasks = len(losses)
            for i, task_loss in enumerate(losses):
                grads = torch.autograd.grad(task_loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        pl_module.backward = backward  # type: ignore[method-assign]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.log_scalars:
            pl_module.log_dict({f"bare/{i}": float(i) for i in range(self._num_tasks + 2)}, on_step=True,
                               on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.__dict__.pop("training_step", None)
        pl_module.__dict__.pop("backward", None)


def _config_callbacks(config: str) -> list[Callback]:
    if config == "plain":
        return []
    if config in ("bare", "bare+log"):
        return [BareTaskGrads(log=config == "bare+log")]
    return [GradientSurgery(config, **MT.method_settings(config)["options"])]


def lightning_step_times(config: str, batch: tuple[Tensor, Tensor, list[MT.Task]], hidden: int,
                         settings: Settings) -> list[float]:
    """Times of the timed steps (after warm-up) of one short ``fit`` with configuration ``config``."""
    x, y, tasks = batch
    steps = settings.warmup_steps + settings.timed_steps
    torch.manual_seed(0)
    module = TimingModule(x, y, tasks, hidden, steps)
    timer = StepTimer()
    clip = MT.method_settings(config)["gradient_clip_val"] if config in METHODS else None
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=clip,
                         callbacks=[*_config_callbacks(config), timer])
    trainer.fit(module)
    return timer.times[settings.warmup_steps:]


def torch_step_times(kind: str, batch: tuple[Tensor, Tensor, list[MT.Task]], hidden: int,
                     settings: Settings) -> list[float]:
    """Without Lightning: forward + one backward of the summed loss, or forward + T ``autograd.grad`` (``bare``)."""
    x, y, tasks = batch
    torch.manual_seed(0)
    module = TimingModule(x, y, tasks, hidden, 1)
    params = [p for p in module.parameters() if p.requires_grad]
    times = []
    for _ in range(settings.warmup_steps + settings.timed_steps):
        t0 = clock()
        losses = list(module.task_losses(x, y).values())
        if kind == "plain":
            torch.stack(losses).sum().backward()
        else:
            for i, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        times.append(clock() - t0)
        module.zero_grad(set_to_none=True)
    return times[settings.warmup_steps:]


def aggregation_times(batch: tuple[Tensor, Tensor, list[MT.Task]], hidden: int,
                      settings: Settings) -> dict[str, float]:
    """Median ms of the callback's work between the backward passes, measured alone on the real task gradients.

    ``metrics``: the norms and the conflict rate it logs every step; ``<method>``: the method's aggregation of
    the ``(T, n_shared)`` gradients (``lightning_optx.functional.surgery``), with its state carried over steps.
    """
    x, y, tasks = batch
    torch.manual_seed(0)
    module = TimingModule(x, y, tasks, hidden, 1)
    shared = list(module.net.trunk.parameters())
    losses = list(module.task_losses(x, y).values())
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                         for loss in losses])
    reps = settings.warmup_steps + settings.timed_steps

    def median_ms(fn: Callable[[int], Any]) -> float:
        times = []
        for step in range(reps):
            t0 = clock()
            fn(step)
            times.append(clock() - t0)
        return 1000 * statistics.median(times[settings.warmup_steps:])

    out = {"metrics": median_ms(lambda _: (S.task_norms(grads).tolist(), float(S.conflict_rate(grads))))}
    for method in METHODS:
        aggregator = S.make_aggregator(method, **MT.method_settings(method)["options"])
        out[method] = median_ms(lambda step, agg=aggregator: agg(grads, step))  # type: ignore[misc]
    out["n_shared"] = float(grads.shape[1])
    return out


def timing(settings: Settings) -> dict[str, Any]:
    """Median step times (ms) per width, T and configuration, with ratios to plain and to the bare loop."""
    configs = ("plain", "bare", "bare+log", *METHODS)
    out: dict[str, Any] = {}
    for hidden in settings.widths:
        per_t: dict[str, Any] = {}
        for num_tasks in settings.task_counts:
            batch = timing_batch(num_tasks, settings.timing_batch)
            samples: dict[str, list[float]] = {c: [] for c in (*configs, "torch_plain", "torch_bare")}
            for _ in range(settings.rounds):  # interleaved: drifting load hits every configuration alike
                for config in configs:
                    samples[config] += lightning_step_times(config, batch, hidden, settings)
                for kind in ("plain", "bare"):
                    samples[f"torch_{kind}"] += torch_step_times(kind, batch, hidden, settings)
            median = {c: 1000 * statistics.median(v) for c, v in samples.items()}
            per_t[str(num_tasks)] = {
                "median_ms": median,
                "alone_ms": aggregation_times(batch, hidden, settings),
                "relative_to_plain": {c: median[c] / median["plain"] for c in configs},
                "ours_over_bare": {m: median[m] / median["bare"] for m in METHODS},
                "ours_minus_bare_ms": {m: median[m] - median["bare"] for m in METHODS},
                "steps_timed": len(samples["plain"]),
            }
            report_timing_row(hidden, num_tasks, per_t[str(num_tasks)])
        params = sum(p.numel() for p in MT.MultiTaskNet(96, [MT.Task("t", "class", 10)], hidden).trunk.parameters())
        out[str(hidden)] = {"trunk_params": params, "tasks": per_t}
    worst = max(r for w in out.values() for t in w["tasks"].values() for r in t["ours_over_bare"].values())
    out["worst_ours_over_bare"] = worst
    out["pass"] = worst < RATIO_TARGET
    return out


def report_timing_row(hidden: int, num_tasks: int, row: dict[str, Any]) -> None:
    m = row["median_ms"]
    prefix = f"width {hidden} T {num_tasks}"
    line(f"{prefix} plain_ms", f"{m['plain']:.2f}")
    line(f"{prefix} bare_ms", f"{m['bare']:.2f} ({row['relative_to_plain']['bare']:.2f}x plain)")
    line(f"{prefix} bare+log_ms", f"{m['bare+log']:.2f} (+{m['bare+log'] - m['bare']:.2f} ms: logging T + 2 scalars)")
    line(f"{prefix} torch_only plain_ms / bare_ms", f"{m['torch_plain']:.2f} / {m['torch_bare']:.2f}")
    alone = row["alone_ms"]
    line(f"{prefix} alone metrics_ms (norms + conflict rate)", f"{alone['metrics']:.2f}")
    for method in METHODS:
        line(f"{prefix} {method}_ms", f"{m[method]:.2f} ({row['relative_to_plain'][method]:.2f}x plain, "
             f"{row['ours_over_bare'][method]:.3f}x bare, {row['ours_minus_bare_ms'][method]:+.2f} ms; "
             f"aggregation alone {alone[method]:.2f} ms)")


# ---------------------------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int("quality" in report) + 2 * int("timing" in report)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    ax_iter = iter(axes[0])
    if "quality" in report:
        _plot_quality(next(ax_iter), report["quality"])
    if "timing" in report:
        _plot_timing(next(ax_iter), next(ax_iter), report["timing"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_quality(ax: Any, quality: dict[str, Any]) -> None:
    variants = list(quality["summary"])
    for i, v in enumerate(variants):
        vals = [r["combined"] for r in quality["runs"][v]]
        s = quality["summary"][v]["combined"]
        color = "tab:gray" if v in BASELINES else "tab:orange" if v in CONTROLS else "tab:blue"
        ax.bar(i, s["mean"], color=color, alpha=0.5, yerr=s["std"] if s["n"] > 1 else None, capsize=3)
        ax.plot([i] * len(vals), vals, "k.", ms=4)
    lo = min(r["combined"] for rs in quality["runs"].values() for r in rs)
    ax.set_ylim(lo - 0.05, min(1.0, max(r["combined"] for rs in quality["runs"].values() for r in rs) + 0.03))
    ax.set_xticks(range(len(variants)), variants, rotation=35, ha="right")
    ax.set_ylabel("combined validation score")
    ax.set_title("overlaid digits: left, right, sum (bars: mean, dots: seeds)", fontsize=9)


def _plot_timing(ax_rel: Any, ax_ratio: Any, timing_report: dict[str, Any]) -> None:
    styles = {"64": "--", "512": "-"}
    for width, w in timing_report.items():
        if not isinstance(w, dict):
            continue
        ts = sorted(int(t) for t in w["tasks"])
        style = styles.get(width, "-")
        for j, config in enumerate(("bare", *METHODS)):
            rel = [w["tasks"][str(t)]["relative_to_plain"][config] for t in ts]
            ax_rel.plot(ts, rel, style, marker="o", color=f"C{j}", label=config if width == "512" else None)
        for j, method in enumerate(METHODS, start=1):
            ratio = [w["tasks"][str(t)]["ours_over_bare"][method] for t in ts]
            ax_ratio.plot(ts, ratio, style, marker="o", color=f"C{j}", label=method if width == "512" else None)
    ax_rel.set_xlabel("tasks T")
    ax_rel.set_ylabel("step time / plain step")
    ax_rel.set_title("step time relative to plain (solid: width 512, dashed: 64)", fontsize=9)
    ax_rel.legend(fontsize=7)
    ax_ratio.axhline(RATIO_TARGET, color="red", lw=0.8, ls=":", label="target 1.2")
    ax_ratio.set_xlabel("tasks T")
    ax_ratio.set_ylabel("callback step / bare loop of T autograd.grad")
    ax_ratio.set_title("overhead over the T backward passes", fontsize=9)
    ax_ratio.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short training, 1 timing round")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 quick, 0,1,2 full)")
    parser.add_argument("--skip-quality", action="store_true", help="only the cost part")
    parser.add_argument("--skip-timing", action="store_true", help="only the quality part")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--widths", default=None, help="cost part trunk widths, comma-separated (default 64,512)")
    parser.add_argument("--clock", choices=tuple(_CLOCKS), default="wall",
                        help="time steps by wall clock or by this process's CPU time (for a shared machine)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 1 quick, 3 full)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.seeds:
        settings = Settings(**{**asdict(settings), "seeds": tuple(int(s) for s in args.seeds.split(","))})
    if args.widths:
        settings = Settings(**{**asdict(settings), "widths": tuple(int(w) for w in args.widths.split(","))})
    if args.rounds:
        settings = Settings(**{**asdict(settings), "rounds": args.rounds})
    torch.set_num_threads(args.threads)
    global _clock_name
    _clock_name = args.clock
    MT.quiet()
    # a cost-only run writes surgery_cost*.json / .png, leaving the full report (quality + cost) alone
    suffix = ("_cost" if args.skip_quality else "") + ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "settings": asdict(settings),
        "example_defaults": MT.DEFAULTS,
        "method_settings": {m: MT.method_settings(m) for m in METHODS},
        "clock": args.clock,
        "env": {"torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    line("mode", report["mode"])
    line("threads", torch.get_num_threads())
    line("clock", args.clock)
    _run_part("quality", not args.skip_quality, report, lambda: _quality_part(settings))
    _run_part("timing", not args.skip_timing, report, lambda: _timing_part(settings))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    png = RESULTS / f"surgery{suffix}.png"
    plot(report, png)
    path = RESULTS / f"surgery{suffix}.json"
    path.write_text(json.dumps(report, indent=1))
    line("wall_s", report["wall_s"])
    line("plot", png.relative_to(REPO))
    line("json", path.relative_to(REPO))


def _run_part(name: str, enabled: bool, report: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    if enabled:
        t0 = time.perf_counter()
        report[name] = fn()
        report[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        line(f"{name}_wall_s", report[name]["wall_s"])


def _quality_part(settings: Settings) -> dict[str, Any]:
    d = MT.DEFAULTS
    line("quality task", f"overlaid digits ({d['tasks']}), MLP trunk {d['depth']}x{d['hidden']}, Adam lr {d['lr']}, "
         f"batch {d['batch_size']}, {settings.train_pairs} train / {settings.val_pairs} val pairs, "
         f"{settings.epochs} epochs, seeds {list(settings.seeds)}")
    tasks, runs = quality_runs(settings)
    summary = summarize_quality(tasks, runs)
    target = quality_target(summary, runs)
    report_quality(tasks, summary, target)
    return {"runs": runs, "summary": summary, "target": target}


def _timing_part(settings: Settings) -> dict[str, Any]:
    line("timing model", f"example trunk {MT.DEFAULTS['depth']} layers, widths {list(settings.widths)}, "
         f"batch {settings.timing_batch}, SGD; {settings.rounds} round(s) x {settings.timed_steps} timed steps "
         f"after {settings.warmup_steps} warm-up, median")
    result = timing(settings)
    line("worst ours_over_bare", f"{result['worst_ours_over_bare']:.3f}")
    line(f"target callback step < {RATIO_TARGET}x bare loop", "PASS" if result["pass"] else "FAIL")
    return result


if __name__ == "__main__":
    main()
