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

from lightning_optx.functional.common import all_finite, foreach_norms

__all__ = [
    "DEFAULT_TARGET_PATTERNS",
    "all_finite",
    "check_grades_args",
    "component_of",
    "find_targets",
    "freeze_mask",
    "group_components",
    "group_mean_abs",
    "mean_abs",
    "update_reference",
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


_LORA_SPLIT = re.compile(
    r"^(?P<module>.*?)\.?lora_[AB]\.(?P<adapter>[^.]+)\.weight$|^(?P<bare>.*?)\.?lora_[AB]\.weight$"
)


def component_of(name: str) -> str:
    """The component a parameter belongs to: its own name, or ``<module>.lora[<adapter>]`` for a LoRA factor.

    The authors' code treats the ``lora_A`` / ``lora_B`` pair of one adapted layer as one component: it is
    measured as a whole (the L1 norms of both factors added) and frozen as a whole. Grouping also makes the
    pair robust to PEFT's default initialisation (``lora_B = 0``), under which ``lora_A``'s first gradient is
    exactly zero.

    Examples:
        >>> component_of("base_model.model.layer.0.query.lora_A.default.weight")
        'base_model.model.layer.0.query.lora[default]'
        >>> component_of("blocks.0.attn.q_proj.weight")
        'blocks.0.attn.q_proj.weight'
    """
    match = _LORA_SPLIT.match(name)
    if match is None:
        return name
    if match.group("adapter") is not None:
        return f"{match.group('module')}.lora[{match.group('adapter')}]"
    return f"{match.group('bare')}.lora"


def group_components(names: Iterable[str]) -> dict[str, list[str]]:
    """``{component: [parameter names]}`` in first-seen order (see :func:`component_of`)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(component_of(name), []).append(name)
    return groups


def mean_abs(tensors: Sequence[Tensor]) -> Tensor:
    """The mean absolute value of each tensor, as one float32 vector (one fused pass, no host sync).

    The L1 norms are accumulated in at least float32 (float64 tensors in float64): an fp16 sum overflows to
    inf from 65504 on, which a 4096 x 4096 matrix of 0.01-sized gradients already reaches.
    """
    return group_mean_abs(tensors, [1] * len(tensors))


def group_mean_abs(tensors: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """The mean absolute value of consecutive groups of tensors (``sizes[i]`` tensors in group ``i``), float32.

    A group's value is the sum of its members' L1 norms over the sum of their element counts.

    Examples:
        >>> group_mean_abs([torch.tensor([1.0, -3.0]), torch.zeros(2), torch.tensor([4.0])], [2, 1])
        tensor([1., 4.])
    """
    if not tensors:
        return torch.zeros(0)
    if sum(sizes) != len(tensors):
        raise ValueError(f"`sizes` must add up to the number of tensors ({len(tensors)}), got sizes={list(sizes)}.")
    l1 = foreach_norms(tensors, ord=1)  # float64 tensors stay float64 until the division
    numel = torch.tensor([t.numel() for t in tensors], dtype=l1.dtype, device=l1.device)
    index = torch.repeat_interleave(torch.arange(len(sizes), device=l1.device),
                                    torch.tensor(list(sizes), device=l1.device))
    totals = torch.zeros(len(sizes), dtype=l1.dtype, device=l1.device)
    counts = torch.zeros(len(sizes), dtype=l1.dtype, device=l1.device)
    return (totals.index_add_(0, index, l1) / counts.index_add_(0, index, numel)).float()


def update_reference(reference: float | None, value: float) -> float | None:
    """The relative-mode reference after one more measurement: the running maximum of the finite values.

    A non-finite value (an overflowing fp16 step) never becomes the reference; a zero first value (a
    zero-initialised adapter) is replaced by the first non-zero one.

    Examples:
        >>> update_reference(None, 0.0), update_reference(0.0, 2.0), update_reference(2.0, float("nan"))
        (0.0, 2.0, 2.0)
    """
    if value != value or value in (float("inf"), float("-inf")):
        return reference
    return value if reference is None else max(reference, value)


def freeze_mask(metrics: Tensor, tau: float, reference: Tensor | None = None) -> Tensor:
    """Which matrices have converged: ``metric < tau`` (absolute) or ``metric < tau * reference`` (relative)."""
    threshold = tau if reference is None else tau * reference
    return metrics < threshold
