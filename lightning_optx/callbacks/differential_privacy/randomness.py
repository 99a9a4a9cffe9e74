"""Where DP-SGD's randomness comes from: the Poisson batches and the noise are what makes the model private, so
whoever can predict them can subtract the noise and knows which samples each step saw.

Three sources:

* **secret** (the default): both generators are seeded at the start of every fit (and so again after a resume)
  from the operating system's entropy source (``os.urandom``), separately on every rank. The seeds are never
  derived from the global seed, never logged and never written to a checkpoint; a resumed run draws fresh,
  unpredictable batches and noise. Runs are not reproducible.
* **reproducible** (``seed=...``): every step's Poisson draw and noise come from a generator seeded with
  ``derive_seed(seed, ...)`` and the step, so a run is repeatable and a resume is bit-exact. The seed (and with
  it anyone holding the code and the configuration) reveals the noise: for research and tests only.
* **secure** (``secure_mode=True``): a cryptographically secure generator (``torchcsprng``, as Opacus) and
  Opacus' noise that resists floating-point attacks.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_optx.functional import privacy as P


def entropy_seed() -> int:
    """A 63-bit seed from the operating system's entropy source."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``os.urandom`` (its seed is not kept anywhere)."""
    return torch.Generator(device=device).manual_seed(entropy_seed())


def secure_generator() -> Any:
    """torchcsprng's ``/dev/urandom`` generator, or an ``ImportError`` naming what is missing."""
    try:
        import torchcsprng as csprng
    except ImportError as err:
        raise ImportError("DifferentialPrivacy(secure_mode=True) needs torchcsprng (a cryptographically secure "
                          "generator), as Opacus does: https://github.com/pytorch/csprng#installation") from err
    return csprng.create_random_device_generator("/dev/urandom")


class Randomness:
    """The sampling and noise generators of one fit.

    Args:
        seed: ``None`` for secret randomness, an integer for reproducible randomness.
        secure_mode: use a cryptographically secure generator for both (``seed`` must be ``None``).

    Examples:
        >>> a, b = Randomness(seed=None), Randomness(seed=None)
        >>> a.start(torch.device("cpu")); b.start(torch.device("cpu"))
        >>> bool(torch.rand(4, generator=a.noise).ne(torch.rand(4, generator=b.noise)).all())
        True
        >>> r = Randomness(seed=3); r.start(torch.device("cpu")); r.before_step(10)
        >>> first = torch.rand(2, generator=r.noise); r.before_step(10)
        >>> torch.equal(first, torch.rand(2, generator=r.noise))
        True
    """

    def __init__(self, seed: int | None, secure_mode: bool = False) -> None:
        self.seed = seed
        self.secure_mode = secure_mode
        self.sampling: Any = None
        self.noise: Any = None

    @property
    def reproducible(self) -> bool:
        return self.seed is not None and not self.secure_mode

    def start(self, device: torch.device) -> None:
        """New generators for a fit (called again when a run resumes)."""
        if self.secure_mode:
            self.sampling = self.noise = secure_generator()
        elif self.seed is None:
            self.sampling, self.noise = secret_generator("cpu"), secret_generator(device)
        else:  # reproducible: the Poisson sampler derives each step's seed itself; the noise is reseeded per step
            self.sampling, self.noise = None, torch.Generator(device=device)

    def before_step(self, step: int) -> None:
        """Reseed the noise of DP step ``step`` (reproducible mode only; a no-op otherwise)."""
        if self.reproducible and self.noise is not None:
            self.noise.manual_seed(P.derive_seed(self.seed, "noise", step))

    @property
    def sampling_seed(self) -> int:
        """The base seed of the Poisson sampler's derived seeds (unused unless reproducible)."""
        return int(self.seed) if self.reproducible else 0  # type: ignore[arg-type]
