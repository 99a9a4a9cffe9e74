"""Which callback works with which strategy, and how: the one table the checks, the docs and the tests read.

Every pair of a lightning-optx callback (``Grokfast``, ``GradES``, ``DropoutSchedule``, ``GradientSurgery``,
``DifferentialPrivacy``) and a data-parallel strategy (Lightning's ``ddp`` and ours: ``local_sgd``, ``diloco``,
``diloco_x``, ``ddp_powersgd``, ``ddp_topk``, ``ddp_sign``, ``ddp_fp16``, ``ddp_bf16``) is in :data:`TABLE`,
either supported, with its semantics, or refused, with the reason. A supported pair may still refuse some
settings of the strategy (:class:`RefusedSetting`). Each callback calls :func:`check_supported` first in its
``setup``, so a refused pair fails before any optimizer step with an error naming the callback, the strategy
and the reason. ``docs/compatibility.md`` is rendered from the same table
(``python scripts/render_compatibility.py``), and ``tests/integration/test_matrix.py`` trains every
supported pair on 2 processes and checks that every refused pair fails at set-up.

Strategies outside the table (single device: nothing to check; FSDP, DeepSpeed, a subclass of Lightning's
``DDPStrategy`` of your own) are left to each callback's own checks.

Examples:
    >>> from lightning_optx import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy
    >>> strategy_key(LocalSGDStrategy(period=4))
    'local_sgd'
    >>> strategy_key(DiLoCoStrategy(inner_steps=10, overlap=True))
    'diloco_x'
    >>> strategy_key(CompressedDDPStrategy("topk"))
    'ddp_topk'
    >>> TABLE["Grokfast", "local_sgd"].supported
    True
    >>> TABLE["DifferentialPrivacy", "ddp_sign"].supported
    False
    >>> refusal("DifferentialPrivacy", CompressedDDPStrategy("sign"))  # doctest: +ELLIPSIS
    "DifferentialPrivacy cannot be combined with strategy 'ddp_sign': a compressed, error-fed ..."
    >>> refusal("Grokfast", CompressedDDPStrategy("sign")) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import Strategy

__all__ = [
    "CALLBACKS", "COMPRESSED", "LOCAL", "STRATEGIES", "TABLE", "Compatibility", "RefusedSetting",
    "check_supported", "refusal", "render_markdown", "strategy_key",
]

CALLBACKS = ("Grokfast", "GradES", "DropoutSchedule", "GradientSurgery", "DifferentialPrivacy")
LOCAL = ("local_sgd", "diloco", "diloco_x")
COMPRESSED = ("ddp_powersgd", "ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16")
STRATEGIES = ("ddp", *LOCAL, *COMPRESSED)


@dataclass(frozen=True)
class RefusedSetting:
    """A setting of the strategy under which a supported pair is refused all the same.

    Attributes:
        setting: the setting, as the user writes it (``"warmup_steps > 0"``).
        reason: why the pair's semantics do not hold under it.
        applies: whether a strategy object has the setting.
    """

    setting: str
    reason: str
    applies: Callable[[Any], bool] = field(compare=False)


@dataclass(frozen=True)
class Compatibility:
    """One callback x strategy pair.

    Attributes:
        supported: whether the pair trains.
        text: what the pair does (supported), or why it is refused.
        refused_settings: settings of the strategy refused even though the pair is supported.
    """

    supported: bool
    text: str
    refused_settings: tuple[RefusedSetting, ...] = ()


def _supported(text: str, *refused: RefusedSetting) -> Compatibility:
    return Compatibility(True, text, refused)


def _refused(reason: str) -> Compatibility:
    return Compatibility(False, reason)


def _replica_size(strategy: Any) -> int:
    return max(int(getattr(strategy, "replica_size", 1) or 1), int(getattr(strategy, "_replica_size_arg", 1) or 1))


_DP_NODE_REPLICAS = RefusedSetting(
    "node replicas (replica_size > 1)",
    "inside a replica DDP all-reduces the ranks' gradients every step before each rank's DP step, so a "
    "replica's update is no longer one DP-SGD step on its own shard and the parallel-composition argument "
    "fails (several nodes default to one replica per node: pass replica_size=1)",
    lambda s: _replica_size(s) > 1,
)
_DP_WARMUP = RefusedSetting(
    "warmup_steps > 0",
    "Local SGD's warm-up is plain DDP (gradients all-reduced every step), not DP-SGD run by each replica on its "
    "own shard (pass warmup_steps=0)",
    lambda s: int(getattr(s, "warmup_steps", 0) or 0) > 0,
)

_GROKFAST_LOCAL = (
    "Filters each rank's local gradient{extra}: the filter differs per rank and is saved and restored per rank "
    "(per-rank checkpoint files, `lightning_optx.checkpointing.per_rank_state`), so a resumed run continues each "
    "rank's own filter."
)
_GRADES_LOCAL_DECISION = (
    "The freeze decision uses the all-rank mean of the measured metric, so every rank freezes the same matrices "
    "at the same step; freezing never broadcasts weights (DDP is re-wrapped without its initial sync). "
)
_DROPOUT_OURS = (
    "The rate depends only on the optimizer step, the same on every rank. Each rank's random-number streams "
    "(its dropout masks) are saved and restored per rank (per-rank checkpoint files), so a resumed run draws "
    "the masks the uninterrupted one would."
)
_SURGERY_LOCAL = (
    "Surgery on each replica's own per-task gradients between syncs: no cross-rank all-reduce of task "
    "gradients (during Local SGD's warm-up and inside node replicas, each task's gradient is averaged over the "
    "group DDP would average over). The parameters are averaged at the syncs as usual."
)
_DP_LOCAL = (
    "Each replica runs DP-SGD on its own shard: Poisson sampling of its shard, full noise per replica, no "
    "gradient all-reduce. The {sync} post-process the replicas' released (noised) parameters and the shards "
    "are disjoint, so the run's epsilon is one replica's epsilon (parallel composition), which is what is "
    "logged."
)

_ENTRIES: dict[str, dict[str, Compatibility]] = {
    "Grokfast": {
        "ddp": _supported(
            "Filters the DDP-averaged gradient, the same on every rank: the filter is identical on every rank and "
            "rank 0's copy in the checkpoint restores all of them."),
        "local_sgd": _supported(_GROKFAST_LOCAL.format(extra=" (during Local SGD's warm-up, the averaged one)")),
        "diloco": _supported(_GROKFAST_LOCAL.format(extra=" in the inner steps (the outer step is left alone)")),
        "diloco_x": _supported(_GROKFAST_LOCAL.format(extra=" in the inner steps (the outer step is left alone)")),
        **{name: _supported(
            "Filters the decompressed averaged gradient (the one the optimizer steps with), the same on every "
            "rank: the filter is identical on every rank and rank 0's copy in the checkpoint restores all of "
            "them.") for name in COMPRESSED},
    },
    "GradES": {
        "ddp": _supported(
            "Measures the DDP-averaged gradients, so every rank freezes the same matrices at the same step; a "
            "freeze re-wraps DDP without broadcasting weights."),
        "local_sgd": _supported(_GRADES_LOCAL_DECISION + "Frozen matrices leave the periodic average."),
        **{name: _supported(
            _GRADES_LOCAL_DECISION + "Frozen matrices leave the outer step and the pseudo-gradient payload: their "
            "outer momentum is cleared and their global copy equals the frozen value.") for name in ("diloco",
                                                                                                 "diloco_x")},
        **{name: _supported(
            "Measures the decompressed averaged gradients, so every rank freezes the same matrices at the same "
            "step. Frozen matrices leave the compressed payload: the bytes per step fall with the frozen "
            "fraction.") for name in COMPRESSED},
    },
    "DropoutSchedule": {
        "ddp": _supported(
            "The rate depends only on the optimizer step, the same on every rank. Each rank's random-number "
            "streams (its dropout masks) are gathered into the checkpoint (a few kB per rank) and each rank "
            "takes its own back on resume."),
        **{name: _supported(_DROPOUT_OURS) for name in (*LOCAL, *COMPRESSED)},
    },
    "GradientSurgery": {
        "ddp": _supported(
            "Each task's gradient is averaged across ranks by the callback (DDP's own all-reduce is skipped), "
            "then surgery combines the averaged task gradients: the same update on every rank."),
        **{name: _supported(_SURGERY_LOCAL) for name in LOCAL},
        **{name: _supported(
            "Each task's gradient goes through the strategy's compressor with its own error-feedback state "
            "(residuals kept per task), then surgery combines the decompressed averages: T tasks send T times "
            "the compressed bytes, all counted by the ledger.") for name in COMPRESSED},
    },
    "DifferentialPrivacy": {
        "ddp": _supported(
            "Opacus' distributed DP-SGD: per-sample clipping on each rank's Poisson shard and one noised sum "
            "across ranks (DDP's own all-reduce is skipped); the logged epsilon is the accountant's for the "
            "whole run."),
        "local_sgd": _supported(_DP_LOCAL.format(sync="periodic averages"), _DP_WARMUP, _DP_NODE_REPLICAS),
        "diloco": _supported(_DP_LOCAL.format(sync="outer steps"), _DP_NODE_REPLICAS),
        "diloco_x": _supported(_DP_LOCAL.format(sync="outer steps (compressed or not)"), _DP_NODE_REPLICAS),
        **{name: _refused(
            "a compressed, error-fed per-rank message is not a post-processing of the noised sum: Opacus noises "
            "the sum of the ranks' clipped gradients once, and each rank's error-feedback residual carries its "
            "un-noised gradient into later messages, outside the accounted noise") for name in COMPRESSED[:3]},
        **{name: _refused(
            "a per-rank message rounded before the sum is not a post-processing of the noised sum: Opacus noises "
            "the sum of the ranks' clipped gradients once, and rounding each rank's un-noised part first lets one "
            "sample change the sum by more than max_grad_norm, the sensitivity the noise is calibrated to")
           for name in COMPRESSED[3:]},
    },
}

TABLE: dict[tuple[str, str], Compatibility] = {
    (callback, strategy): _ENTRIES[callback][strategy] for callback in CALLBACKS for strategy in STRATEGIES
}
"""Every ``(callback, strategy)`` pair, by the names in :data:`CALLBACKS` and :data:`STRATEGIES`."""


def strategy_key(strategy: Strategy) -> str | None:
    """The table name of a strategy object, or ``None`` for one the table does not cover.

    Lightning's ``DDPStrategy`` (``"ddp"``, ``"ddp_spawn"``, ...) is ``"ddp"``; ``LocalSGDStrategy`` is
    ``"local_sgd"``; ``DiLoCoStrategy`` is ``"diloco"``, or ``"diloco_x"`` with overlap or a compressor;
    ``CompressedDDPStrategy`` is ``"ddp_"`` + its compressor's name (``"ddp_fp16"`` / ``"ddp_bf16"`` for a cast).
    A single device, FSDP, DeepSpeed or another subclass of ``DDPStrategy``: ``None``.

    Examples:
        >>> from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
        >>> from lightning_optx import CompressedDDPStrategy
        >>> strategy_key(DDPStrategy()), strategy_key(CompressedDDPStrategy("bf16"))
        ('ddp', 'ddp_bf16')
        >>> strategy_key(SingleDeviceStrategy("cpu")) is None
        True
    """
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_optx.strategies import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy

    if isinstance(strategy, CompressedDDPStrategy):
        return "ddp_" + _compressor_name(strategy.compressor)
    if isinstance(strategy, DiLoCoStrategy):
        return "diloco_x" if strategy.overlap or strategy.compressor is not None else "diloco"
    if isinstance(strategy, LocalSGDStrategy):
        return "local_sgd"
    if type(strategy) is DDPStrategy:
        return "ddp"
    return None


def _compressor_name(compressor: Any) -> str:
    import torch

    name = str(getattr(compressor, "name", "compressor")).lower()
    dtype = getattr(compressor, "dtype", None)
    if name == "cast" and dtype in (torch.float16, torch.bfloat16):
        return "fp16" if dtype == torch.float16 else "bf16"
    return name


def _lookup(callback: str, strategy: str) -> Compatibility:
    """The table's entry; a compressor of the user's own counts as refused if any named compressor is."""
    if (callback, strategy) in TABLE:
        return TABLE[callback, strategy]
    entries = [TABLE[callback, name] for name in COMPRESSED]
    return next((e for e in entries if not e.supported), entries[0])


def _callback_key(callback: Callback | str) -> str | None:
    if isinstance(callback, str):
        return callback if callback in CALLBACKS else None
    return next((cls.__name__ for cls in type(callback).__mro__ if cls.__name__ in CALLBACKS), None)


def refusal(callback: Callback | str, strategy: Strategy) -> str | None:
    """The error message if ``callback`` (an instance or a name in :data:`CALLBACKS`) refuses ``strategy``, else
    ``None`` (supported, or outside the table)."""
    table_callback = _callback_key(callback)
    name = strategy_key(strategy)
    if table_callback is None or name is None:
        return None
    shown = callback if isinstance(callback, str) else type(callback).__name__
    entry = _lookup(table_callback, name)
    if not entry.supported:
        return f"{shown} cannot be combined with strategy {name!r}: {entry.text}."
    for refused in entry.refused_settings:
        if refused.applies(strategy):
            return f"{shown} cannot be combined with strategy {name!r} with {refused.setting}: {refused.reason}."
    return None


def check_supported(callback: Callback, trainer: pl.Trainer) -> None:
    """Raise ``ValueError`` if the table refuses ``callback`` under ``trainer.strategy`` (call it in ``setup``).

    Examples:
        >>> from types import SimpleNamespace
        >>> from lightning_optx import CompressedDDPStrategy, DifferentialPrivacy
        >>> trainer = SimpleNamespace(strategy=CompressedDDPStrategy("powersgd"))
        >>> check_supported(DifferentialPrivacy(noise_multiplier=1.0), trainer)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: DifferentialPrivacy cannot be combined with strategy 'ddp_powersgd': a compressed, error-fed ...
    """
    message = refusal(callback, trainer.strategy)
    if message is not None:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------- rendering

_HEADER = """\
# Compatibility: callbacks x strategies

<!-- Generated by `python scripts/render_compatibility.py` from the table in lightning_optx/compatibility.py:
edit the table, not this file (tests/test_compatibility.py checks that they agree). -->

Every callback with every data-parallel strategy: **supported**, with what the pair does, or **refused**,
with the reason. The same table (`lightning_optx.compatibility.TABLE`) is checked by each callback at
set-up, so a refused pair fails before any optimizer step with a `ValueError` naming the callback, the
strategy and the reason, and it drives the matrix test (`tests/integration/test_matrix.py`), which trains
every supported pair on 2 processes, checks its semantics, resumes it bit for bit from a checkpoint taken
between two synchronisations, and checks that every refused pair and setting fails at set-up.

Strategy names are the ones `import lightning_optx` registers (`Trainer(strategy="local_sgd")`). A strategy
object counts by its configuration: a `DiLoCoStrategy` with `overlap=True` or a compressor is `diloco_x`,
`CompressedDDPStrategy(c)` is `ddp_<c>` (a compressor of your own counts as refused wherever a named one
is). Single-device training has nothing to check; FSDP, DeepSpeed and other strategies are outside the
table and left to each callback's own checks.
"""


_FOOTER = """\
## In code

```python
from lightning_optx.compatibility import TABLE, refusal

TABLE["GradES", "diloco"].text                          # what the pair does
refusal("DifferentialPrivacy", trainer.strategy)        # the error message, or None if supported
```

::: lightning_optx.compatibility.strategy_key

::: lightning_optx.compatibility.check_supported

::: lightning_optx.compatibility.refusal
"""


def _mark(entry: Compatibility) -> str:
    if not entry.supported:
        return "refused"
    return "yes, with limits" if entry.refused_settings else "yes"


def _groups(callback: str) -> list[tuple[list[str], Compatibility]]:
    """The callback's strategies grouped by identical entries, in table order."""
    groups: list[tuple[list[str], Compatibility]] = []
    for name in STRATEGIES:
        entry = TABLE[callback, name]
        same = next((names for names, other in groups if other == entry), None)
        if same is None:
            groups.append(([name], entry))
        else:
            same.append(name)
    return groups


def _code(names: Iterable[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def render_markdown() -> str:
    """``docs/compatibility.md``: the summary grid, then each callback's semantics and refusals."""
    lines = [_HEADER, "## Summary", ""]
    lines.append("| callback | " + " | ".join(f"`{s}`" for s in STRATEGIES) + " |")
    lines.append("| --- |" + " --- |" * len(STRATEGIES))
    for callback in CALLBACKS:
        lines.append(f"| {callback} | " + " | ".join(_mark(TABLE[callback, s]) for s in STRATEGIES) + " |")
    lines.append("")
    lines.append('"yes, with limits": supported, but some settings of the strategy are refused (listed below).')
    for callback in CALLBACKS:
        lines += ["", f"## {callback}", "", "| strategies | |", "| --- | --- |"]
        for names, entry in _groups(callback):
            text = entry.text if entry.supported else f"**Refused**: {entry.text}."
            for refused in entry.refused_settings:
                text += f" **Refused with {refused.setting}**: {refused.reason}."
            lines.append(f"| {_code(names)} | {text} |")
    lines += ["", _FOOTER.rstrip()]
    return "\n".join(lines) + "\n"
