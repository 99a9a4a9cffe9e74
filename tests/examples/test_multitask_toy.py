"""The CAGrad toy problem example: closed-form gradients, Adam, and the methods' updates on it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_optx.functional.surgery import make_aggregator


def _load_example() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "examples" / "multitask_toy.py"
    spec = importlib.util.spec_from_file_location("multitask_toy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = _load_example()


@pytest.mark.parametrize("point", [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (0.3, -8.2), (-3.0, 0.7), (5.0, -1.5)])
def test_closed_form_gradients_equal_autograd(point):
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    losses = toy.toy_losses(x)
    expected = torch.stack([torch.autograd.grad(losses[t], x, retain_graph=True)[0] for t in range(2)])
    got = torch.tensor(toy.task_gradients(*point), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_adam_matches_torch_adam():
    torch.manual_seed(0)
    x_torch = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([x_torch], lr=1e-2)
    x = [1.0, -2.0]
    ours = toy._Adam(1e-2)
    for _ in range(50):
        grad = torch.randn(2, dtype=torch.float64)
        x_torch.grad = grad.clone()
        reference.step()
        ours.step(x, grad.tolist())
    torch.testing.assert_close(torch.tensor(x, dtype=torch.float64), x_torch.detach(), rtol=1e-12, atol=1e-12)


def test_pcgrad_on_two_tasks_is_the_papers_closed_form():
    # The CAGrad toy code's 2-task PCGrad: when g1.g2 < 0, ((1 - g12/g11) g1 + (1 - g12/g22) g2) / 2 (a mean);
    # our PCGrad sums the projected gradients, hence the factor 2.
    g1, g2 = toy.task_gradients(1.0, -7.5)
    grads = torch.tensor([g1, g2], dtype=torch.float64)
    g11, g12, g22 = grads[0] @ grads[0], grads[0] @ grads[1], grads[1] @ grads[1]
    assert g12 < 0  # the two losses conflict at this start point
    expected = (1 - g12 / g11) * grads[0] + (1 - g12 / g22) * grads[1]
    torch.testing.assert_close(make_aggregator("pcgrad")(grads, step=0), expected, rtol=1e-9, atol=1e-12)


def test_sum_and_mean_follow_the_same_adam_path():
    # Adam is invariant to scaling the gradient by 2 (up to eps): summed and averaged gradients agree.
    path_sum = toy.run_trajectory("sum", (-8.5, -5.0), steps=300, lr=1e-3)
    path_mean = toy.run_trajectory("mean", (-8.5, -5.0), steps=300, lr=1e-3)
    torch.testing.assert_close(path_sum, path_mean, rtol=0, atol=1e-6)


def test_distance_to_pareto_set():
    assert toy.distance_to_pareto_set(torch.tensor([0.0, toy.PARETO_X2], dtype=torch.float64)) == 0.0
    assert math.isclose(toy.distance_to_pareto_set(torch.tensor([10.0, toy.PARETO_X2 + 4.0], dtype=torch.float64)), 5.0)


def test_main_writes_json_and_plot(tmp_path):
    result = toy.main(["--steps", "20", "--methods", "sum,cagrad", "--out-dir", str(tmp_path)])
    assert set(result["runs"]) == {"sum", "cagrad"}
    assert (tmp_path / "toy.json").is_file() and (tmp_path / "trajectories.png").stat().st_size > 10_000
    assert all(len(runs) == 3 for runs in result["runs"].values())


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit):
        toy.parse_args(["--methods", "nash"])
