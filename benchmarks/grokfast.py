"""Grokfast benchmark: how much sooner does the model grok, and what does the filter cost per step?

Part 1 (speed-up). One invocation trains the modular-addition transformer of ``examples/grokking.py``
(``a + b mod 97``, 50% train split, same seed, same initial weights, same batches, same optimizer for
every run) through a Lightning ``Trainer`` three times: baseline (no filter), ``Grokfast(filter="ema")``
and ``Grokfast(filter="ma")``. Validation runs every ``val_every`` steps on the whole held-out half; a run
stops at the first validation with accuracy >= 95% or at the step budget. It reports the steps to 95% and
the ratios baseline/EMA and baseline/MA; a run that does not reach 95% within the budget is reported as
such, and a ratio that involves it is a bound (``>=`` when the baseline did not get there).

Part 2 (overhead). A ~10M-parameter transformer language model on synthetic tokens, all CPU threads:

* plain torch loop: median step time (forward, backward, AdamW step) without a filter, and the median
  time of the filter alone (between ``backward`` and ``optimizer.step``) for our fused ``torch._foreach``
  EMA and MA filters and for straightforward per-parameter references written like the authors'
  ``gradfilter_ema`` (a Python loop that allocates new tensors) and ``gradfilter_ma`` (a deque of
  gradients summed every step);
* Lightning: median step time with no callback, and the median time spent in ``Grokfast``'s
  ``on_before_optimizer_step`` hook (everything the callback does: finiteness check, filter, logging of the
  slow-gradient norm), measured with timing callbacks placed just before and after it.

Overheads are given in percent of the plain step. MA filters are timed with a full window (the gradients
are amplified), after the window has been filled.

Run::

    python benchmarks/grokfast.py --quick   # a fast look (about 2 minutes on 2 CPU cores)
    python benchmarks/grokfast.py           # the real figures (see FULL below for the budget)

Prints ``name: value`` lines and writes ``benchmarks/results/grokfast.json`` (``grokfast_quick.json``
with ``--quick``) and ``benchmarks/results/grokfast.png`` (``grokfast_quick.png``): validation accuracy
against step for the three runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "examples"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grokking as G  # noqa: E402  (examples/grokking.py)
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_optx import Grokfast  # noqa: E402
from lightning_optx.functional import grokfast as GF  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

# Same optimizer for all three runs: the example's defaults, i.e. the paper's code for Grokfast-EMA
# (torch.optim.Adam, lr 1e-3, betas (0.9, 0.98), weight decay 0.005 as an L2 term; minibatch 512; 10
# warm-up steps). The paper's baseline used weight decay 0; here the baseline gets the same optimizer.
TASK = {k: G.DEFAULTS[k] for k in ("p", "train_fraction", "optimizer", "lr", "weight_decay", "batch_size", "seed")}
EMA = dict(alpha=0.98, lamb=2.0)
MA = dict(window_size=100, lamb=5.0)

# The overhead model: ~10.5M parameters; 8 x 64 = 512 tokens per step keeps a step around half a second on
# 2 CPU cores (a smaller step than most real ones, so the overhead percentages are on the high side).
LM = dict(vocab=8192, dim=256, layers=8, heads=4, seq=64, batch=8)

FULL = dict(
    budget=15_000,  # optimizer steps per grokking run at most (the baseline needs ~5,000)
    val_every=10,
    lm=LM,
    warmup_steps=5,
    timed_steps=30,
    ma_window=100,
)
QUICK = dict(
    budget=500,
    val_every=50,
    lm=LM,
    warmup_steps=2,
    timed_steps=5,
    ma_window=10,
)


# ================================================================================== part 1: speed-up


def grokking_speedup(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[G.RunResult]]:
    runs = [
        ("baseline", []),
        ("ema", [Grokfast(filter="ema", **EMA)]),
        ("ma", [Grokfast(filter="ma", **MA)]),
    ]
    results: list[G.RunResult] = []
    out: dict[str, Any] = {}
    for name, callbacks in runs:
        print(f"grokking run: {name}", flush=True)
        res = G.train_run(
            name,
            callbacks,
            steps=cfg["budget"],
            val_every=cfg["val_every"],
            stop_at_threshold=True,
            out_dir=None,
            print_every=max(cfg["val_every"], cfg["budget"] // 5 // cfg["val_every"] * cfg["val_every"]),
            **TASK,
        )
        results.append(res)
        out[name] = {
            "steps_to_95": res.reached_step,
            "reached": res.reached_step is not None,
            "steps_run": res.steps,
            "wall_s": round(res.wall_s, 1),
            "ms_per_step": round(1000 * res.wall_s / max(res.steps, 1), 2),
            "final_train_acc": res.history[-1]["train_acc"] if res.history else None,
            "final_val_acc": res.history[-1]["val_acc"] if res.history else None,
            "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                        for h in res.history],
        }
    for name in ("ema", "ma"):
        out[f"ratio_baseline_over_{name}"] = _ratio(out["baseline"], out[name], cfg["budget"])
    return out, results


def _ratio(base: dict[str, Any], other: dict[str, Any], budget: int) -> dict[str, Any]:
    """baseline steps / filtered steps; a bound when a run did not reach 95% within the budget."""
    if other["reached"] and base["reached"]:
        return {"value": base["steps_to_95"] / other["steps_to_95"], "kind": "exact"}
    if other["reached"]:  # baseline needs more than the budget
        return {"value": budget / other["steps_to_95"], "kind": "lower_bound"}
    if base["reached"]:  # the filtered run needs more than the budget
        return {"value": base["steps_to_95"] / budget, "kind": "upper_bound"}
    return {"value": None, "kind": "unknown"}


def _fmt_ratio(r: dict[str, Any]) -> str:
    if r["value"] is None:
        return "n/a (neither run reached 95% within the budget)"
    sign = {"exact": "", "lower_bound": ">= ", "upper_bound": "<= "}[r["kind"]]
    note = {"exact": "", "lower_bound": " (baseline did not reach 95% within the budget: lower bound)",
            "upper_bound": " (filtered run did not reach 95% within the budget: upper bound)"}[r["kind"]]
    return f"{sign}{r['value']:.1f}x{note}"


# ======================================================================= part 1b: as the authors ran it

# The Grokfast paper's headline (Lee et al. 2024, Table / README): x * y mod 97, the authors' transformer and
# Adam (lr 1e-3, betas (0.9, 0.98), L2 weight decay in the optimizer, minibatch 512, 50% train split). Their
# README runs the baseline with weight decay 0 and the filtered runs with weight decay 0.005 (EMA, alpha 0.98,
# lamb 2) and 0.01 (MA, window 100, lamb 5): 39,890 steps -> 910 (EMA, x43.8) and 790 (MA, x50.5). The
# baselines with the filtered runs' own weight decay are the same-optimizer (fair) comparison.
PAPER_RUNS: list[tuple[str, str, float]] = [  # (name, filter, weight decay); the ~40k-step run last
    ("ema_wd0.005", "ema", 0.005),
    ("ma_wd0.01", "ma", 0.01),
    ("baseline_wd0.005", "none", 0.005),
    ("baseline_wd0.01", "none", 0.01),
    ("baseline_wd0", "none", 0.0),
]
PAPER = dict(budget=60_000, val_every=100)
PAPER_FIGURES = {"baseline_wd0": 39890, "ema_wd0.005": 910, "ma_wd0.01": 790}


def paper_runs(cfg: dict[str, Any], on_result: Any, only: set[str] | None = None,
               done: dict[str, Any] | None = None) -> dict[str, Any]:
    """The runs of ``PAPER_RUNS`` on ``x * y mod 97`` (those named in ``only``, default all), added to the earlier
    results ``done``; ``on_result(out)`` after each run (partial saves)."""
    out: dict[str, Any] = {k: v for k, v in (done or {}).items() if not k.startswith("ratio_")}
    task = {**TASK, "operation": "mul"}
    for name, filter_name, weight_decay in PAPER_RUNS:
        if only is not None and name not in only:
            continue
        print(f"paper run: {name}", flush=True)
        options = EMA if filter_name == "ema" else MA
        callbacks = [] if filter_name == "none" else [Grokfast(filter=filter_name, **options)]
        res = G.train_run(
            name, callbacks, steps=cfg["budget"], val_every=cfg["val_every"], stop_at_threshold=True,
            out_dir=None, print_every=cfg["val_every"] * 20, **{**task, "weight_decay": weight_decay},
        )
        out[name] = {
            "filter": filter_name,
            "weight_decay": weight_decay,
            "steps_to_95": res.reached_step,
            "reached": res.reached_step is not None,
            "steps_run": res.steps,
            "budget": cfg["budget"],
            "wall_s": round(res.wall_s, 1),
            "paper_steps_to_95": PAPER_FIGURES.get(name),
            "history": [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()} for h in res.history],
        }
        on_result(out)
    for filtered, as_paper, fair in (("ema_wd0.005", "baseline_wd0", "baseline_wd0.005"),
                                     ("ma_wd0.01", "baseline_wd0", "baseline_wd0.01")):
        for base in (as_paper, fair):
            if base in out and filtered in out:
                out[f"ratio_{base}_over_{filtered}"] = _ratio(out[base], out[filtered], out[base]["steps_run"])
    return out


# ================================================================================== part 2: overhead


class TinyLM(nn.Module):
    """Pre-LN transformer language model on token ids; about 10.5M parameters at the default size."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))

    def loss(self, x: Tensor) -> Tensor:
        logits = self(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _lm_batch(lm: dict[str, int], gen: torch.Generator) -> Tensor:
    return torch.randint(0, lm["vocab"], (lm["batch"], lm["seq"] + 1), generator=gen)


def ref_ema(model: nn.Module, grads: dict[str, Tensor] | None, alpha: float, lamb: float) -> dict[str, Tensor]:
    """Per-parameter Python-loop EMA filter, written like the authors' ``gradfilter_ema``."""
    if grads is None:
        grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n] = grads[n] * alpha + p.grad.detach() * (1 - alpha)
            p.grad = p.grad + grads[n] * lamb
    return grads


def ref_ma(model: nn.Module, grads: dict[str, deque] | None, window_size: int, lamb: float) -> dict[str, deque]:
    """Deque-of-gradients MA filter (mean of the window, warm-up), like the authors' ``gradfilter_ma``."""
    if grads is None:
        grads = {n: deque(maxlen=window_size) for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n].append(p.grad.detach())
            if len(grads[n]) == window_size:
                avg = sum(grads[n]) / len(grads[n])
                p.grad = p.grad + avg * lamb
    return grads


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def _mean_ms(xs: list[float]) -> float:
    return 1000 * statistics.fmean(xs)


def _filter_step(variant: str, model: nn.Module, params: list[nn.Parameter], state: Any, window: int) -> Any:
    """Apply one variant's filter to the current gradients; returns the (new) filter state."""
    if variant == "ours_ema":
        grads = [p.grad for p in params]
        if state is None:
            state = GF.init_ema(grads)
        GF.ema_filter_(grads, state, EMA["alpha"], EMA["lamb"])
    elif variant == "ref_ema":
        state = ref_ema(model, state, EMA["alpha"], EMA["lamb"])
    elif variant == "ours_ma":
        grads = [p.grad for p in params]
        if state is None:
            state = GF.init_moving_average(grads, window)
        GF.moving_average_filter_(grads, state, MA["lamb"], True)
    elif variant == "ref_ma":
        state = ref_ma(model, state, window, MA["lamb"])
    return state


def _torch_variant(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    lm, window, warmup = cfg["lm"], cfg["ma_window"], cfg["warmup_steps"]
    # MA: time at least a full lap of the ring, so the mean includes the once-per-lap exact re-sum.
    timed = max(cfg["timed_steps"], window) if variant.endswith("_ma") else cfg["timed_steps"]
    torch.manual_seed(0)
    model = TinyLM(lm["vocab"], lm["dim"], lm["layers"], lm["heads"], lm["seq"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    state: Any = None
    step_t: list[float] = []
    filt_t: list[float] = []
    for i in range(warmup + timed):
        x = _lm_batch(lm, gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(x).backward()
        t1 = time.perf_counter()
        state = _filter_step(variant, model, params, state, window)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i == warmup - 1 and variant.endswith("_ma"):
            # Fill the window (untimed) with distinct gradient copies, so the timed steps amplify.
            for _ in range(window - warmup):
                for p in params:
                    p.grad = p.grad.clone()
                state = _filter_step(variant, model, params, state, window)
        if i >= warmup:
            step_t.append(t3 - t0)
            filt_t.append(t2 - t1)
    return {
        "params": sum(p.numel() for p in params),
        "step_ms_median": round(_median_ms(step_t), 2),
        "step_ms_mean": round(_mean_ms(step_t), 2),
        "filter_ms_median": round(_median_ms(filt_t), 3),
        "filter_ms_mean": round(_mean_ms(filt_t), 3),
    }


def torch_overhead(cfg: dict[str, Any]) -> dict[str, Any]:
    """Plain torch loop: step time, and the filter alone for ours vs the per-parameter references."""
    out: dict[str, Any] = {}
    for variant in ("plain", "ours_ema", "ref_ema", "ours_ma", "ref_ma"):
        print(f"  timing torch loop: {variant}", flush=True)
        out[variant] = _torch_variant(variant, cfg)
        gc.collect()
    out["params"] = out["plain"]["params"]
    plain = out["plain"]["step_ms_median"]
    for v in ("ours_ema", "ref_ema", "ours_ma", "ref_ma"):
        out[v]["filter_pct_of_plain_step"] = round(100 * out[v]["filter_ms_median"] / plain, 2)
        out[v]["filter_mean_pct_of_plain_step"] = round(100 * out[v]["filter_ms_mean"] / plain, 2)
    out["ref_over_ours_ema"] = round(out["ref_ema"]["filter_ms_median"] / out["ours_ema"]["filter_ms_median"], 2)
    out["ref_over_ours_ma"] = round(out["ref_ma"]["filter_ms_median"] / out["ours_ma"]["filter_ms_median"], 2)
    return out


class _LMModule(pl.LightningModule):
    def __init__(self, lm: dict[str, int], steps: int) -> None:
        super().__init__()
        self.lm, self.steps = lm, steps
        torch.manual_seed(0)
        self.model = TinyLM(lm["vocab"], lm["dim"], lm["layers"], lm["heads"], lm["seq"])

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.model.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        gen = torch.Generator().manual_seed(0)
        return DataLoader([_lm_batch(self.lm, gen) for _ in range(self.steps)], batch_size=None)


class _HookTimer(Callback):
    """Pairs of these around another callback time its ``on_before_optimizer_step``; also times steps."""

    def __init__(self, shared: dict[str, Any], role: str) -> None:
        self.shared, self.role = shared, role

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "start":
            self.shared["batch_t0"] = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "end":
            self.shared["steps"].append(time.perf_counter() - self.shared["batch_t0"])

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "start":
            self.shared["hook_t0"] = time.perf_counter()
        else:
            self.shared["hooks"].append(time.perf_counter() - self.shared["hook_t0"])


def lightning_overhead(cfg: dict[str, Any]) -> dict[str, Any]:
    """Lightning Trainer: median step time without a callback, and the median time in Grokfast's hook."""
    lm, window = cfg["lm"], cfg["ma_window"]
    out: dict[str, Any] = {}
    for variant in ("plain", "ema", "ma"):
        print(f"  timing Lightning: {variant}", flush=True)
        skip = cfg["warmup_steps"] + (window if variant == "ma" else 0)
        # MA: time at least a full lap of the ring, so the mean includes the once-per-lap exact re-sum.
        steps = skip + (max(cfg["timed_steps"], window) if variant == "ma" else cfg["timed_steps"])
        shared: dict[str, Any] = {"steps": [], "hooks": []}
        middle: list[Callback] = []
        if variant == "ema":
            middle = [Grokfast(filter="ema", **EMA)]
        elif variant == "ma":
            middle = [Grokfast(filter="ma", window_size=window, lamb=MA["lamb"])]
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[_HookTimer(shared, "start"), *middle, _HookTimer(shared, "end")],
        )
        trainer.fit(_LMModule(lm, steps))
        del trainer, middle
        gc.collect()
        step_t, hook_t = shared["steps"][skip:], shared["hooks"][skip:]
        out[variant] = {
            "step_ms_median": round(_median_ms(step_t), 2),
            "step_ms_mean": round(_mean_ms(step_t), 2),
            "hook_ms_median": round(_median_ms(hook_t), 3),
            "hook_ms_mean": round(_mean_ms(hook_t), 3),
        }
    plain = out["plain"]["step_ms_median"]
    for v in ("ema", "ma"):
        out[v]["hook_pct_of_plain_step"] = round(100 * out[v]["hook_ms_median"] / plain, 2)
        out[v]["hook_mean_pct_of_plain_step"] = round(100 * out[v]["hook_ms_mean"] / plain, 2)
        out[v]["step_increase_pct"] = round(100 * (out[v]["step_ms_median"] / plain - 1), 2)
    return out


# ============================================================================================ main


def plot(results: list[G.RunResult], path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, res in enumerate(results):
        steps = [h["step"] for h in res.history]
        tag = f"95% at {res.reached_step}" if res.reached_step is not None else f"<95% in {res.steps}"
        ax.plot(steps, [h["val_acc"] for h in res.history], color=f"C{i}", lw=1.6, label=f"{res.name} ({tag})")
        ax.plot(steps, [h["train_acc"] for h in res.history], color=f"C{i}", lw=0.8, ls="--", alpha=0.6)
    ax.axhline(0.95, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (solid: validation, dashed: train)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Grokfast on a + b mod 97: steps to 95% val acc (budget {budget})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets, a fast look")
    parser.add_argument("--paper", action="store_true",
                        help="x*y mod 97 as the authors ran it (baseline wd 0, EMA wd 0.005, MA wd 0.01) beside "
                             "same-weight-decay baselines; writes grokfast_paper.json/.png (the baseline needs "
                             "~40k steps: hours on a CPU)")
    parser.add_argument("--only", default=None,
                        help="with --paper: comma-separated runs to (re)run, merged into grokfast_paper.json")
    parser.add_argument("--replot", action="store_true", help="with --paper: only redraw the plot from the JSON")
    parser.add_argument("--skip-grokking", action="store_true", help="only the overhead part")
    parser.add_argument("--skip-overhead", action="store_true", help="only the speed-up part")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--budget", type=int, default=None, help="override the steps budget per run")
    parser.add_argument("--optimizer", choices=["adam", "adamw"], default=None, help="override (all runs)")
    parser.add_argument("--weight-decay", type=float, default=None, help="override (all runs)")
    parser.add_argument("--lr", type=float, default=None, help="override (all runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="override (all runs)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.budget:
        cfg["budget"] = args.budget
    for key in ("optimizer", "weight_decay", "lr", "batch_size"):
        if getattr(args, key) is not None:
            TASK[key] = getattr(args, key)
    G.quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paper:
        if args.replot:
            plot_paper(json.loads((RESULTS / "grokfast_paper.json").read_text())["runs"])
            return
        only = set(args.only.split(",")) if args.only else None
        unknown = (only or set()) - {name for name, _, _ in PAPER_RUNS}
        if unknown:
            parser.error(f"--only: unknown run(s) {sorted(unknown)}; allowed: {[n for n, _, _ in PAPER_RUNS]}")
        run_paper(dict(PAPER, budget=args.budget or PAPER["budget"]), only)
        return
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "config": {k: v for k, v in cfg.items()},
        "task": TASK,
        "ema": EMA,
        "ma": MA,
        "env": {
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }

    path = RESULTS / f"grokfast{suffix}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:
        """Write the report (after each part, so a later failure keeps what was measured)."""
        out = dict(report)
        if args.skip_grokking or args.skip_overhead:
            # Keep the part that was not re-run from the previous result file.
            kept = ["grokking"] if args.skip_grokking else ["overhead_torch", "overhead_lightning"]
            carried = [k for k in kept if k in previous]
            out.update({k: previous[k] for k in carried})
            if carried:
                out["carried_over_from_previous_run"] = carried
        path.write_text(json.dumps(out, indent=1))

    def line(name: str, value: Any) -> None:
        print(f"{name}: {value}", flush=True)

    line("mode", report["mode"])
    line("threads", torch.get_num_threads())
    if not args.skip_grokking:
        line("task", f"a + b mod 97, 50% train (seed {TASK['seed']}), transformer 2 layers x 128 x 4 heads,"
                     f" minibatch {TASK['batch_size']}, val every {cfg['val_every']} steps")
        line("optimizer (same for baseline, ema and ma)",
             f"{TASK['optimizer']} lr {TASK['lr']} betas (0.9, 0.98) weight_decay {TASK['weight_decay']}"
             + (" (L2, as in the paper's code)" if TASK["optimizer"] == "adam" else " (decoupled)"))
        line("filters", f"ema alpha {EMA['alpha']} lamb {EMA['lamb']}; ma window {MA['window_size']}"
                        f" lamb {MA['lamb']}")
        line("budget (steps per run)", cfg["budget"])
        grok, runs = grokking_speedup(cfg)
        report["grokking"] = grok
        save()
        for name in ("baseline", "ema", "ma"):
            r = grok[name]
            value = r["steps_to_95"] if r["reached"] else f"not reached within budget ({r['steps_run']} steps)"
            line(f"steps_to_95_{name}", value)
            line(f"ms_per_step_{name}", r["ms_per_step"])
        line("speedup_baseline_over_ema", _fmt_ratio(grok["ratio_baseline_over_ema"]))
        line("speedup_baseline_over_ma", _fmt_ratio(grok["ratio_baseline_over_ma"]))
        line("paper", "39890 -> 910 (EMA, x43.8), 790 (MA, x50.5); task x*y mod 97, baseline without weight"
                      " decay, Grokfast runs with weight decay 0.005 (EMA) / 0.01 (MA)")
        png = RESULTS / f"grokfast{suffix}.png"
        plot(runs, png, cfg["budget"])
        line("plot", png.relative_to(REPO))

    if not args.skip_overhead:
        lm = cfg["lm"]
        line("overhead model",
             f"transformer LM dim {lm['dim']} x {lm['layers']} layers, vocab {lm['vocab']}, "
             f"batch {lm['batch']} x seq {lm['seq']}, AdamW; MA window {cfg['ma_window']}")
        tor = torch_overhead(cfg)
        report["overhead_torch"] = tor
        save()
        line("overhead model params", tor["params"])
        line("plain_step_ms (torch loop, median)", tor["plain"]["step_ms_median"])
        for v in ("ours_ema", "ref_ema", "ours_ma", "ref_ma"):
            r = tor[v]
            line(f"{v}_filter_ms (median / mean)", f"{r['filter_ms_median']} / {r['filter_ms_mean']}")
            line(f"{v}_overhead_pct_of_step (median / mean)",
                 f"{r['filter_pct_of_plain_step']} / {r['filter_mean_pct_of_plain_step']}")
        line("ref_over_ours_ema (filter time)", tor["ref_over_ours_ema"])
        line("ref_over_ours_ma (filter time)", tor["ref_over_ours_ma"])
        lig = lightning_overhead(cfg)
        report["overhead_lightning"] = lig
        line("lightning_plain_step_ms (median)", lig["plain"]["step_ms_median"])
        for v in ("ema", "ma"):
            r = lig[v]
            line(f"callback_{v}_hook_ms (median / mean)", f"{r['hook_ms_median']} / {r['hook_ms_mean']}")
            line(f"callback_{v}_overhead_pct_of_step (median / mean)",
                 f"{r['hook_pct_of_plain_step']} / {r['hook_mean_pct_of_plain_step']}")
            line(f"callback_{v}_step_ms (median, increase vs plain %)",
                 f"{r['step_ms_median']} ({r['step_increase_pct']:+.1f}%)")
        line("target", "callback overhead <= 5% of step time")

    report["wall_s"] = round(time.perf_counter() - start, 1)
    save()
    line("wall_s", report["wall_s"])
    line("json", path.relative_to(REPO))


def run_paper(cfg: dict[str, Any], only: set[str] | None = None) -> None:
    """Run the paper's runs (``only``: a subset, added to the runs already in grokfast_paper.json)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "grokfast_paper.json"
    done = json.loads(path.read_text())["runs"] if only is not None and path.exists() else {}
    header = {"mode": "paper", "config": {k: v for k, v in cfg.items() if k != "budget"},
              "task": {**TASK, "operation": "mul"}, "ema": EMA, "ma": MA,
              "env": {"torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads()}}

    def save(runs: dict[str, Any]) -> None:
        path.write_text(json.dumps({**header, "runs": runs}, indent=1))

    print(f"mode: paper\ntask: x * y mod 97, 50% train, transformer 2 x 128 x 4 heads, minibatch "
          f"{TASK['batch_size']}, Adam lr {TASK['lr']} betas (0.9, 0.98), L2 weight decay per run\n"
          f"budget (steps per run): {cfg['budget']}", flush=True)
    start = time.perf_counter()
    out = paper_runs(cfg, save, only, done)
    save(out)
    for name, _, _ in PAPER_RUNS:
        if name not in out:
            continue
        r = out[name]
        value = r["steps_to_95"] if r["reached"] else f"not reached within budget ({r['steps_run']} steps)"
        paper = f" (paper: {r['paper_steps_to_95']})" if r["paper_steps_to_95"] else ""
        print(f"steps_to_95_{name}: {value}{paper}", flush=True)
    for key, value in out.items():
        if key.startswith("ratio_"):
            print(f"{key}: {_fmt_ratio(value)}", flush=True)
    plot_paper(out)
    print(f"json: {path.relative_to(REPO)}\nwall_s: {time.perf_counter() - start:.0f}")


def plot_paper(out: dict[str, Any]) -> None:
    png = RESULTS / "grokfast_paper.png"
    runs = [SimpleNamespace(name=name, history=out[name]["history"], reached_step=out[name]["steps_to_95"])
            for name, _, _ in PAPER_RUNS if name in out]
    G.plot_runs(runs, png, "x * y mod 97 as the Grokfast authors ran it: validation (solid) and train (dashed)",
                log_steps=True)
    print(f"plot: {png.relative_to(REPO)}", flush=True)


if __name__ == "__main__":
    main()
