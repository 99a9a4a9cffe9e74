"""Modules and probes shared by the GPU suite's files (built on tests/helpers, not copies of it)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from tests.helpers.models import MultiTaskModule, TinyModule

OVERFLOW_STEP = 1
OVERFLOW_FACTOR = 1e8  # x the GradScaler's 2**16: the fp16 activation gradients overflow to inf


class OverflowMixin:
    """Multiplies the loss by 1e8 at optimizer step ``overflow_step`` (``None``: never).

    Under fp16 the gradients of that step overflow for real, and the GradScaler skips it and halves its scale.
    """

    overflow_step: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)  # type: ignore[misc]
        if self.overflow_step is None or self.global_step != self.overflow_step:  # type: ignore[attr-defined]
            return out
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] * OVERFLOW_FACTOR,
                    "task_losses": {k: v * OVERFLOW_FACTOR for k, v in out["task_losses"].items()}}
        return out * OVERFLOW_FACTOR


class CompileMixin:
    """Compiles ``self.net`` (or the trunk of a multi-task module) with the default backend, inductor."""

    compile_net: bool = False

    def configure_model(self) -> None:
        if not self.compile_net:
            return
        if hasattr(self, "net"):
            self.net = torch.compile(self.net)
        else:
            self.trunk = torch.compile(self.trunk)


def configure(cls: type, precision: str) -> dict[str, Any]:
    """Class attributes that make ``cls`` overflow once (fp16) or compile itself ("compile")."""
    return {"overflow_step": OVERFLOW_STEP if precision == "16-mixed" else None,
            "compile_net": precision == "compile"}


def variant(base: type, precision: str) -> type:
    """``base`` with the overflow (fp16) / compile ("compile") behaviour of ``precision``; picklable by name."""
    return _VARIANTS[(base.__name__, precision)]


_VARIANTS: dict[tuple[str, str], type] = {}


def register_variants(base: type, module_globals: dict[str, Any]) -> None:
    """Define ``<Base>_<precision>`` classes at module level (so spawned processes can unpickle them)."""
    for precision in ("32-true", "16-mixed", "bf16-mixed", "compile"):
        name = f"{base.__name__}_{precision.replace('-', '_')}"
        cls = type(name, (OverflowMixin, CompileMixin, base), {**configure(base, precision),
                                                                  "__module__": module_globals["__name__"]})
        module_globals[name] = cls
        _VARIANTS[(base.__name__, precision)] = cls


def trainer_precision(precision: str) -> str:
    """The Trainer precision of a suite precision id ("compile" trains in fp32)."""
    return "32-true" if precision == "compile" else precision


class StepProbe(Callback):
    """Per optimizer step: the GradScaler's scale, whether the gradients were finite and (optionally) a copy of
    them, as they reach ``on_before_optimizer_step`` (unscaled; place this callback before the one under test)."""

    def __init__(self, keep_grads: bool = False) -> None:
        self.keep_grads = keep_grads
        self.records: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        record: dict[str, Any] = {"step": trainer.global_step,
                                  "finite": all(bool(torch.isfinite(g).all()) for g in grads.values())}
        if self.keep_grads:
            record["grads"] = {n: g.detach().double().cpu() for n, g in grads.items()}
        self.records.append(record)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.records:
            self.records[-1]["scale"] = float(scaler.get_scale()) if scaler is not None else 1.0


def probe_records(trainer: pl.Trainer, module: pl.LightningModule) -> list[dict[str, Any]]:
    return next(cb for cb in trainer.callbacks if isinstance(cb, StepProbe)).records


def assert_real_overflows(records: list[dict[str, Any]], initial_scale: float = 2.0**16) -> list[int]:
    """The planned step overflowed, and the GradScaler halved its scale after exactly the steps whose gradients
    were not finite (the first steps may overflow on their own at the initial scale). Returns those steps."""
    bad = [r["step"] for r in records if not r["finite"]]
    assert OVERFLOW_STEP in bad, f"the planned overflow at step {OVERFLOW_STEP} did not happen (bad steps: {bad})"
    before = initial_scale
    for r in records:
        assert r["scale"] == (before / 2 if not r["finite"] else before), f"step {r['step']}: scale {r['scale']}"
        before = r["scale"]
    return bad


def assert_close_relative(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """``||actual - expected|| <= rtol ||expected||`` (robust to the rounding direction of any one element)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err, ref = (a - e).norm().item(), e.norm().item()
    assert err <= rtol * ref + 1e-12, f"{what}: relative error {err / max(ref, 1e-300):.3e} > {rtol:g}"


register_variants(TinyModule, globals())
register_variants(MultiTaskModule, globals())
