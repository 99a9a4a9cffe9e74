"""The compatibility table: complete, mapped from strategy objects, checked by every callback, rendered to the docs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_optx import (
    CompressedDDPStrategy,
    DiLoCoStrategy,
    DropoutSchedule,
    EarlyDropout,
    GradES,
    GradientSurgery,
    Grokfast,
    LocalSGDStrategy,
)
from lightning_optx import compatibility as C
from lightning_optx.compression import Cast, TopK
from lightning_optx.strategies import _REGISTERED

ROOT = Path(__file__).resolve().parents[1]


def make_callbacks() -> dict[str, object]:
    from lightning_optx import DifferentialPrivacy

    return {"Grokfast": Grokfast(), "GradES": GradES(tau=0.1), "DropoutSchedule": DropoutSchedule(),
            "GradientSurgery": GradientSurgery(), "DifferentialPrivacy": DifferentialPrivacy(noise_multiplier=1.0)}


def test_the_table_holds_every_pair_with_a_text():
    assert set(C.TABLE) == {(c, s) for c in C.CALLBACKS for s in C.STRATEGIES}
    assert len(C.TABLE) == 45
    for (callback, strategy), entry in C.TABLE.items():
        assert entry.text.strip() and "|" not in entry.text, (callback, strategy)
        assert entry.supported or not entry.refused_settings


def test_the_strategy_names_are_the_registered_ones():
    assert set(C.STRATEGIES) - {"ddp"} == set(_REGISTERED)


@pytest.mark.parametrize("name", sorted(_REGISTERED))
def test_every_registered_strategy_maps_to_its_own_name(name):
    strategy = StrategyRegistry.get(name)
    assert C.strategy_key(strategy) == name


@pytest.mark.parametrize(("strategy", "key"), [
    (DDPStrategy(), "ddp"),
    (StrategyRegistry.get("ddp_spawn"), "ddp"),
    (StrategyRegistry.get("ddp_find_unused_parameters_true"), "ddp"),
    (SingleDeviceStrategy("cpu"), None),
    (LocalSGDStrategy(period=3, warmup_steps=5), "local_sgd"),
    (DiLoCoStrategy(inner_steps=4, fragments=2), "diloco"),
    (DiLoCoStrategy(inner_steps=4, overlap=True), "diloco_x"),
    (DiLoCoStrategy(inner_steps=4, compressor="topk"), "diloco_x"),
    (CompressedDDPStrategy(Cast(torch.bfloat16)), "ddp_bf16"),
    (CompressedDDPStrategy(TopK(density=0.5)), "ddp_topk"),
    (type("MyDDP", (DDPStrategy,), {})(), None),  # a DDPStrategy of the user's own: outside the table
])
def test_strategy_objects_map_by_their_configuration(strategy, key):
    assert C.strategy_key(strategy) == key


def test_fsdp_is_outside_the_table():
    from lightning.pytorch.strategies import FSDPStrategy

    assert C.strategy_key(FSDPStrategy()) is None


def test_refused_pair_message_names_callback_strategy_and_reason():
    callbacks = make_callbacks()
    trainer = SimpleNamespace(strategy=CompressedDDPStrategy("sign"))
    with pytest.raises(ValueError) as info:
        C.check_supported(callbacks["DifferentialPrivacy"], trainer)
    assert str(info.value) == (f"DifferentialPrivacy cannot be combined with strategy 'ddp_sign': "
                               f"{C.TABLE['DifferentialPrivacy', 'ddp_sign'].text}.")
    for name in ("Grokfast", "GradES", "DropoutSchedule", "GradientSurgery"):
        C.check_supported(callbacks[name], trainer)  # supported: no error


@pytest.mark.parametrize(("strategy", "setting"), [
    (LocalSGDStrategy(period=2, warmup_steps=1), "warmup_steps > 0"),
    (LocalSGDStrategy(period=2, replica_size=2), "node replicas (replica_size > 1)"),
    (DiLoCoStrategy(inner_steps=2, replica_size=2), "node replicas (replica_size > 1)"),
    (DiLoCoStrategy(inner_steps=2, overlap=True, replica_size=4), "node replicas (replica_size > 1)"),
])
def test_refused_settings_of_a_supported_pair(strategy, setting):
    message = C.refusal("DifferentialPrivacy", strategy)
    assert message is not None and setting in message and message.startswith("DifferentialPrivacy cannot")
    assert C.refusal("DifferentialPrivacy", LocalSGDStrategy(period=2)) is None
    assert C.refusal("Grokfast", strategy) is None


def test_a_compressor_of_ones_own_is_refused_wherever_a_named_one_is():
    class Halve(Cast):
        name = "halve"

    strategy = CompressedDDPStrategy(Halve(torch.float16))
    assert C.strategy_key(strategy) == "ddp_halve"
    assert "cannot be combined with strategy 'ddp_halve'" in (C.refusal("DifferentialPrivacy", strategy) or "")
    assert C.refusal("Grokfast", strategy) is None


def test_a_subclass_is_checked_as_its_table_callback():
    message = C.refusal(EarlyDropout(), CompressedDDPStrategy("fp16"))
    assert message is None
    assert C.refusal(object(), CompressedDDPStrategy("fp16")) is None  # not one of ours


@pytest.mark.parametrize("name", ["Grokfast", "GradES", "DropoutSchedule", "GradientSurgery", "DifferentialPrivacy"])
def test_every_callback_checks_the_table_first_in_setup(name, monkeypatch):
    """Each callback's setup(stage="fit") consults the table before anything else (here: a pair made refused)."""
    monkeypatch.setitem(C.TABLE, (name, "ddp_fp16"), C.Compatibility(False, "a reason for this test"))
    callback = make_callbacks()[name]
    trainer = SimpleNamespace(strategy=CompressedDDPStrategy("fp16"))
    with pytest.raises(ValueError, match=f"^{name} cannot be combined with strategy 'ddp_fp16': a reason for this"):
        callback.setup(trainer, torch.nn.Module(), "fit")  # type: ignore[attr-defined]
    callback.setup(trainer, torch.nn.Module(), "validate")  # type: ignore[attr-defined]  (other stages: no check)


def test_docs_page_is_rendered_from_the_table():
    page = (ROOT / "docs" / "compatibility.md").read_text()
    assert page == C.render_markdown(), "docs/compatibility.md is stale: run python scripts/render_compatibility.py"


def test_rendered_page_shows_every_pair():
    text = C.render_markdown()
    for callback in C.CALLBACKS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {callback} |"))
        assert row.count("|") == len(C.STRATEGIES) + 2
        assert f"## {callback}" in text
    assert "| refused |" in text


def test_doctests():
    import doctest

    result = doctest.testmod(C, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
