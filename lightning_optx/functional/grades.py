"""GradES: gradient-based early stopping of individual weight matrices (Wen et al., "GradES").

Each attention projection and feed-forward matrix of a transformer is watched on its own. After a grace
period, a matrix whose convergence metric falls below ``tau`` is frozen: it gets no more gradient (so the
weight-gradient matmul of its backward pass is skipped) and no more updates. Training stops when every
matrix is frozen.

Metrics (both per matrix, scale-free in the sense that they are means, not sums, so one ``tau`` carries
across matrix sizes):

* ``"grad"``: the mean absolute gradient, ``||G||_1 / numel(G)``.
* ``"weight_delta"``: the mean absolute change of the weights over the last optimizer step,
  ``||W_t - W_{t-1}||_1 / numel(W)`` (what the authors' code tracks).

Examples:
    >>> import torch
    >>> mean_abs([torch.tensor([1.0, -3.0]), torch.zeros(4)])
    tensor([2., 0.])
    >>> freeze_mask(torch.tensor([0.5, 2.0]), tau=1.0)
    tensor([ True, False])
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TARGET_PATTERNS",
    "check_grades_args",
    "find_targets",
    "freeze_mask",
    "mean_abs",
]

#: Parameter-name patterns of attention and feed-forward weight matrices in common layouts.
DEFAULT_TARGET_PATTERNS: tuple[str, ...] = (
    # separate projections: Llama/Mistral/OPT (q_proj...), BERT (query/key/value, attention.output.dense)
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|out_proj)\.weight$",
    r"(^|\.)attention\.self\.(query|key|value)\.weight$",
    r"(^|\.)attention\.output\.dense\.weight$",
    # fused projections: nn.MultiheadAttention, GPT-2, ViT/timm
    r"(^|\.)in_proj_weight$",
    r"(^|\.)(c_attn|qkv|Wqkv|query_key_value)\.weight$",
    r"(^|\.)attn\.c_proj\.weight$",
    # feed-forward: Llama (gate/up/down), BERT (intermediate.dense, output.dense), GPT-2, fc1/fc2, nn.Transformer
    r"(^|\.)(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$",
    r"(^|\.)intermediate\.dense\.weight$",
    r"(^|\.)output\.dense\.weight$",
    r"(^|\.)mlp\.(c_fc|c_proj)\.weight$",
    r"(^|\.)(fc1|fc2|linear1|linear2)\.weight$",
)

#: LoRA adapters (PEFT naming); when any is trainable, only adapters are targeted by default.
LORA_PATTERNS: tuple[str, ...] = (r"(^|\.)lora_[AB](\.[^.]+)?\.weight$",)


def check_grades_args(tau: float, grace_fraction: float, metric: str, tau_mode: str) -> None:
    """Raise ``ValueError`` naming the argument for invalid GradES settings."""
    if not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"`tau` must be a positive float, got tau={tau!r}.")
    if not isinstance(grace_fraction, (int, float)) or not 0.0 <= grace_fraction < 1.0:
        raise ValueError(f"`grace_fraction` must be in [0, 1), got grace_fraction={grace_fraction!r}.")
    if metric not in ("grad", "weight_delta"):
        raise ValueError(f"`metric` must be 'grad' or 'weight_delta', got metric={metric!r}.")
    if tau_mode not in ("absolute", "relative"):
        raise ValueError(f"`tau_mode` must be 'absolute' or 'relative', got tau_mode={tau_mode!r}.")
    if tau_mode == "relative" and tau >= 1:
        raise ValueError(f"with tau_mode='relative', `tau` is a fraction of the early metric and must be < 1, "
                         f"got tau={tau!r}.")


def find_targets(names: Iterable[str], patterns: Sequence[str] | None = None) -> list[str]:
    """Names matching any pattern (``re.search``); ``None`` means the default layouts (LoRA first).

    With ``patterns=None``: if any LoRA adapter is among ``names``, only the adapters are returned (the base
    weights of a LoRA model are frozen anyway); otherwise the attention and feed-forward matrices.
    """
    names = list(names)
    if patterns is None:
        lora = _matching(names, LORA_PATTERNS)
        return lora if lora else _matching(names, DEFAULT_TARGET_PATTERNS)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"`targets` holds an invalid regular expression {p!r}: {err}") from err
    return _matching(names, patterns)


def _matching(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return [n for n in names if any(c.search(n) for c in compiled)]


def mean_abs(tensors: Sequence[Tensor]) -> Tensor:
    """The mean absolute value of each tensor, as one float32 vector (one fused pass, no host sync)."""
    if not tensors:
        return torch.zeros(0)
    l1 = torch.stack([n.float() for n in torch._foreach_norm(list(tensors), ord=1)])
    sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.float32, device=l1.device)
    return l1 / sizes


def freeze_mask(metrics: Tensor, tau: float, reference: Tensor | None = None) -> Tensor:
    """Which matrices have converged: ``metric < tau`` (absolute) or ``metric < tau * reference`` (relative)."""
    threshold = tau if reference is None else tau * reference
    return metrics < threshold
