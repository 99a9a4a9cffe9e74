"""The two-objective toy problem of the CAGrad paper, solved by every gradient-surgery method we ship.

What it shows: two losses ``L1, L2`` of a point ``x = (x1, x2)`` whose Pareto set is the segment
``x1 in [-7, 7], x2 = -8.3552`` (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task
Learning", Fig. 1; the same problem opens the Nash-MTL paper). From the paper's three start points, Adam
(lr 1e-3) follows the update each method makes out of the two task gradients. Where the two gradients
conflict strongly and differ in size, the summed (or averaged) gradient is dominated by one task and
creeps along a valley, far from the Pareto set; PCGrad and CAGrad remove the conflicting parts and walk
to the Pareto set. Every update goes through ``lightning_optx.functional.surgery.make_aggregator``, the
same code the ``GradientSurgery`` callback runs on a network's shared parameters.

Run::

    python examples/multitask_toy.py                       # all methods, 3 start points, plot + JSON
    python examples/multitask_toy.py --steps 20000         # shorter trajectories (the paper runs 100,000)
    python examples/multitask_toy.py --methods sum,pcgrad,cagrad

It writes ``trajectories.png`` (each method's paths over the contours of ``(L1 + L2) / 2``, the Pareto set
in grey) and ``toy.json`` (per method and start point: the end point, its distance to the Pareto set, the
average loss and the first step within 0.1 of the Pareto set) under ``--out-dir`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_optx.functional.surgery import make_aggregator

METHODS = ("sum", "mean", "pcgrad", "cagrad", "sam_gs", "gcond")
START_POINTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))  # the paper's three initialisations
PARETO_X2 = -8.3552  # the Pareto set is {(x1, PARETO_X2) : -7 <= x1 <= 7} (from the paper's plotting code)
PARETO_X1 = (-7.0, 7.0)
NEAR_PARETO = 0.1
_FLOOR = 5e-6  # the log's argument is clamped here, as in the paper's code


def toy_losses(x: Tensor) -> Tensor:
    """The two losses at points ``x`` of shape ``(..., 2)``; returns shape ``(..., 2)``.

    Above the x1 axis each loss is a log-valley, below it a shallow quadratic bowl; ``tanh`` gates blend
    the two halves. ``L1`` pulls towards ``x1 = 7``, ``L2`` towards ``x1 = -7``.
    """
    x1, x2 = x[..., 0], x[..., 1]
    valley1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), _FLOOR).log() + 6
    valley2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), _FLOOR).log() + 6
    bowl1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    bowl2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    upper = torch.clamp(torch.tanh(x2 * 0.5), 0)
    lower = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return torch.stack([valley1 * upper + bowl1 * lower, valley2 * upper + bowl2 * lower], dim=-1)


def task_gradients(x1: float, x2: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Each loss's gradient at ``(x1, x2)``, in closed form (equal to autograd of :func:`toy_losses`).

    Plain floats: per step this is ~100x cheaper than an autograd call, so the paper's 100,000 steps per
    trajectory run in minutes; ``tests/examples/test_multitask_toy.py`` checks it against autograd.
    """
    t2, th = math.tanh(x2), math.tanh(x2 / 2)
    u1 = -0.5 * x1 - 3.5 + t2
    u2 = -0.5 * x1 + 3.5 - t2
    valley1 = math.log(max(abs(u1), _FLOOR)) + 6
    valley2 = math.log(max(abs(u2), _FLOOR)) + 6
    d_valley1 = (-0.5 / u1, (1 - t2 * t2) / u1) if abs(u1) > _FLOOR else (0.0, 0.0)
    d_valley2 = (-0.5 / u2, -(1 - t2 * t2) / u2) if abs(u2) > _FLOOR else (0.0, 0.0)
    bowl1 = ((7 - x1) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    bowl2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    d_bowl1 = (-(7 - x1) / 5, (x2 + 8) / 50)
    d_bowl2 = ((x1 + 7) / 5, (x2 + 8) / 50)
    upper, lower = max(th, 0.0), max(-th, 0.0)
    d_upper = 0.5 * (1 - th * th) if th > 0 else 0.0
    d_lower = -0.5 * (1 - th * th) if th < 0 else 0.0

    def blend(valley: float, d_valley: tuple[float, float], bowl: float, d_bowl: tuple[float, float]):
        return (
            d_valley[0] * upper + d_bowl[0] * lower,
            d_valley[1] * upper + valley * d_upper + d_bowl[1] * lower + bowl * d_lower,
        )

    return blend(valley1, d_valley1, bowl1, d_bowl1), blend(valley2, d_valley2, bowl2, d_bowl2)


class _Adam:
    """``torch.optim.Adam``'s update (defaults: betas (0.9, 0.999), eps 1e-8) on a 2-vector of floats."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m, self.v, self.t = [0.0, 0.0], [0.0, 0.0], 0

    def step(self, x: list[float], grad: list[float]) -> None:
        (b1, b2), self.t = self.betas, self.t + 1
        for i, g in enumerate(grad):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            step_size = self.lr / (1 - b1**self.t)
            denom = math.sqrt(self.v[i]) / math.sqrt(1 - b2**self.t) + self.eps
            x[i] -= step_size * self.m[i] / denom


def distance_to_pareto_set(x: Tensor) -> float:
    """Euclidean distance from ``x`` to the Pareto segment."""
    x1 = min(max(float(x[0]), PARETO_X1[0]), PARETO_X1[1])
    return math.hypot(float(x[0]) - x1, float(x[1]) - PARETO_X2)


def run_trajectory(method: str, start: tuple[float, float], steps: int, lr: float) -> Tensor:
    """Adam on ``x`` with the update ``method`` makes from the two task gradients; returns ``(steps + 1, 2)``."""
    x = list(start)
    optimizer = _Adam(lr)
    aggregate = make_aggregator(method)
    path = [tuple(x)]
    for step in range(steps):
        grads = torch.tensor(task_gradients(x[0], x[1]), dtype=torch.float64)
        optimizer.step(x, aggregate(grads, step=step).tolist())
        path.append(tuple(x))
    return torch.tensor(path, dtype=torch.float64)


def summarise(path: Tensor) -> dict[str, Any]:
    """End point, its distance to the Pareto set and average loss, and the first step near the Pareto set."""
    end = path[-1]
    first_near = next((i for i, point in enumerate(path) if distance_to_pareto_set(point) <= NEAR_PARETO), None)
    return {
        "end": [round(float(v), 4) for v in end],
        "distance_to_pareto_set": round(distance_to_pareto_set(end), 4),
        "mean_loss": round(float(toy_losses(end).mean()), 4),
        "first_step_near_pareto_set": first_near,
    }


def plot(trajectories: dict[str, list[Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-11, 11, 300, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    mean_loss = toy_losses(torch.stack([xx, yy], dim=-1)).mean(-1)
    columns = 3
    rows = math.ceil(len(trajectories) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.0 * rows), squeeze=False)
    for ax, (method, paths) in zip(axes.flat, trajectories.items()):
        ax.contour(xx.numpy(), yy.numpy(), mean_loss.numpy(), levels=20, cmap="viridis", linewidths=0.8)
        ax.plot(PARETO_X1, (PARETO_X2, PARETO_X2), color="grey", linewidth=6, alpha=0.6, zorder=1)
        for start, trajectory in zip(START_POINTS, paths):
            ax.plot(trajectory[:, 0].numpy(), trajectory[:, 1].numpy(), color="tab:red", linewidth=1.5, zorder=3)
            ax.plot(*start, marker="o", color="black", markersize=6, zorder=4)
            ax.plot(*trajectory[-1].tolist(), marker="x", color="tab:red", markersize=8, zorder=5)
        ax.set_title(method)
        ax.set_xlim(-11, 11)
        ax.set_ylim(-11, 11)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(trajectories):]:
        ax.axis("off")
    fig.suptitle("CAGrad toy problem: contours of (L1 + L2) / 2, Pareto set in grey, Adam lr 1e-3")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--steps", type=int, default=100_000, help="Adam steps per trajectory (the paper's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's)")
    parser.add_argument("--out-dir", default="runs/multitask_toy")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: {unknown or 'empty'} not among {METHODS}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trajectories: dict[str, list[Tensor]] = {}
    results: dict[str, Any] = {"steps": args.steps, "lr": args.lr, "start_points": START_POINTS, "runs": {}}
    print(f"{'method':8s} {'start':>14s} {'end':>18s} {'dist to Pareto':>15s} {'mean loss':>10s} {'first near':>11s}")
    for method in args.methods:
        began = time.perf_counter()
        trajectories[method] = [run_trajectory(method, start, args.steps, args.lr) for start in START_POINTS]
        summaries = [summarise(path) for path in trajectories[method]]
        results["runs"][method] = summaries
        for start, summary in zip(START_POINTS, summaries):
            end = f"({summary['end'][0]:.2f}, {summary['end'][1]:.2f})"
            near = summary["first_step_near_pareto_set"]
            print(f"{method:8s} {start!s:>14s} {end:>18s} {summary['distance_to_pareto_set']:15.3f} "
                  f"{summary['mean_loss']:10.3f} {near if near is not None else 'never':>11}")
        print(f"  ({method}: {time.perf_counter() - began:.0f}s)", flush=True)
    (out_dir / "toy.json").write_text(json.dumps(results, indent=1))
    plot(trajectories, out_dir / "trajectories.png")
    print(f"plot: {out_dir / 'trajectories.png'}\njson: {out_dir / 'toy.json'}")
    return results


if __name__ == "__main__":
    main()
