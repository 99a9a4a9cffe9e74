"""GPU benchmark: what each method costs on one GPU, in bf16, through a Lightning ``Trainer``.

One run measures, on one device (CUDA by default):

* ``grokfast``: step time of a ~135M-parameter GPT-style transformer (12 layers, width 768, 32k vocabulary,
  16 x 1024 tokens per step, AdamW, ``bf16-mixed``) with no callback, with ``Grokfast("ema")`` and with
  ``Grokfast("ma")``; the overhead in percent of the plain step. The MA window is short (8) so that it fills
  quickly; its cost per step does not depend on the window (a running sum, re-summed exactly once per lap),
  and steps are timed over whole laps. Target: <= 2%.
* ``surgery``: step time of ``GradientSurgery(method)`` over a bare loop of T ``torch.autograd.grad`` calls
  (each task's loss w.r.t. the shared trunk and its own head, summed into ``.grad``: the least any per-task
  method does), for T = 2, 4, 8 tasks on a 4-layer MLP trunk (width 2048, batch 1024). Target: <= 1.1x.
* ``privacy``: training throughput (samples per second) of a MiniLM-sized BERT encoder (6 layers, width 384,
  12 heads, sequences of 128 tokens, batch 32, randomly initialised: only its shape matters here) without
  privacy and with ``DifferentialPrivacy`` (``grad_sample_mode="hooks"`` and ``"ghost"``, Poisson sampling,
  noise and accounting included); relative to non-private. Target: ghost >= 0.7x (FlashDP reports ~0.9x).
* ``compression``: each compressor's throughput in GB/s of fp32 gradient compressed and decompressed (one
  process: the whole encode/decode work runs, nothing is sent) on the transformer's gradient shapes, and the
  PowerSGD step's share of a DDP step: Lightning ``ddp`` vs ``ddp_powersgd`` on one device (NCCL), the same
  transformer.

Every time is a median over steps after warm-up, with the device synchronised at both ends of each step.

Run::

    python benchmarks/gpu.py                        # on a GPU: the real figures (about 3 minutes on an H200)
    python benchmarks/gpu.py --device cpu --tiny    # a dry run of every part on tiny sizes (under a minute)

Prints ``name: value`` lines, writes ``gpu.json`` (after every part) and ``gpu.png`` (``gpu_<device>_tiny``
with ``--tiny``) under ``--out DIR`` (default ``benchmarks/results/gpu``; on a lent device machine, ``$OUT``: only
what is written there comes back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_optx import GradientSurgery, Grokfast  # noqa: E402
from lightning_optx.compression import COMPRESSORS, get_compressor  # noqa: E402
from lightning_optx.distributed import Communicator  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gpu"

FULL: dict[str, Any] = {
    "lm": {"vocab": 32768, "dim": 768, "layers": 12, "heads": 12, "seq": 1024, "batch": 16},
    "warmup": 5, "steps": 24, "window": 8,
    "surgery": {"in_dim": 512, "width": 2048, "depth": 4, "batch": 1024, "tasks": [2, 4, 8],
                "methods": ["pcgrad", "cagrad"], "warmup": 5, "steps": 30},
    "dp": {"vocab": 30522, "hidden": 384, "layers": 6, "heads": 12, "intermediate": 1536, "seq": 128, "batch": 32,
           "warmup": 5, "steps": 30},
    "compress_reps": 10,
}
TINY: dict[str, Any] = {
    "lm": {"vocab": 64, "dim": 16, "layers": 2, "heads": 2, "seq": 8, "batch": 2},
    "warmup": 1, "steps": 2, "window": 2,
    "surgery": {"in_dim": 8, "width": 16, "depth": 2, "batch": 8, "tasks": [2, 8], "methods": ["pcgrad"],
                "warmup": 1, "steps": 2},
    "dp": {"vocab": 64, "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "seq": 8, "batch": 4,
           "warmup": 1, "steps": 2},
    "compress_reps": 2,
}
TARGETS = {"grokfast_overhead_pct": 2.0, "surgery_ratio": 1.1, "dp_ghost_relative": 0.7}


def line(name: str, value: Any) -> None:
    print(f"{name}: {value}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- step timing inside fit


class StepTimer(Callback):
    """Wall time and batch size of every training step (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.sizes: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._start)
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.sizes.append(len(first))


def fit_and_time(module: pl.LightningModule, callbacks: list[Callback], device: torch.device, max_steps: int,
                 **trainer_kwargs: Any) -> StepTimer:
    timer = StepTimer()
    kwargs: dict[str, Any] = {"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1,
                              "precision": "bf16-mixed", "max_steps": max_steps, "logger": False,
                              "enable_checkpointing": False, "enable_progress_bar": False,
                              "enable_model_summary": False, "num_sanity_val_steps": 0}
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[*callbacks, timer], **kwargs)
    trainer.fit(module)
    return timer


def median_after(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


# ---------------------------------------------------------------- a GPT-style language model


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LanguageModel(pl.LightningModule):
    """A GPT-style decoder on synthetic tokens (random, fixed by seed): only the step's cost matters."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int, batch: int, steps: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.vocab, self.seq, self.batch, self.steps = vocab, seq, batch, steps

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4, fused=self.device.type == "cuda")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab, (self.batch * self.steps, self.seq + 1), generator=g)
        return DataLoader(TensorDataset(tokens), batch_size=self.batch, pin_memory=True)


def lm_module(cfg: dict[str, Any], steps: int) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(**cfg["lm"], steps=steps)


def grokfast_part(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    warmup, window = cfg["warmup"], cfg["window"]
    steps = cfg["steps"] // window * window  # whole laps of the MA ring
    total = warmup + window + steps  # the MA filter amplifies once its window is full
    params = sum(p.numel() for p in lm_module(cfg, 1).parameters())
    line("grokfast/params_millions", round(params / 1e6, 1))
    out: dict[str, Any] = {"params": params, "step_ms": {}}
    configs: dict[str, Callable[[], list[Callback]]] = {
        "none": list,
        "ema": lambda: [Grokfast("ema", alpha=0.98, lamb=2.0)],
        "ma": lambda: [Grokfast("ma", window_size=window, lamb=5.0)],
    }
    for name, callbacks in configs.items():
        timer = fit_and_time(lm_module(cfg, total), callbacks(), device, total)
        out["step_ms"][name] = statistics.mean(timer.times[warmup + window:]) * 1e3  # whole laps: the mean
        line(f"grokfast/step_ms/{name}", round(out["step_ms"][name], 3))
    base = out["step_ms"]["none"]
    out["overhead_pct"] = {k: (out["step_ms"][k] / base - 1) * 100 for k in ("ema", "ma")}
    for k, v in out["overhead_pct"].items():
        line(f"grokfast/overhead_pct/{k}", round(v, 2))
        line(f"grokfast/target/{k}", "PASS" if v <= TARGETS["grokfast_overhead_pct"] else "FAIL")
    return out


# ---------------------------------------------------------------- gradient surgery vs a bare loop


class MultiTask(pl.LightningModule):
    """An MLP trunk with T linear heads; ``training_step`` returns the total and each task's loss."""

    def __init__(self, tasks: int, in_dim: int, width: int, depth: int, batch: int, steps: int,
                 bare: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.GELU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))
        self.in_dim, self.batch, self.steps, self.tasks, self.bare = in_dim, batch, steps, tasks, bare
        self._task_losses: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        h = self.trunk(x)
        losses = [F.mse_loss(head(h).squeeze(-1).float(), y[:, t]) for t, head in enumerate(self.heads)]
        total = torch.stack(losses).sum()
        if self.bare:
            self._task_losses = losses
            return total
        return {"loss": total, "task_losses": {f"task{t}": loss for t, loss in enumerate(losses)}}

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.bare:
            super().backward(loss, *args, **kwargs)
            return
        shared = list(self.trunk.parameters())
        losses, self._task_losses = self._task_losses, []
        for t, task_loss in enumerate(losses):
            own = list(self.heads[t].parameters())
            grads = torch.autograd.grad(task_loss, shared + own, retain_graph=t < len(losses) - 1)
            for p, g in zip(shared + own, grads):
                p.grad = g if p.grad is None else p.grad.add_(g)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.batch * self.steps, self.in_dim, generator=g)
        y = torch.randn(self.batch * self.steps, self.tasks, generator=g) * torch.tensor(
            [(-1.0) ** t for t in range(self.tasks)])
        return DataLoader(TensorDataset(x, y), batch_size=self.batch, pin_memory=True)


def surgery_part(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    s = cfg["surgery"]
    total = s["warmup"] + s["steps"]
    shape = {k: s[k] for k in ("in_dim", "width", "depth", "batch")}
    out: dict[str, Any] = {"step_ms": {}, "ratio": {}}
    for tasks in s["tasks"]:
        rows: dict[str, float] = {}
        for config in ["bare", *s["methods"]]:
            torch.manual_seed(0)
            module = MultiTask(tasks, **shape, steps=total, bare=config == "bare")
            callbacks: list[Callback] = [] if config == "bare" else [GradientSurgery(config)]
            timer = fit_and_time(module, callbacks, device, total)
            rows[config] = median_after(timer.times, s["warmup"]) * 1e3
            line(f"surgery/T{tasks}/step_ms/{config}", round(rows[config], 3))
        out["step_ms"][str(tasks)] = rows
        out["ratio"][str(tasks)] = {m: rows[m] / rows["bare"] for m in s["methods"]}
        for m, r in out["ratio"][str(tasks)].items():
            line(f"surgery/T{tasks}/ratio/{m}", round(r, 3))
            line(f"surgery/T{tasks}/target/{m}", "PASS" if r <= TARGETS["surgery_ratio"] else "FAIL")
    return out


# ---------------------------------------------------------------- DP-SGD throughput on a MiniLM-sized encoder


class Encoder(pl.LightningModule):
    """A BERT encoder of MiniLM's shape, mean pooling, a 2-way head; random tokens and labels."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, seq: int, batch: int,
                 steps: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, 2)
        self.vocab, self.seq, self.batch, self.steps = vocab, seq, batch, steps

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, labels = batch
        if len(ids) == 0:  # an empty Poisson batch
            return self.head.weight.sum() * 0.0
        # explicit per-sample position and token-type ids: BERT's defaults are buffers broadcast over the batch,
        # whose embedding layers would then get no per-sample gradient
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        hidden = self.encoder(input_ids=ids, position_ids=positions, token_type_ids=torch.zeros_like(ids))
        pooled = hidden.last_hidden_state.mean(1)
        return F.cross_entropy(self.head(pooled).float(), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        n = self.batch * self.steps
        ids = torch.randint(0, self.vocab, (n, self.seq), generator=g)
        return DataLoader(TensorDataset(ids, torch.randint(0, 2, (n,), generator=g)), batch_size=self.batch)


def privacy_part(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    try:
        import opacus  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        line("privacy/skipped", f"{error.name} is not installed")
        return {"skipped": f"{error.name} is not installed"}
    from lightning_optx import DifferentialPrivacy

    d = dict(cfg["dp"])
    warmup, steps = d.pop("warmup"), d.pop("steps")
    total = warmup + steps
    out: dict[str, Any] = {"samples_per_s": {}}
    for config in ["non_private", "hooks", "ghost"]:
        torch.manual_seed(0)
        module = Encoder(**d, steps=total)
        callbacks: list[Callback] = [] if config == "non_private" else [
            DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", grad_sample_mode=config)]
        timer = fit_and_time(module, callbacks, device, total)
        times, sizes = timer.times[warmup:], timer.sizes[warmup:]
        out["samples_per_s"][config] = sum(sizes) / sum(times)
        line(f"privacy/samples_per_s/{config}", round(out["samples_per_s"][config], 1))
    base = out["samples_per_s"]["non_private"]
    out["relative"] = {k: out["samples_per_s"][k] / base for k in ("hooks", "ghost")}
    for k, v in out["relative"].items():
        line(f"privacy/relative/{k}", round(v, 3))
    line("privacy/target/ghost", "PASS" if out["relative"]["ghost"] >= TARGETS["dp_ghost_relative"] else "FAIL")
    return out


# ---------------------------------------------------------------- compressors and the PowerSGD share of a step


def compression_part(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    module = lm_module(cfg, 1)
    named = [(n, p) for n, p in module.named_parameters()]
    nbytes = sum(p.numel() * 4 for _, p in named)
    out: dict[str, Any] = {"gradient_bytes": nbytes, "gb_per_s": {}}
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(p.shape, generator=g, device=device) for _, p in named]
    keys = [n for n, _ in named]
    comm = Communicator()  # one process: the whole encode/decode runs, nothing is sent
    for name in COMPRESSORS:
        compressor = get_compressor(name)
        times = []
        for rep in range(cfg["compress_reps"] + 1):
            tensors = [t.clone() for t in base]
            synchronize(device)
            start = time.perf_counter()
            compressor.reduce_(tensors, keys, comm, tag="grad")
            compressor.end_iteration()
            synchronize(device)
            if rep:  # the first call builds the compressor's state
                times.append(time.perf_counter() - start)
        out["gb_per_s"][name] = nbytes / statistics.median(times) / 1e9
        line(f"compression/gb_per_s/{name}", round(out["gb_per_s"][name], 2))
    del base
    out.update(powersgd_share(cfg, device))
    return out


def use_fresh_rendezvous_port() -> None:
    """A one-device DDP fit in this process must not reuse a port an earlier process group (or an inherited
    ``MASTER_PORT``) still holds: that fails with EADDRINUSE."""
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: the launcher owns the rendezvous
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


def powersgd_share(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Lightning ``ddp`` vs ``ddp_powersgd`` on one device: the extra time per step is PowerSGD's."""
    import lightning_optx  # noqa: F401  (registers the strategy names)

    warmup, steps = cfg["warmup"], cfg["steps"]
    times = {}
    for strategy in ("ddp", "ddp_powersgd"):
        use_fresh_rendezvous_port()
        timer = fit_and_time(lm_module(cfg, warmup + steps), [], device, warmup + steps, strategy=strategy)
        times[strategy] = median_after(timer.times, warmup) * 1e3
        line(f"compression/ddp_step_ms/{strategy}", round(times[strategy], 3))
    share = max(0.0, times["ddp_powersgd"] - times["ddp"]) / times["ddp_powersgd"]
    line("compression/powersgd_share_of_ddp_step", round(share, 4))
    return {"ddp_step_ms": times, "powersgd_share_of_ddp_step": share}


# ---------------------------------------------------------------- report


PARTS: dict[str, Callable[[dict[str, Any], torch.device], dict[str, Any]]] = {
    "grokfast": grokfast_part, "surgery": surgery_part, "privacy": privacy_part, "compression": compression_part,
}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    parts = report["parts"]
    ax = axes[0]
    if "overhead_pct" in parts.get("grokfast", {}):
        values = parts["grokfast"]["overhead_pct"]
        ax.bar(list(values), list(values.values()), color="tab:blue")
        ax.axhline(TARGETS["grokfast_overhead_pct"], color="red", ls="--", label="target")
        ax.legend()
    ax.set_title("Grokfast overhead per step (%)")
    ax = axes[1]
    if "ratio" in parts.get("surgery", {}):
        ratio = parts["surgery"]["ratio"]
        tasks = sorted(ratio, key=int)
        for method in next(iter(ratio.values())):
            ax.plot([int(t) for t in tasks], [ratio[t][method] for t in tasks], marker="o", label=method)
        ax.axhline(TARGETS["surgery_ratio"], color="red", ls="--", label="target")
        ax.set_xlabel("tasks T")
        ax.legend()
    ax.set_title("GradientSurgery step / bare T autograd.grad")
    ax = axes[2]
    if "relative" in parts.get("privacy", {}):
        rel = parts["privacy"]["relative"]
        ax.bar(list(rel), list(rel.values()), color="tab:green")
        ax.axhline(TARGETS["dp_ghost_relative"], color="red", ls="--", label="target (ghost)")
        ax.legend()
    ax.set_title("DP throughput / non-private")
    ax = axes[3]
    if "gb_per_s" in parts.get("compression", {}):
        gbs = parts["compression"]["gb_per_s"]
        ax.bar(list(gbs), list(gbs.values()), color="tab:purple")
        ax.set_yscale("log")
        share = parts["compression"].get("powersgd_share_of_ddp_step")
        if share is not None:
            ax.set_xlabel(f"PowerSGD share of a DDP step: {share:.1%}")
    ax.set_title("compressor throughput (GB/s fp32)")
    fig.suptitle(f"lightning-optx on {report['device_name']} ({'tiny' if report['tiny'] else 'full'} sizes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a dry run of every part")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the PNG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device; use `--device cpu --tiny` for a dry run")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}, choose from {list(PARTS)}")
    device = torch.device(args.device)
    cfg = TINY if args.tiny else FULL
    pl.seed_everything(0, verbose=False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = "gpu" if not args.tiny else f"gpu_{device.type}_tiny"
    report: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "lightning": pl.__version__, "tiny": args.tiny, "config": cfg,
        "targets": TARGETS, "parts": {}, "seconds": {},
    }
    line("device", report["device_name"])
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{name}.json", args.out / f"{name}.png"
    for part in args.parts.split(","):
        start = time.perf_counter()
        report["parts"][part] = PARTS[part](cfg, device)
        report["seconds"][part] = time.perf_counter() - start
        line(f"{part}/seconds", round(report["seconds"][part], 1))
        # after every part: a run stopped by a time limit still leaves the figures of the parts it finished
        json_path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    plot(report, png_path)
    line("json", json_path)
    line("png", png_path)
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
