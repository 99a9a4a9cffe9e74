"""Early / late dropout and stochastic-depth schedules as Lightning callbacks."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_optx.callbacks._per_rank import RngStream, per_rank_key
from lightning_optx.callbacks._rng import gather_rng_states, restore_own_rng_state
from lightning_optx.callbacks._steps import holds_compiled_module, planned_rounds, rounds_before_batch
from lightning_optx.checkpointing import per_rank_state
from lightning_optx.compatibility import check_supported
from lightning_optx.functional import schedules as S

Target = Literal["dropout", "drop_path"]
COMPILED_LEVELS = 4


class DropoutSchedule(Callback):
    """Schedule the dropout (or drop-path) rate of every matching module, once per optimizer step.

    Following Liu et al., "Dropout Reduces Underfitting": *early* dropout (on for the first ``cutoff`` steps,
    then off) helps underfitting models; *late* dropout (off, then on after ``cutoff``) regularises
    overfitting ones. The rate is set at the start of each optimizer step (all micro-batches of an
    accumulated step share it) from the restored step counters, so resuming from a checkpoint resumes the
    schedule. The early linear ramp is the authors' ``np.linspace(p, 0, cutoff)``. At the end of ``fit``
    every module gets its original rate back.

    The clock and the planned length are in the same unit, optimizer-step rounds: ``trainer.global_step``
    under automatic optimization, the number of batches that stepped under manual optimization (where
    ``global_step`` advances once per optimizer, twice per batch with two optimizers).

    Modules updated: with ``target="dropout"`` every ``nn.Dropout``-family module, any module whose class
    name contains "Dropout" and that has a float ``p``, and every float-valued dropout rate kept as a plain
    module attribute (``nn.MultiheadAttention.dropout``, ``attention_dropout`` of Llama-style attention,
    ``dropout_prob``, ``drop_rate``, ...: an attribute whose name contains "dropout" or is ``drop_rate`` /
    ``p_drop``, not a drop-path rate). Such attributes are only effective if the module reads them in
    ``forward``; their names are logged at the start of ``fit``. With ``target="drop_path"``:
    stochastic-depth modules (timm's ``DropPath`` with ``drop_prob``, torchvision's ``StochasticDepth``
    with ``p``), keeping their per-depth profile: a module built with rate ``r_i`` gets
    ``rate * r_i / max(r)``, so the deepest block gets the scheduled rate and the others their share (the
    authors' ``update_drop_path`` sets ``linspace(0, rate, depth)``). Finding none is an error.

    ``torch.compile`` guards on the rate, so every distinct value compiles a new graph and past dynamo's
    recompile limit (8) the model silently runs eagerly. When the model holds a compiled module the rates are
    therefore rounded to ``levels`` evenly spaced values in ``[0, p]`` (4 unless set).

    Args:
        mode: ``"early"``, ``"late"`` or ``"standard"`` (constant ``p``).
        p: the dropout rate, in ``[0, 1)``.
        cutoff: where the schedule switches: an int is a number of optimizer steps, a float in ``(0, 1)`` a
            fraction of the planned steps.
        shape: ``"linear"`` (early: ``np.linspace(p, 0, cutoff)``; late: ramp 0 -> ``p`` after the cutoff) or
            ``"constant"`` (a step).
        target: ``"dropout"`` or ``"drop_path"``.
        levels: quantise the rate to this many values (0: exact; ``None``: exact unless the model is compiled).
        save_rng_state: store every rank's random-number-generator state in the checkpoint and restore it on
            resume, so that the dropout masks after a resume are the ones the uninterrupted run would draw
            (Lightning does not save RNG states itself). Under lightning_optx's strategies each rank saves its
            own state in its per-rank part of the checkpoint (:func:`~lightning_optx.checkpointing.per_rank_state`,
            no collective); under other strategies the states (a few KB each) are gathered into the callback's
            state.

    The rate depends only on the optimizer step, so it is the same on every rank under every strategy; the masks
    are drawn from each rank's own random-number generator.

    Examples:
        >>> from lightning_optx import DropoutSchedule, EarlyDropout
        >>> early = EarlyDropout(p=0.1, cutoff=0.2)            # dropout for the first 20% of steps
        >>> late = DropoutSchedule(mode="late", p=0.3, cutoff=1000, shape="constant")
    """

    def __init__(
        self,
        mode: S.Mode = "early",
        p: float = 0.1,
        cutoff: int | float = 0.2,
        shape: S.Shape = "linear",
        target: Target = "dropout",
        levels: int | None = None,
        save_rng_state: bool = True,
    ) -> None:
        S.check_schedule_args(mode, p, cutoff, shape)
        if target not in ("dropout", "drop_path"):
            raise ValueError(f"`target` must be 'dropout' or 'drop_path', got target={target!r}.")
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 0):
            raise ValueError(f"`levels` must be None or an integer >= 0, got levels={levels!r}.")
        self.mode = mode
        self.p = float(p)
        self.cutoff = cutoff
        self.shape = shape
        self.target = target
        self.levels = levels
        self.save_rng_state = save_rng_state
        self.total_steps: int | None = None
        self.cutoff_steps: int | None = None
        self.current_p: float | None = None
        self._slots: list[tuple[nn.Module, str, float]] = []  # module, attribute, original rate
        self._levels = 0
        self.applied: list[float] = []  # the rate each slot holds now
        self.scheduled_names: list[str] = []  # "<module>.<attribute>" of every scheduled rate
        self._rng_per_rank = False  # RNG states saved through the strategy's per-rank files, not gathered

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, target=self.target)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_supported(self, trainer)
        # Before Lightning restores a checkpoint, so that each rank's own RNG state is handed back to it.
        store = per_rank_state(trainer)
        self._rng_per_rank = store is not None and self.save_rng_state
        if store is not None and self.save_rng_state:
            store.register(per_rank_key(self, "rng"), RngStream())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in `setup`: `configure_model` (which may build or compile the layers) runs after it.
        self._slots = _rate_slots(pl_module, self.target)
        self.scheduled_names = _slot_names(pl_module, self._slots)
        plain = [name for name, (module, attr, _) in zip(self.scheduled_names, self._slots)
                 if not _is_rate_module(module, attr)]
        if plain:
            rank_zero_info("DropoutSchedule: also scheduling float dropout attributes (effective if forward "
                           f"reads them): {', '.join(plain)}")
        if not self._slots:
            raise ValueError(
                f"DropoutSchedule(target={self.target!r}) found no module to schedule in {type(pl_module).__name__}: "
                + ("no nn.Dropout, dropout-like module with `p`, or nn.MultiheadAttention."
                   if self.target == "dropout" else "no DropPath (`drop_prob`) or StochasticDepth (`p`) module.")
            )
        compiled = holds_compiled_module(pl_module)
        self._levels = self.levels if self.levels is not None else (COMPILED_LEVELS if compiled else 0)
        if compiled and self._levels == 0:
            rank_zero_warn("DropoutSchedule: the model is compiled and `levels=0`; every new rate recompiles and "
                           "past dynamo's recompile limit the model runs eagerly. Set `levels` to 4 or fewer.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.total_steps is None:  # a resumed run keeps the schedule it started with
            planned = planned_rounds(trainer)
            if not math.isfinite(planned):
                raise ValueError("DropoutSchedule needs a finite training length (max_steps or max_epochs).")
            self.total_steps = int(planned)
            self.cutoff_steps = S.resolve_cutoff(self.cutoff, self.total_steps)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self.total_steps is not None and self.cutoff_steps is not None
        rate = S.dropout_rate(rounds_before_batch(trainer), self.total_steps, self.mode, self.p,
                              self.cutoff_steps, self.shape)
        rate = S.quantize(rate, self.p, self._levels)
        if rate != self.current_p:
            self.applied = self._per_slot(rate)
            for (module, attr, _), value in zip(self._slots, self.applied):
                setattr(module, attr, value)
            self.current_p = rate
        pl_module.log("dropout/p", rate, on_step=True, on_epoch=False)

    def _per_slot(self, rate: float) -> list[float]:
        if self.target == "drop_path":
            return S.depth_profile([original for _, _, original in self._slots], rate)
        return [rate] * len(self._slots)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for module, attr, original in self._slots:
            setattr(module, attr, original)
        self.current_p = None
        self.applied = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"total_steps": self.total_steps, "cutoff_steps": self.cutoff_steps}
        if self.save_rng_state and self.total_steps is not None and not self._rng_per_rank:
            state["rng_states"] = gather_rng_states()  # every rank serialises callbacks: a safe collective
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = state_dict["total_steps"]
        self.cutoff_steps = state_dict["cutoff_steps"]
        if self.save_rng_state and state_dict.get("rng_states"):
            restore_own_rng_state(state_dict["rng_states"])


class EarlyDropout(DropoutSchedule):
    """``DropoutSchedule(mode="early")``: dropout ``p`` for the first ``cutoff`` steps, then none.

    Examples:
        >>> cb = EarlyDropout(p=0.1, cutoff=0.25, shape="constant")
    """

    def __init__(self, p: float = 0.1, cutoff: int | float = 0.2, shape: S.Shape = "linear",
                 target: Target = "dropout", levels: int | None = None, save_rng_state: bool = True) -> None:
        super().__init__(mode="early", p=p, cutoff=cutoff, shape=shape, target=target, levels=levels,
                         save_rng_state=save_rng_state)


class LateDropout(DropoutSchedule):
    """``DropoutSchedule(mode="late")``: no dropout for the first ``cutoff`` steps, then ``p``.

    Examples:
        >>> cb = LateDropout(p=0.2, cutoff=0.5)
    """

    def __init__(self, p: float = 0.1, cutoff: int | float = 0.5, shape: S.Shape = "constant",
                 target: Target = "dropout", levels: int | None = None, save_rng_state: bool = True) -> None:
        super().__init__(mode="late", p=p, cutoff=cutoff, shape=shape, target=target, levels=levels,
                         save_rng_state=save_rng_state)


_RATE_ATTRIBUTE_NAMES = ("drop_rate", "p_drop")


def _is_rate_module(module: nn.Module, attr: str) -> bool:
    """Whether the slot is a dropout or drop-path module's own rate (rather than a plain float attribute)."""
    if _is_drop_path_module(module):
        return attr in ("drop_prob", "p")
    is_dropout = isinstance(module, nn.modules.dropout._DropoutNd) or "dropout" in type(module).__name__.lower()
    return attr == "p" and is_dropout


def _is_drop_path_module(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "droppath" in name or "stochasticdepth" in name


def _is_dropout_attribute(name: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, float) or not 0.0 <= value < 1.0:
        return False
    lowered = name.lower()
    return "path" not in lowered and ("dropout" in lowered or lowered in _RATE_ATTRIBUTE_NAMES)


def _rate_slots(root: nn.Module, target: Target) -> list[tuple[nn.Module, str, float]]:
    """Every (module, attribute, current rate) the schedule should drive."""
    slots: list[tuple[nn.Module, str, float]] = []
    for module in root.modules():
        name = type(module).__name__.lower()
        drop_path_module = _is_drop_path_module(module)
        if target == "dropout" and not drop_path_module:
            if isinstance(module, nn.modules.dropout._DropoutNd) or (
                "dropout" in name and isinstance(getattr(module, "p", None), float)
            ):
                slots.append((module, "p", float(module.p)))  # type: ignore[arg-type]
            for attr, value in vars(module).items():
                if not attr.startswith("_") and _is_dropout_attribute(attr, value):
                    slots.append((module, attr, float(value)))
        elif target == "drop_path" and drop_path_module:
            for attr in ("drop_prob", "p"):
                if isinstance(getattr(module, attr, None), (int, float)):
                    slots.append((module, attr, float(getattr(module, attr))))
                    break
    return slots


def _slot_names(root: nn.Module, slots: list[tuple[nn.Module, str, float]]) -> list[str]:
    names = {id(m): n for n, m in root.named_modules()}
    return [f"{names.get(id(m), type(m).__name__)}.{attr}".lstrip(".") for m, attr, _ in slots]
