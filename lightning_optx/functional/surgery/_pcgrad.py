"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), in the Gram space."""

from __future__ import annotations

import torch
from torch import Tensor

from ._gram_space import _combine, _compute, _gram, check_grads


def pcgrad_orders(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
    """For each task ``i``, a random order of the other tasks: an int64 CPU tensor of shape ``(T, T - 1)``.

    Row ``i`` is drawn with ``torch.randperm(T - 1, generator=generator)`` after the rows before it, so the
    same generator state gives the same orders on every rank.
    """
    rows = []
    device = generator.device if generator is not None else torch.device("cpu")
    for i in range(num_tasks):
        others = torch.tensor([j for j in range(num_tasks) if j != i], dtype=torch.long)
        perm = torch.randperm(num_tasks - 1, generator=generator, device=device).cpu()
        rows.append(others[perm])
    return torch.stack(rows)


def pcgrad_coefficients(gram: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's projections on coefficients: projected gradient ``i`` is ``sum_k C[i, k] g_k``.

    ``gram`` is the ``(T, T)`` Gramian of the task gradients, ``orders`` the ``(T, T - 1)`` projection
    orders (:func:`pcgrad_orders`). Each projection ``g_i' <- g_i' - (g_i' . g_j) / ||g_j||^2 g_j`` against
    an ORIGINAL ``g_j`` only changes ``C[i, j]``, and ``g_i' . g_j = (C K)[i, j]``: the loop never touches
    the ``n``-dim vectors. Vectorised over ``i`` (``T - 1`` passes over ``T x T`` tensors on the Gramian's
    device, no host sync). Returns ``C`` in float64.
    """
    num_tasks = gram.shape[0]
    k = gram.to(torch.float64)
    coeffs = torch.eye(num_tasks, dtype=torch.float64, device=k.device)
    sq_norms = k.diagonal()
    safe_sq = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms))
    rows = torch.arange(num_tasks, device=k.device)
    orders = orders.to(k.device)
    for step in range(num_tasks - 1):
        j = orders[:, step]
        dots = (coeffs * k[:, j].T).sum(dim=1)  # (C K)[i, j_i]
        coeffs[rows, j] -= dots.clamp(max=0.0) / safe_sq[j]
    return coeffs


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad: project each task gradient off the gradients it conflicts with, then sum.

    For each task ``i``, ``g_i'`` starts at ``g_i``; for each other task ``j`` in a random order (drawn from
    ``generator``, see :func:`pcgrad_orders`), if ``g_i' . g_j < 0`` then
    ``g_i' <- g_i' - (g_i' . g_j) / ||g_j||^2 * g_j``. The ``g_j`` are the ORIGINAL task gradients. Returns
    ``sum_i g_i'``.

    Follows Algorithm 1 of Yu et al. (2020) and the authors' ``PCGrad_tf.py`` (tianheyu927/PCGrad:
    ``grad_task - tf.minimum(proj_direction, 0.) * grads_task[k]``, projections against the original
    gradients, projected gradients SUMMED per variable). WeiChengTseng/Pytorch-PCGrad's ``pcgrad.py`` draws
    one shuffle per task the same way but averages by default (``reduction='mean'``), and shuffles the task
    itself in (a no-op projection); we exclude it, as Cranial-XIX/CAGrad ``nyuv2/utils.py`` ``pcgrad`` does.
    Divide by ``T`` for the mean variant. A zero ``g_j`` projects nothing (no 0/0).

    Computed in the Gram space (:func:`pcgrad_coefficients`): one float64 Gramian of the task gradients,
    the projections on ``T x T`` coefficients, one combination ``(1^T C) G``. The inner products are those
    of the float64 Gramian, so they are at least as accurate as the reference's on the projected vectors.
    """
    check_grads(grads)
    g = _compute(grads)
    orders = pcgrad_orders(g.shape[0], generator)
    coeffs = pcgrad_coefficients(_gram(g), orders)
    return _combine(coeffs.sum(dim=0), g).to(grads.dtype)
