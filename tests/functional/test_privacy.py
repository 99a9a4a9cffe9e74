"""DP-SGD bookkeeping against Opacus' own accountant, and the Poisson batch sampler's distribution."""

from __future__ import annotations

import doctest
import math
import warnings

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

pytest.importorskip("opacus")

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_optx.functional import privacy as P


@pytest.fixture(autouse=True)
def _quiet_rdp_order_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def opacus_epsilon(mechanism, history, delta):
    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_is_opacus_accountant(mechanism):
    history = [(1.1, 0.01, 300), (0.8, 0.02, 20)]
    assert P.epsilon_of_history(history, 1e-5, mechanism) == opacus_epsilon(mechanism, history, 1e-5)
    assert P.epsilon(1.1, 0.01, 300, 1e-5, mechanism) == opacus_epsilon(mechanism, [(1.1, 0.01, 300)], 1e-5)


def test_rdp_fast_path_is_bit_identical_for_many_histories():
    for history in ([(1.0, 0.125, 1)], [(1.0, 0.125, 16)], [(0.5, 0.3, 3), (2.0, 0.001, 10_000)],
                    [(1.3, 0.05, 7), (1.3, 0.05, 8)]):
        assert P.epsilon_of_history(history, 1e-6, "rdp") == opacus_epsilon("rdp", history, 1e-6)


def test_epsilon_edge_cases():
    assert P.epsilon_of_history([], 1e-5, "rdp") == 0.0
    assert P.epsilon(1.0, 0.1, 0, 1e-5, "prv") == 0.0
    assert P.epsilon(0.0, 0.1, 5, 1e-5, "rdp") == math.inf


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: P.epsilon(1.0, 0.1, 5, 1e-5, "gdp"), r"`accountant` must be one of \('prv', 'rdp'\)"),
        (lambda: P.epsilon(1.0, 0.1, 5, 1.5, "rdp"), r"`delta` must be a float in \(0, 1\), got delta=1.5"),
        (lambda: P.epsilon(1.0, 0.0, 5, 1e-5, "rdp"), r"`sample_rate` must be in \(0, 1\], got sample_rate=0.0"),
        (lambda: P.epsilon(-1.0, 0.1, 5, 1e-5, "rdp"), r"`noise_multiplier` must be a finite float >= 0"),
        (lambda: P.epsilon(1.0, 0.1, -1, 1e-5, "rdp"), r"`steps` must be an integer >= 0, got steps=-1"),
        (lambda: P.noise_multiplier_for_epsilon(0.0, 1e-5, 0.1, 10), r"`target_epsilon` must be a finite float > 0"),
        (lambda: P.noise_multiplier_for_epsilon(1.0, 1e-5, 0.1, 0), r"`steps` must be an integer >= 1, got steps=0"),
        (lambda: P.steps_until_budget(1.0, 0.1, 1e-5, -1.0), r"`budget` must be a float > 0, got budget=-1.0"),
        (lambda: P.sample_rate_for(0, 10), r"`batch_size` must be an integer >= 1, got batch_size=0"),
        (lambda: P.sample_rate_for(8, 10, world_size=2), r"exceeds the data set \(10 samples\)"),
    ],
)
def test_bad_arguments_name_the_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_noise_calibration_is_opacus_and_meets_the_target():
    sigma = P.noise_multiplier_for_epsilon(2.0, 1e-5, 0.05, 60, "rdp")
    assert sigma == get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, steps=60,
                                         accountant="rdp", epsilon_tolerance=0.01)
    assert 2.0 - 0.01 <= P.epsilon(sigma, 0.05, 60, 1e-5, "rdp") <= 2.0
    sigma = P.noise_multiplier_for_epsilon(2.0, 1e-5, 0.05, 60, "prv")
    assert 2.0 - 0.01 <= P.epsilon(sigma, 0.05, 60, 1e-5, "prv") <= 2.0


def test_steps_until_budget_is_the_last_step_within_budget():
    k = P.steps_until_budget(1.0, 0.05, 1e-5, 3.0, "rdp")
    assert k > 10
    assert P.epsilon(1.0, 0.05, k, 1e-5, "rdp") <= 3.0 < P.epsilon(1.0, 0.05, k + 1, 1e-5, "rdp")
    # with a history already spent, the remaining steps are fewer and still exact
    history = [(1.5, 0.05, 3)]
    m = P.steps_until_budget(1.0, 0.05, 1e-5, 3.0, "rdp", history=history)
    assert 0 < m < k
    assert P.epsilon_of_history([*history, (1.0, 0.05, m)], 1e-5, "rdp") <= 3.0
    assert P.epsilon_of_history([*history, (1.0, 0.05, m + 1)], 1e-5, "rdp") > 3.0
    # a spent budget allows nothing; no noise allows nothing; a cap is honoured
    assert P.steps_until_budget(1.0, 0.05, 1e-5, 0.01, "rdp") == 0
    assert P.steps_until_budget(0.0, 0.05, 1e-5, 5.0, "rdp") == 0
    assert P.steps_until_budget(50.0, 0.001, 1e-5, 5.0, "rdp", max_steps=1000) == 1000


def test_sample_rate_and_epoch_length():
    assert P.sample_rate_for(8, 64) == 0.125
    assert P.sample_rate_for(4, 64, world_size=2) == 0.125
    assert P.sample_rate_for(2, 64, world_size=2, accumulate=2) == 0.125
    assert P.steps_per_epoch(0.125) == 8
    assert P.steps_per_epoch(0.3) == 3
    assert P.steps_per_epoch(1.0) == 1


def test_derive_seed_is_stable_and_distinct():
    assert P.derive_seed(1, "noise", 0) == P.derive_seed(1, "noise", 0)
    seeds = {P.derive_seed(1, "poisson", r, e, s) for r in range(2) for e in range(3) for s in range(50)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_split_even():
    assert P.split_even([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert P.split_even([1], 3) == [[1], [], []]
    assert P.split_even([], 2) == [[], []]


def test_doctests():
    result = doctest.testmod(P, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------- Poisson batches


def sampler(**kwargs):
    args = {"num_samples": 100, "sample_rate": 0.1, "steps": 10, "seed": 3}
    args.update(kwargs)
    return P.PoissonBatchSampler(range(args["num_samples"]), **args)


def test_length_and_reproducibility():
    s = sampler()
    assert len(s) == 10 and len(list(s)) == 10
    assert list(s) == list(sampler())  # same seed and epoch: same batches
    other = sampler()
    other.set_epoch(1)
    assert list(other) != list(s)  # a new epoch draws new batches
    assert list(sampler(seed=4)) != list(s)
    assert list(sampler(epoch_source=lambda: 1)) == list(other)


def test_inclusion_frequency_is_the_sample_rate():
    s = sampler(num_samples=200, sample_rate=0.05, steps=400)
    counts = torch.zeros(200)
    for batch in s:
        assert len(set(batch)) == len(batch)  # no sample twice in one batch
        counts[batch] += 1
    rate = counts / 400
    # each sample is drawn with probability 0.05 at each of 400 steps: mean 0.05, std ~0.011 per sample
    assert abs(rate.mean().item() - 0.05) < 0.003
    assert rate.max().item() < 0.05 + 5 * math.sqrt(0.05 * 0.95 / 400)


def test_empty_batches_are_yielded():
    batches = list(sampler(sample_rate=0.001, steps=50))
    assert len(batches) == 50
    assert sum(len(b) == 0 for b in batches) > 40


def test_ranks_shard_the_data_set_and_draw_independently():
    ranks = [sampler(num_samples=101, num_replicas=2, rank=r, sample_rate=0.3) for r in range(2)]
    assert set(ranks[0].shard.tolist()) | set(ranks[1].shard.tolist()) == set(range(101))
    assert not set(ranks[0].shard.tolist()) & set(ranks[1].shard.tolist())
    for b0, b1 in zip(*ranks):
        assert not set(b0) & set(b1)
        assert all(i % 2 == 0 for i in b0) and all(i % 2 == 1 for i in b1)
    # position j of each shard is not drawn with the same random number on both ranks
    m0 = [[(i // 2) for i in b] for b in ranks[0]]
    m1 = [[(i // 2) for i in b] for b in ranks[1]]
    assert m0 != m1


def test_accumulation_splits_one_draw_into_micro_batches():
    whole = list(sampler(sample_rate=0.2, steps=6))
    split = list(sampler(sample_rate=0.2, steps=6, accumulate=3))
    assert len(split) == 18
    for i, batch in enumerate(whole):
        parts = split[3 * i:3 * i + 3]
        assert [i for part in parts for i in part] == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_given_generator_is_used():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert list(sampler(generator=g1)) == list(sampler(generator=g2))
    assert list(sampler(generator=torch.Generator().manual_seed(0))) != list(sampler())


def test_recreation_with_a_distributed_sampler_gives_the_same_batches():
    """What Lightning does under DDP with use_distributed_sampler=True: re-create it with a DistributedSampler."""
    data = TensorDataset(torch.arange(50))
    original = P.PoissonBatchSampler(range(50), num_samples=50, sample_rate=0.2, steps=5, num_replicas=2, rank=1,
                                     seed=9)
    injected = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True)
    recreated = P.PoissonBatchSampler(injected, num_samples=50, sample_rate=0.2, steps=5, num_replicas=2, rank=1,
                                      seed=9)
    assert list(recreated) == list(original)
    with pytest.raises(ValueError, match=r"DistributedSampler over 3 replicas but shards the data over num_replicas=2"):
        P.PoissonBatchSampler(DistributedSampler(data, num_replicas=3, rank=0), num_samples=50, sample_rate=0.2,
                              steps=5, num_replicas=2, rank=0, seed=9)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_samples": 0}, r"`num_samples` must be an integer >= 1, got num_samples=0"),
        ({"sample_rate": 1.5}, r"`sample_rate` must be in \(0, 1\], got sample_rate=1.5"),
        ({"steps": 0}, r"`steps` must be an integer >= 1, got steps=0"),
        ({"accumulate": 0}, r"`accumulate` must be an integer >= 1, got accumulate=0"),
        ({"rank": 2, "num_replicas": 2}, r"`rank` must be an integer in \[0, num_replicas=2\), got rank=2"),
        ({"drop_last": True}, r"`drop_last` must be False"),
    ],
)
def test_sampler_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sampler(**kwargs)
