"""DiLoCo's bucketed outer step: same result as one step over everything, bounded transient memory."""

from __future__ import annotations

import pytest
import torch

from lightning_optx.functional.diloco import DEFAULT_BUCKET_BYTES, bucketed_outer_step_, buckets_by_bytes

SHAPES = [(64, 32), (32,), (16, 16), (300,), (8, 8, 3), (5,)]


def _state(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    glob = [torch.randn(s, generator=g) for s in SHAPES]
    local = [(x + 0.1 * torch.randn(s, generator=g)).to(dtype) for x, s in zip(glob, SHAPES)]
    return local, glob


def _outer(glob):
    return torch.optim.SGD(glob, lr=0.7, momentum=0.9, nesterov=True)


def _fake_average(flat, views, indices):
    """A stand-in for the all-reduce that depends on the entries only (not on how they are bucketed)."""
    flat.mul_(0.5).add_(torch.sin(flat))


def _unbucketed_reference(local, glob, outer, rounds):
    """The step over all parameters at once, written out: delta, average, optimizer step, copy back."""
    for _ in range(rounds):
        delta = [g - p.float() for g, p in zip(glob, local)]
        for g, d in zip(glob, delta):
            _fake_average(d, None, None)
            g.grad = d
        outer.step()
        outer.zero_grad(set_to_none=True)
        for p, g in zip(local, glob):
            p.copy_(g)


@pytest.mark.parametrize("bucket_bytes", [1, 100, 4 * 300, 4 * 2048, DEFAULT_BUCKET_BYTES])
def test_buckets_equal_the_unbucketed_step_and_bound_the_transient(bucket_bytes):
    local_ref, glob_ref = _state(0)
    outer_ref = _outer(glob_ref)
    _unbucketed_reference(local_ref, glob_ref, outer_ref, rounds=3)

    local, glob = _state(0)
    outer = _outer(glob)
    seen: list[int] = []

    def average(flat, views, indices):
        seen.append(flat.numel() * flat.element_size())
        assert [v.data_ptr() for v in views] == sorted(v.data_ptr() for v in views)  # views into `flat`
        _fake_average(flat, views, indices)

    largest = [bucketed_outer_step_(local, glob, outer, average, bucket_bytes) for _ in range(3)][-1]
    for a, b in zip(local, local_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(glob, glob_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(outer.state_dict()["state"], outer_ref.state_dict()["state"], atol=0, rtol=0)
    biggest_tensor = max(4 * torch.Size(s).numel() for s in SHAPES)
    assert largest == max(seen) <= max(bucket_bytes, biggest_tensor)
    if bucket_bytes >= sum(4 * torch.Size(s).numel() for s in SHAPES):
        assert len(seen) == 3  # one bucket per round


def test_low_precision_parameters_receive_the_global_values():
    local, glob = _state(1, torch.bfloat16)
    outer = torch.optim.SGD(glob, lr=1.0)
    bucketed_outer_step_(local, glob, outer, lambda flat, views, idx: None, bucket_bytes=256)
    for p, g in zip(local, glob):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, g.to(torch.bfloat16), atol=0, rtol=0)


def test_buckets_by_bytes():
    assert buckets_by_bytes([4, 4, 4], 8) == [[0, 1], [2]]
    assert buckets_by_bytes([16, 4], 8) == [[0], [1]]  # a tensor larger than a bucket is alone
    assert buckets_by_bytes([], 8) == []


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_bucket_bytes(value):
    with pytest.raises(ValueError, match="`bucket_bytes` must be an integer >= 1"):
        buckets_by_bytes([4], value)
