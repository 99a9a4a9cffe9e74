"""Deep, exact comparison of nested training state (tensors, dicts, lists, numbers)."""

from __future__ import annotations

from typing import Any

import torch


def tree_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ; tensors must match in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if not torch.equal(a.cpu(), b.cpu()):
            diff = (a.double().cpu() - b.double().cpu()).abs().max().item()
            return [f"{path}: max abs difference {diff:.3e}"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        if set(a) != set(b):
            out.append(f"{path}: keys differ: {sorted(map(str, set(a) ^ set(b)))}")
        for k in set(a) & set(b):
            out += tree_differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += tree_differences(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def assert_tree_equal(a: Any, b: Any, what: str = "state") -> None:
    diffs = tree_differences(a, b)
    assert not diffs, f"{what} differs:\n" + "\n".join(diffs[:20])


def assert_ranks_identical(results: list, what: str = "params") -> None:
    """All ranks hold bit-identical ``what`` (an attribute of RankResult)."""
    first = getattr(results[0], what)
    for r in results[1:]:
        assert_tree_equal(first, getattr(r, what), f"{what} of rank {r.rank} vs rank 0")
