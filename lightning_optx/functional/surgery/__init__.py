"""Gradient surgery for multi-task learning: combine T task gradients of the shared parameters into one.

Every function takes ``grads`` of shape ``(T, n)``: row ``t`` is task ``t``'s gradient of the shared
parameters, flattened. The result has shape ``(n,)`` and the dtype of ``grads``; the arithmetic runs in
float32 (or float64 for float64 input) on the device of ``grads``.

* ``pcgrad``: PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): each task gradient is
  projected onto the normal plane of every other task gradient it conflicts with, in a random order.
* ``cagrad``: CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"): the
  update that maximises the worst task's improvement within a ball around the mean gradient.
* ``sam_gs``: SAM-GS (Borsani et al. 2025, "Gradient Similarity Surgery in Multi-Task Deep Learning"):
  gradient magnitude similarity decides between gradient equalisation and momentum modulation.
* ``gcond``: GCond (Gradient Conductor, "GCond: Gradient Conflict Resolution via Accumulation-based
  Stabilization for Large-Scale Multi-Task Learning"): iterative PCGrad-style resolution of the worst
  conflicting pair, with an arbitrator that picks which task yields, and momentum on the result.
* ``sum`` and ``mean``: the plain row sum and row mean, the baselines.

Every method works in the ``T x T`` Gram space (shared helpers in ``_gram_space.py``): one float64 Gramian
of the task gradients, the method's logic on ``T x T`` coefficients, one combination of the task
gradients; only SAM-GS's momentum modulation is element-wise by definition. One private module per method
(``_pcgrad.py``, ``_cagrad.py``, ``_sam_gs.py``, ``_gcond.py`` with ``_gcond_state.py``, and
``_aggregator.py``); every public name is imported from this package.

``make_aggregator(method, **options)`` returns an ``Aggregator`` that owns the options and the state of
the stateful methods (SAM-GS, GCond) and derives PCGrad's per-step random order from ``(seed, step)``, so
that every rank and a resumed run draw the same order. Each method's docstring names the reference code it
follows and where it departs from it.

Examples:
    >>> import torch
    >>> grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> conflict_rate(grads)
    tensor(1.)
    >>> pcgrad(grads)
    tensor([0.5000, 1.5000])
    >>> aggregator = make_aggregator("mean")
    >>> aggregator(grads, step=0)
    tensor([0.0000, 0.5000])
"""

from __future__ import annotations

from ._aggregator import METHODS, Aggregator, make_aggregator
from ._cagrad import cagrad, cagrad_objective, cagrad_weights, check_cagrad_args
from ._gcond import gcond
from ._gcond_state import GCondState, check_gcond_args, init_gcond_state
from ._gram_space import (
    COSINE_TOL,
    COSINE_TOL_FLOAT32,
    aggregate_mean,
    aggregate_sum,
    check_grads,
    conflict_rate,
    conflict_stats,
    gramian,
    mean_,
    sum_,
    task_norms,
)
from ._pcgrad import pcgrad, pcgrad_coefficients, pcgrad_orders
from ._sam_gs import SamGsState, check_sam_gs_args, gradient_magnitude_similarity, init_sam_gs_state, sam_gs

__all__ = [
    "COSINE_TOL",
    "COSINE_TOL_FLOAT32",
    "METHODS",
    "Aggregator",
    "GCondState",
    "SamGsState",
    "aggregate_mean",
    "aggregate_sum",
    "cagrad",
    "cagrad_objective",
    "cagrad_weights",
    "check_cagrad_args",
    "check_gcond_args",
    "check_grads",
    "check_sam_gs_args",
    "conflict_rate",
    "conflict_stats",
    "gcond",
    "gradient_magnitude_similarity",
    "gramian",
    "init_gcond_state",
    "init_sam_gs_state",
    "make_aggregator",
    "mean_",
    "pcgrad",
    "pcgrad_coefficients",
    "pcgrad_orders",
    "sam_gs",
    "sum_",
    "task_norms",
]


