"""Strategy specs for the planner: every registered flag's defaults, and options parsed and checked strictly.

An option is checked as the strategy itself would check it (the same ``check_*`` functions of
:mod:`lightning_optx.functional`, and the compressor's own constructor), even when the planner ignores its value,
so that ``plan`` rejects what ``Trainer(strategy=...)`` would reject.

Examples:
    >>> StrategySpec.parse("diloco:inner_steps=100,overlap=yes,compressor=topk,density=0.05").resolved()["overlap"]
    True
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from lightning_optx.compression import COMPRESSORS, Cast, get_compressor
from lightning_optx.functional.diloco import check_diloco_args
from lightning_optx.functional.local_sgd import check_period_args

__all__ = ["IGNORED_OPTIONS", "OPTION_KINDS", "SPARSE_COLLECTIVES", "STRATEGY_DEFAULTS", "StrategySpec"]

SPARSE_COLLECTIVES = ("all_gather", "two_stage")

# What the planner models of each registered flag, with the defaults of the strategy classes (tests assert they
# equal the registered classes' signatures and init params). `replica_size` is None: one node's GPUs per replica
# when there are several nodes, else 1 (the node-replica design of the scale issue). `optimizer_state_tensors`
# (planner only) is how many floating tensors per parameter `average_optimizer_state` averages: 2 for AdamW's
# moments, 1 for SGD with momentum, 0 for plain SGD.
_COMPRESSED: dict[str, Any] = {"compressor_options": {}}
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddp": {},
    "local_sgd": {"period": 8, "average_buffers": True, "average_optimizer_state": False, "replica_size": None,
                  "optimizer_state_tensors": 2},
    "ddp_powersgd": {"compressor": "powersgd", **_COMPRESSED},
    "ddp_topk": {"compressor": "topk", **_COMPRESSED},
    "ddp_sign": {"compressor": "sign", **_COMPRESSED},
    "ddp_fp16": {"compressor": "fp16", **_COMPRESSED},
    "ddp_bf16": {"compressor": "bf16", **_COMPRESSED},
    "diloco": {"inner_steps": 500, "overlap": False, "compressor": None, "compressor_options": {}, "fragments": 1,
               "replica_size": None},
    "diloco_x": {"inner_steps": 500, "overlap": True, "compressor": "powersgd", "compressor_options": {"rank": 8},
                 "fragments": 1, "replica_size": None},
}
# Strategy arguments accepted, checked, and otherwise ignored: they change no byte of the steady state (warm-up,
# learning rates, error feedback; adaptive compression is planned at its starting level).
_DILOCO_IGNORED = ("outer_optimizer", "outer_lr", "outer_momentum", "error_feedback", "adaptive_compression",
                   "compression_bounds")
IGNORED_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddp": (),
    "local_sgd": ("warmup_steps", "min_period"),
    **{f: ("error_feedback", "check_finite") for f in ("ddp_powersgd", "ddp_topk", "ddp_sign", "ddp_fp16", "ddp_bf16")},
    "diloco": _DILOCO_IGNORED,
    "diloco_x": _DILOCO_IGNORED,
}

# The type of every strategy option ("?" suffix: None allowed); compressor options are checked by the compressor.
OPTION_KINDS: dict[str, str] = {
    "period": "int", "warmup_steps": "int", "min_period": "int", "qsr_alpha": "float?", "average_buffers": "bool",
    "average_optimizer_state": "bool", "replica_size": "int?", "optimizer_state_tensors": "int",
    "compressor": "str?", "error_feedback": "bool", "check_finite": "bool?", "inner_steps": "int",
    "outer_optimizer": "str", "outer_lr": "float", "outer_momentum": "float", "overlap": "bool",
    "adaptive_compression": "bool", "fragments": "int", "compression_bounds": "bounds?",
}
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy flag and options that override its defaults (strategy or compressor options).

    Strategy options are typed (booleans are ``true``/``false``, ``yes``/``no`` or ``1``/``0``); other keys go
    to the compressor. ``compression_bounds`` is written ``low:high``.

    Examples:
        >>> StrategySpec.parse("diloco:inner_steps=100,compressor=topk,density=0.05").options
        {'inner_steps': 100, 'compressor': 'topk', 'density': 0.05}
    """

    flag: str
    options: dict[str, Any] = field(default_factory=dict)
    sparse_collective: str = "two_stage"

    @classmethod
    def parse(cls, text: str, sparse_collective: str = "two_stage") -> StrategySpec:
        flag, _, rest = text.partition(":")
        options: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"option {item!r} of {flag!r} must be written key=value")
            options[key.strip()] = _parse_value(value.strip())
        return cls(flag.strip(), options, sparse_collective)

    @property
    def label(self) -> str:
        if not self.options:
            return self.flag
        return self.flag + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())

    def resolved(self) -> dict[str, Any]:
        """Defaults updated by the options; unknown keys go to the compressor. Raises ``ValueError``."""
        if self.flag not in STRATEGY_DEFAULTS:
            raise ValueError(f"unknown strategy {self.flag!r}; known: {', '.join(STRATEGY_DEFAULTS)}")
        if self.sparse_collective not in SPARSE_COLLECTIVES:
            raise ValueError(f"`sparse_collective` must be one of {SPARSE_COLLECTIVES}, got {self.sparse_collective!r}")
        settings = dict(STRATEGY_DEFAULTS[self.flag])
        ignored: dict[str, Any] = {}
        compressor_options = dict(settings.get("compressor_options") or {})
        if "compressor" in self.options and self.options["compressor"] != settings.get("compressor"):
            compressor_options = {}  # the registered options belong to the registered compressor
        for key, raw in self.options.items():
            known = key in settings and key != "compressor_options"
            if key in IGNORED_OPTIONS[self.flag] or (key == "qsr_alpha" and self.flag == "local_sgd"):
                ignored[key] = _typed(self.flag, key, raw)
            elif known:
                settings[key] = _typed(self.flag, key, raw)
            elif "compressor" in settings:
                compressor_options[key] = raw
            else:
                names = ", ".join(k for k in settings if k != "compressor_options") or "none"
                raise ValueError(f"unknown option {key!r} for {self.flag!r}; known: {names}")
        if ignored.get("qsr_alpha") is not None:
            raise ValueError("qsr_alpha is not modeled (the period follows the learning rate); plan with the "
                             "period you expect instead")
        _check_strategy(self.flag, settings, ignored)
        if "compressor" in settings:
            settings["compressor_options"] = compressor_options
            if settings["compressor"] is None and compressor_options:
                names = ", ".join(k for k in settings if k != "compressor_options")
                raise ValueError(f"unknown option {sorted(compressor_options)[0]!r} for {self.flag!r} without a "
                                 f"compressor; known: {names}")
            _check_compressor(self.flag, settings)
        return settings


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false", "yes", "no"):
        return _BOOLEANS[lowered]
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _typed(flag: str, key: str, value: Any) -> Any:
    """``value`` as option ``key``'s type, or ``ValueError`` naming the strategy, the option and the value."""
    kind = OPTION_KINDS[key]
    if kind.endswith("?") and value is None:
        return None
    kind = kind.rstrip("?")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if (isinstance(value, int) and value in (0, 1)) or (isinstance(value, str) and value.lower() in _BOOLEANS):
            return _BOOLEANS[str(value).lower()]
        expected = "true or false (yes/no, 1/0)"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        expected = "a finite number"
    elif kind == "str":
        if isinstance(value, str):
            return value
        expected = "a name"
    else:  # bounds: "low:high" or a pair
        pair = value.split(":") if isinstance(value, str) else value
        try:
            low, high = (float(v) for v in pair)
            if 0 < low <= high < math.inf:
                return (low, high)
        except (TypeError, ValueError):
            pass
        expected = "low:high with 0 < low <= high"
    raise ValueError(f"{flag}: `{key}` must be {expected}, got {key}={value!r}")


def _check_strategy(flag: str, settings: dict[str, Any], ignored: dict[str, Any]) -> None:
    """The strategy's own checks (the functional ``check_*``), on modeled and ignored options alike."""
    try:
        if flag == "local_sgd":
            check_period_args(settings["period"], ignored.get("warmup_steps", 0), None, ignored.get("min_period", 1))
            if settings["optimizer_state_tensors"] < 0:
                raise ValueError("`optimizer_state_tensors` must be an integer >= 0, got "
                                 f"optimizer_state_tensors={settings['optimizer_state_tensors']}.")
        elif "inner_steps" in settings:
            check_diloco_args(settings["inner_steps"], ignored.get("outer_optimizer", "nesterov"),
                              ignored.get("outer_lr", 0.7), ignored.get("outer_momentum", 0.9), settings["fragments"])
            adaptive = ignored.get("adaptive_compression", flag == "diloco_x")
            if adaptive and str(settings["compressor"]).lower() not in ("powersgd", "topk"):
                raise ValueError("`adaptive_compression=True` needs a PowerSGD or top-k compressor, got "
                                 f"compressor={settings['compressor']!r}.")
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _check_compressor(flag: str, settings: dict[str, Any]) -> None:
    """Build the compressor once, rewording its errors to name the strategy and the option."""
    name = settings["compressor"]
    if name is None:
        return
    if str(name).lower() not in COMPRESSORS:
        raise ValueError(f"{flag}: compressor must be None or one of {sorted(COMPRESSORS)}, got compressor={name!r}")
    try:
        get_compressor(name, **settings["compressor_options"])
    except TypeError:
        cls: Any = Cast if name in ("fp16", "bf16") else COMPRESSORS[str(name).lower()]
        allowed = [p for p in inspect.signature(cls).parameters if p not in ("dtype", "error_feedback")]
        unknown = sorted(set(settings["compressor_options"]) - set(allowed))
        if not unknown:
            raise ValueError(f"{flag}: the {name} compressor rejects {settings['compressor_options']!r}") from None
        raise ValueError(f"unknown option {unknown[0]!r} for {flag!r}; known: "
                         f"{', '.join(k for k in STRATEGY_DEFAULTS[flag] if k != 'compressor_options')}, and the "
                         f"{name} compressor's {', '.join(allowed)}") from None
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
