"""DP-SGD bookkeeping with no Lightning import: accountants, epsilon, noise calibration, Poisson batches.

The privacy accounting is Opacus' (``opacus.accountants``): every function here builds an Opacus accountant
and asks it, so a number computed here is the number Opacus reports for the same history. A *history* is
Opacus' own format, a list of ``(noise_multiplier, sample_rate, steps)`` tuples, one per run of steps taken
with the same noise and sample rate.

:class:`PoissonBatchSampler` draws the batches the accountant assumes: at every optimizer step each sample of
the data set joins the batch independently with probability ``sample_rate``. Under data parallelism rank
``r`` of ``W`` owns the samples ``r, r + W, ...`` and draws their membership itself, so the union over ranks is
one Poisson sample of the whole data set. Unlike Opacus' ``DistributedUniformWithReplacementSampler`` it
yields empty batches instead of skipping them, so every rank runs the same number of steps (a skipped batch on
one rank would leave the others waiting in the gradient all-reduce), and it can split each Poisson batch into
``accumulate`` micro-batches for gradient accumulation, so that one optimizer step consumes exactly one
Poisson draw.

Examples:
    >>> sample_rate_for(batch_size=64, dataset_size=6400)
    0.01
    >>> steps_per_epoch(0.01)
    100
    >>> eps = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5, accountant="rdp")
    >>> round(eps, 2)
    2.1
    >>> sigma = noise_multiplier_for_epsilon(3.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
    >>> 2.99 <= epsilon(sigma, 0.01, 1000, 1e-5, accountant="rdp") <= 3.0
    True
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DistributedSampler

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "History",
    "PoissonBatchSampler",
    "clip_coefficients",
    "clipped_gradient_sum",
    "clipped_sums",
    "derive_seed",
    "epsilon",
    "epsilon_of_history",
    "make_accountant",
    "merge_history",
    "noise_multiplier_for_epsilon",
    "noise_multiplier_for_remaining",
    "per_sample_norms",
    "require_opacus",
    "sample_rate_for",
    "split_even",
    "steps_per_epoch",
    "steps_until_budget",
    "work_dtype",
]

AccountantName = Literal["prv", "rdp"]
#: Accountants the package offers: Opacus' PRV (tight numerical composition, its default) and RDP.
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
#: Opacus' accountant history: ``[(noise_multiplier, sample_rate, steps), ...]``.
History = Sequence[tuple[float, float, int]]

_MAX_SEARCH_STEPS = 1 << 40


#: Oldest Opacus with the hooks API used here (``opacus.grad_sample.GradSampleHooks``, attach without wrapping).
MIN_OPACUS = (1, 6)


def require_opacus() -> None:
    """Raise an ``ImportError`` that says how to install Opacus when it is missing or too old."""
    try:
        import opacus
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Differential privacy needs Opacus: `pip install 'lightning-optx[privacy]'` (or `pip install opacus`)."
        ) from err
    version = tuple(int(part) for part in opacus.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_OPACUS:  # pragma: no cover - the test environment has a recent Opacus
        raise ImportError(f"Differential privacy needs opacus>={'.'.join(map(str, MIN_OPACUS))}, found "
                          f"{opacus.__version__}: `pip install -U opacus`.")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got accountant={accountant!r}.")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be a float in (0, 1), got delta={delta!r}.")


def _check_sample_rate(sample_rate: float) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"`sample_rate` must be in (0, 1], got sample_rate={sample_rate!r}.")


def _check_noise(noise_multiplier: float) -> None:
    if (isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float))
            or not noise_multiplier >= 0.0 or math.isinf(noise_multiplier)):
        raise ValueError(f"`noise_multiplier` must be a finite float >= 0, got noise_multiplier={noise_multiplier!r}.")


def make_accountant(accountant: AccountantName = "prv", history: History = ()) -> IAccountant:
    """A fresh Opacus accountant (``"prv"`` or ``"rdp"``), optionally holding ``history``."""
    require_opacus()
    _check_accountant(accountant)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon_of_history(history: History, delta: float, accountant: AccountantName = "prv") -> float:
    """The epsilon Opacus' accountant reports for ``history`` at ``delta`` (0 for an empty history).

    A step with ``noise_multiplier == 0`` releases the gradient in the clear: epsilon is ``inf``. For ``"rdp"``
    the per-step RDP curve of each ``(noise_multiplier, sample_rate)`` is computed once and cached; the result is
    bit-identical to ``RDPAccountant.get_epsilon`` (which recomputes it, ~0.1-0.5 s, at every call).
    """
    _check_delta(delta)
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s == 0.0 for s, _, _ in steps):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(steps, delta)
    return float(make_accountant(accountant, steps).get_epsilon(delta=delta))


def _rdp_epsilon(history: History, delta: float) -> float:
    """``RDPAccountant.get_epsilon`` with the per-step RDP vectors cached (same operations, same floats)."""
    require_opacus()
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    # compute_rdp(q, sigma, steps) is ``np.array([...per order...]) * steps``: cache the array, multiply here.
    rdp = sum(_rdp_per_step(q, s) * n for s, q, n in history)
    eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> Any:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                orders=RDPAccountant.DEFAULT_ALPHAS)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: AccountantName = "prv") -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian steps at ``delta`` (Opacus' accountant)."""
    _check_noise(noise_multiplier)
    _check_sample_rate(sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0, got steps={steps!r}.")
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_multiplier_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                                 accountant: AccountantName = "prv", epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon after ``steps`` is <= the target.

    Opacus' ``get_noise_multiplier`` (a bisection on the accountant), so the epsilon at the end of the planned
    ``steps`` is at most ``target_epsilon`` and at least ``target_epsilon - epsilon_tolerance``.
    """
    if (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float))
            or not 0.0 < target_epsilon < math.inf):
        raise ValueError(f"`target_epsilon` must be a finite float > 0, got target_epsilon={target_epsilon!r}.")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_accountant(accountant)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got steps={steps!r}.")
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=epsilon_tolerance))


def merge_history(history: History) -> list[tuple[float, float, int]]:
    """``history`` with consecutive runs of the same ``(noise_multiplier, sample_rate)`` merged (as Opacus'
    accountants record them), so that a planned continuation is accounted exactly as the steps will be."""
    out: list[tuple[float, float, int]] = []
    for s, q, n in history:
        if out and out[-1][0] == float(s) and out[-1][1] == float(q):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(n))
        else:
            out.append((float(s), float(q), int(n)))
    return out


def noise_multiplier_for_remaining(target_epsilon: float, delta: float, history: History, sample_rate: float,
                                   steps: int, accountant: AccountantName = "prv",
                                   epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (to ``epsilon_tolerance``) for ``steps`` more steps at ``sample_rate`` after
    ``history`` such that the final epsilon is <= ``target_epsilon``.

    What a resumed run needs when its sample rate changed (another world size or batch size): the steps already
    taken stay as they were, the remaining ones get the noise that lands the whole run within the target. A
    bisection on the accountant, like Opacus' ``get_noise_multiplier`` (which knows no history).

    Examples:
        >>> history = [(1.0, 0.01, 500)]
        >>> sigma = noise_multiplier_for_remaining(3.0, 1e-5, history, 0.02, 500, accountant="rdp")
        >>> 2.99 <= epsilon_of_history([*history, (sigma, 0.02, 500)], 1e-5, "rdp") <= 3.0
        True
    """
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_accountant(accountant)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got steps={steps!r}.")
    spent = epsilon_of_history(history, delta, accountant)
    if spent >= target_epsilon:
        raise ValueError(f"The steps already taken spent epsilon={spent:.4g} >= target_epsilon={target_epsilon}: "
                         "no noise keeps more steps within the target.")

    def final(sigma: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return epsilon_of_history(merge_history([*history, (sigma, sample_rate, steps)]), delta, accountant)

    low, high = 0.0, 10.0
    while final(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise ValueError(f"No noise multiplier up to 1e6 keeps epsilon <= {target_epsilon} after {steps} more "
                             f"steps (already spent: {spent:.4g}).")
    while target_epsilon - final(high) > epsilon_tolerance and high - low > 1e-9 * high:
        mid = (low + high) / 2
        if final(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def steps_until_budget(noise_multiplier: float, sample_rate: float, delta: float, budget: float,
                       accountant: AccountantName = "prv", history: History = (),
                       max_steps: int = _MAX_SEARCH_STEPS) -> int:
    """How many more steps at ``(noise_multiplier, sample_rate)`` keep epsilon <= ``budget``.

    Returns the largest ``k >= 0`` with ``epsilon(history + k steps) <= budget``, found by exponential then
    binary search on the accountant itself (epsilon grows with the number of steps), capped at ``max_steps``.
    ``0`` means that even the next step would exceed the budget.
    """
    _check_noise(noise_multiplier)
    _check_sample_rate(sample_rate)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0.0:
        raise ValueError(f"`budget` must be a float > 0, got budget={budget!r}.")

    def within(k: int) -> bool:
        with warnings.catch_warnings():  # the search probes absurd step counts; RDP's order-range warning is noise
            warnings.simplefilter("ignore", UserWarning)
            return epsilon_of_history([*history, (noise_multiplier, sample_rate, k)], delta, accountant) <= budget

    if not within(0):
        return 0
    lo, hi = 0, 1  # within(lo) holds; search for a hi where it fails
    while within(hi):
        lo = hi
        if hi >= max_steps:
            return max_steps
        hi = min(2 * hi, max_steps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


def sample_rate_for(batch_size: int, dataset_size: int, world_size: int = 1, accumulate: int = 1) -> float:
    """Poisson sampling rate whose expected batch is ``batch_size * world_size * accumulate`` samples.

    ``batch_size`` is the per-device micro-batch size (Lightning's convention); one optimizer step of
    ``world_size`` devices accumulating ``accumulate`` micro-batches draws one Poisson batch of that size on
    average.
    """
    for name, value in (("batch_size", batch_size), ("dataset_size", dataset_size), ("world_size", world_size),
                        ("accumulate", accumulate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {name}={value!r}.")
    expected = batch_size * world_size * accumulate
    if expected > dataset_size:
        raise ValueError(
            f"The expected batch per optimizer step (batch_size={batch_size} x world_size={world_size} x "
            f"accumulate={accumulate} = {expected}) exceeds the data set ({dataset_size} samples): "
            "lower the batch size."
        )
    return expected / dataset_size


def steps_per_epoch(sample_rate: float) -> int:
    """Optimizer steps in one Poisson epoch: ``int(1 / sample_rate)`` (Opacus' convention), at least 1."""
    _check_sample_rate(sample_rate)
    return max(1, int(1.0 / sample_rate))


def clipped_gradient_sum(
    module: nn.Module,
    activations: Sequence[Tensor],
    backprops: Tensor,
    coefficients: Tensor,
    per_sample_gradients: Callable[[nn.Module, Sequence[Tensor], Tensor], dict[Tensor, Tensor]],
) -> dict[Tensor, Tensor]:
    """``sum_i c_i g_i`` for one layer's parameters, ``g_i`` being sample ``i``'s gradient (book-keeping clipping).

    The sums are in fp32 (fp64 for fp64 input) whatever the dtype of ``activations`` and ``backprops``.

    ``activations`` are the layer's inputs and ``backprops`` the gradient of the per-sample losses with respect to
    its output, both batch-first (what Opacus' hooks capture). A per-sample gradient is linear in the output
    gradient, so ``sum_i c_i g_i(a, b) = sum_i g_i(a, c * b)``: for ``nn.Linear`` that is one contraction, as cheap
    as the layer's ordinary weight gradient, with no per-sample tensor; any other layer goes through
    ``per_sample_gradients(module, activations, scaled_backprops)`` (Opacus' per-layer formula) and a sum.

    Examples:
        >>> layer = nn.Linear(3, 2)
        >>> a, b = torch.randn(4, 3), torch.randn(4, 2)
        >>> c = torch.tensor([1.0, 0.5, 0.0, 2.0])
        >>> sums = clipped_gradient_sum(layer, [a], b, c, lambda m, acts, bp: {})
        >>> torch.allclose(sums[layer.weight], sum(c[i] * torch.outer(b[i], a[i]) for i in range(4)), atol=1e-6)
        True
    """
    dtype = work_dtype(backprops.dtype)
    coefficients = coefficients.to(device=backprops.device, dtype=dtype)
    scaled = backprops.to(dtype) * coefficients.reshape(-1, *([1] * (backprops.dim() - 1)))
    if isinstance(module, nn.Linear):
        out: dict[Tensor, Tensor] = {}
        if module.weight.requires_grad:
            out[module.weight] = torch.einsum("n...i,n...j->ij", scaled, activations[0].to(dtype))
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = torch.einsum("n...k->k", scaled)
        return out
    return {p: g.sum(dim=0) for p, g in per_sample_gradients(module, activations, scaled).items()}


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype clipping computes in: fp32 for bf16/fp16 tensors (and fp32), fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def clip_coefficients(per_sample_norms: Tensor, max_grad_norm: float) -> Tensor:
    """Opacus' clipping factors ``min(1, C / (||g_i|| + 1e-6))``, in fp32 (or fp64) whatever the norms' dtype.

    With the norms in fp32, ``c_i ||g_i|| <= C`` holds to fp32 rounding: the ``1e-6`` margin exceeds the rounding
    of the norm. In bf16 (8 significant bits) a norm of 1.004 rounds to 1.0 and the sample escapes clipping.
    """
    norms = per_sample_norms.to(work_dtype(per_sample_norms.dtype))
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def per_sample_norms(grad_samples: Sequence[Tensor]) -> Tensor:
    """The norm of every sample's whole gradient, in fp32 (fp64 for fp64 input), from per-parameter per-sample
    gradients (each ``[batch, *param_shape]``).

    Examples:
        >>> g = [torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[4.0], [0.0]])]
        >>> per_sample_norms(g)
        tensor([5., 1.])
    """
    if not grad_samples:
        raise ValueError("`grad_samples` must hold at least one per-sample gradient tensor.")
    dtype = functools.reduce(torch.promote_types, (work_dtype(g.dtype) for g in grad_samples))
    device = grad_samples[0].device
    per_param = [g.reshape(len(g), math.prod(g.shape[1:])).to(device=device, dtype=dtype).norm(2, dim=-1)
                 for g in grad_samples]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def clipped_sums(grad_samples: Sequence[Tensor], coefficients: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``sum_i c_i g_i`` per parameter, computed in fp32 (fp64 for fp64 input) whatever the gradients' dtype.

    ``coefficients`` is one tensor of per-sample factors for all parameters (flat clipping) or one per parameter
    (per-layer clipping). The sums stay in the work dtype: round them to the parameter's dtype only after the
    noise is added (rounding a noiseless sum is not covered by the sensitivity bound).

    Examples:
        >>> clipped_sums([torch.tensor([[3.0, 4.0], [0.3, 0.4]])], torch.tensor([0.2, 1.0]))
        [tensor([0.9000, 1.2000])]
    """
    coefs = [coefficients] * len(grad_samples) if isinstance(coefficients, Tensor) else list(coefficients)
    out = []
    for g, c in zip(grad_samples, coefs):
        dtype = torch.promote_types(work_dtype(g.dtype), c.dtype)
        out.append(torch.einsum("i,i...->...", c.to(device=g.device, dtype=dtype), g.to(dtype)))
    return out


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_even(items: Sequence[int], parts: int) -> list[list[int]]:
    """Split ``items`` in order into ``parts`` chunks whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(list(items[start:stop]))
        start = stop
    return out


class PoissonBatchSampler(BatchSampler):
    """Poisson-sampled batches of indices: each sample joins each step's batch with probability ``sample_rate``.

    One epoch is ``steps`` optimizer steps; each step draws one Poisson batch over this rank's shard (indices
    ``rank, rank + num_replicas, ...``) and yields it as ``accumulate`` micro-batches of near-equal size, so
    ``len(sampler) == steps * accumulate`` on every rank. Batches can be empty: every rank still yields them,
    so ranks never fall out of step.

    Randomness: with ``generator=None`` (then ``seed`` must be given: a sampler never falls back to a public
    default seed) the membership of step ``i`` of epoch ``e`` on rank ``r`` is drawn from
    a generator seeded with ``derive_seed(seed, "poisson", r, e, i)``: reproducible, independent across
    ranks and steps, and identical after a resume from a checkpoint (no generator state to save). Call
    :meth:`set_epoch` at the start of every epoch, or give ``epoch_source``, a function read when an epoch's
    iteration starts (a data loader with workers starts it early, when its iterator is created). A given
    ``generator`` (for example a cryptographically
    secure one) is used as is instead.

    ``sampler``, ``batch_size`` and ``drop_last`` exist so that this is a ``BatchSampler``: Lightning re-creates
    batch samplers from their arguments when it injects a ``DistributedSampler`` under DDP, and this class
    ignores the sampler it is given (it shards the data set itself), so that re-creation is harmless.

    Args:
        sampler: ignored (see above); any sampler or iterable of the data set.
        batch_size: informational; the expected micro-batch size rounded, at least 1.
        drop_last: must be False.
        num_samples: size of the whole data set.
        sample_rate: inclusion probability per optimizer step, in (0, 1].
        steps: optimizer steps per epoch.
        accumulate: micro-batches per optimizer step.
        num_replicas, rank: data-parallel world size and this process's rank.
        seed: base seed of the membership draws (required when ``generator`` is None).
        generator: source of randomness used instead of the derived seeds.
        epoch_source: optional function returning the current epoch, read at the start of each iteration.
        token: any object, kept as ``self.token`` (lets the creator recognise its sampler after re-creation).

    Examples:
        >>> s = PoissonBatchSampler(range(10), num_samples=10, sample_rate=0.5, steps=3, accumulate=2, seed=0)
        >>> len(s), len(list(s))
        (6, 6)
    """

    def __init__(
        self,
        sampler: Iterable[Any] | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int,
        accumulate: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        epoch_source: Callable[[], int] | None = None,
        token: Any = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an integer >= 1, got num_samples={num_samples!r}.")
        _check_sample_rate(sample_rate)
        for name, value in (("steps", steps), ("accumulate", accumulate), ("num_replicas", num_replicas)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {name}={value!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be an integer in [0, num_replicas={num_replicas}), got rank={rank!r}.")
        if generator is None and seed is None:
            raise ValueError("PoissonBatchSampler needs `generator` (a secret source of randomness) or an explicit "
                             "`seed` (reproducible batches), got neither: it never falls back to a default seed.")
        if drop_last:
            raise ValueError("`drop_last` must be False: Poisson batches have random sizes, none is dropped.")
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas != num_replicas:
            raise ValueError(
                f"PoissonBatchSampler was re-created with a DistributedSampler over {sampler.num_replicas} replicas "
                f"but shards the data over num_replicas={num_replicas}."
            )
        super().__init__(sampler if sampler is not None else range(num_samples), max(1, int(batch_size)), False)
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.accumulate = accumulate
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = None if seed is None else int(seed)
        self.generator = generator
        self.epoch_source = epoch_source
        self.token = token
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration draws (ignored when ``epoch_source`` is given)."""
        self.epoch = int(epoch)

    @property
    def shard(self) -> torch.Tensor:
        """This rank's sample indices."""
        return torch.arange(self.rank, self.num_samples, self.num_replicas)

    def __len__(self) -> int:
        return self.steps * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        shard = self.shard
        epoch = int(self.epoch_source()) if self.epoch_source is not None else self.epoch
        for step in range(self.steps):
            generator = self.generator
            if generator is None:
                assert self.seed is not None
                generator = torch.Generator().manual_seed(derive_seed(self.seed, "poisson", self.rank, epoch, step))
            mask = torch.rand(len(shard), generator=generator) < self.sample_rate
            yield from split_even(shard[mask].tolist(), self.accumulate)
