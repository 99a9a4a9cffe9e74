"""The grokking demo (``make demo``): presets, the data, and a short end-to-end run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import grokking as G


def test_demo_preset_is_the_default_and_flags_override_it():
    args = G.parse_args([])
    assert (args.preset, args.model, args.train_fraction, args.lamb) == ("demo", "mlp", 0.3, 5.0)
    args = G.parse_args(["--preset", "transformer", "--weight-decay", "0.01"])
    assert (args.model, args.train_fraction, args.weight_decay) == ("transformer", 0.5, 0.01)


@pytest.mark.parametrize("flag", ["--steps", "--val-every", "--batch-size", "--threads"])
def test_non_positive_counts_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        G.parse_args([flag, "0"])
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("operation", ["add", "mul"])
def test_modular_data_holds_every_equation_once_with_the_right_answer(operation):
    data = G.modular_data(p=7, train_fraction=0.5, seed=0, operation=operation)
    x = torch.cat([data.x_train, data.x_val])
    y = torch.cat([data.y_train, data.y_val])
    assert len(x) == 49 and len({(int(a), int(b)) for a, _, b, _ in x}) == 49
    expected = (x[:, 0] + x[:, 2]) % 7 if operation == "add" else (x[:, 0] * x[:, 2]) % 7
    assert torch.equal(y, expected)


def test_first_step_reads_the_history():
    history = [{"step": 50, "train_acc": 0.5, "val_acc": 0.0}, {"step": 100, "train_acc": 0.995, "val_acc": 0.2}]
    assert G.first_step(history, "train_acc", 0.99) == 100
    assert G.first_step(history, "val_acc", 0.95) is None


def test_a_short_demo_run_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    G.main(["--steps", "40", "--val-every", "20", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "baseline" in out and "grokfast-ema" in out and "memorised" in out
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
