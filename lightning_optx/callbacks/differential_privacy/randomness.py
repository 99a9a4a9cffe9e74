"""Where DP-SGD's randomness comes from: the Poisson batches and the noise are what makes the model private, so
whoever can predict them can subtract the noise and knows which samples each step saw.

Three sources:

* **secret** (the default): both generators are created in the callback's ``setup`` of every fit (and so again
  after a resume), before Lightning can build the training loader, from the operating system's entropy source
  (``os.urandom``), separately on every rank. A CPU generator gets its whole Mersenne-Twister state (624 32-bit
  words, 19,968 bits) from ``os.urandom`` (``torch.Generator.manual_seed`` would keep only 32 bits of a seed on
  CPU); a CUDA generator (Philox) is seeded with 63 bits from ``os.urandom``, all of which it uses. The seeds are never
  derived from the global seed, never logged and never written to a checkpoint; a resumed run draws fresh,
  unpredictable batches and noise. Runs are not reproducible.
* **reproducible** (``seed=...``): every step's Poisson draw and noise come from a generator seeded with
  ``derive_seed(seed, ...)`` and the step (the Poisson draw also with the rank and the epoch; the noise also with the
  replica where every replica adds its own, under Local SGD and DiLoCo), so a run is repeatable and a resume is
  bit-exact. The seed (and with it anyone holding the code and the configuration) reveals the noise: for research
  and tests only.
* **secure** (``secure_mode=True``): a cryptographically secure generator (``torchcsprng``, as Opacus) and
  Opacus' noise that resists floating-point attacks.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import torch

from lightning_optx.functional import privacy as P


def entropy_seed() -> int:
    """A 63-bit seed from the operating system's entropy source."""
    return int.from_bytes(os.urandom(8), "little") >> 1


# torch's CPU generator state (CPUGeneratorImplState in aten/src/ATen/CPUGeneratorImpl.cpp): the legacy POD
# {uint64 the_initial_seed; int left; int seeded; uint64 next; uint64 state[624]; double normal_x, normal_y,
# normal_rho; int normal_is_valid} then {float next_float_normal_sample; bool valid}, 8-byte aligned: 5056 bytes.
_MT_WORDS = 624
_MT_STATE_OFFSET = 8 + 4 + 4 + 8
_CPU_STATE_BYTES = 5056


def fill_mt19937_state(generator: torch.Generator, entropy: bytes | None = None) -> torch.Generator:
    """Give a CPU ``generator`` a full Mersenne-Twister state of 624 random 32-bit words (from ``os.urandom``
    unless ``entropy``, 2496 bytes, is given), so that its stream has ~19,968 bits of entropy rather than the
    32 bits ``manual_seed`` keeps on CPU. The state is written, read back and checked, so a change of torch's
    state layout raises instead of silently seeding less.

    Examples:
        >>> a, b = fill_mt19937_state(torch.Generator()), fill_mt19937_state(torch.Generator())
        >>> bool(torch.rand(4, generator=a).ne(torch.rand(4, generator=b)).all())
        True
    """
    entropy = os.urandom(4 * _MT_WORDS) if entropy is None else entropy
    if len(entropy) != 4 * _MT_WORDS:
        raise ValueError(f"`entropy` must be {4 * _MT_WORDS} bytes, got {len(entropy)}.")
    words = struct.unpack(f"<{_MT_WORDS}I", entropy)
    generator.manual_seed(0)  # a valid, seeded state (left=1: the next draw twists all 624 words), caches cleared
    state = bytearray(generator.get_state().numpy().tobytes())
    if len(state) != _CPU_STATE_BYTES:
        raise RuntimeError(f"torch {torch.__version__}: the CPU generator state is {len(state)} bytes, not the "
                           f"{_CPU_STATE_BYTES} this filler was written for; cannot seed it from os.urandom safely.")
    struct.pack_into(f"<{_MT_WORDS}Q", state, _MT_STATE_OFFSET, *words)
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    if mt19937_words(generator) != list(words):
        raise RuntimeError(f"torch {torch.__version__}: the CPU generator did not keep the Mersenne-Twister state "
                           "written into it; cannot seed it from os.urandom safely.")
    return generator


def mt19937_words(generator: torch.Generator) -> list[int]:
    """The 624 Mersenne-Twister state words of a CPU generator."""
    state = generator.get_state().numpy().tobytes()
    return list(struct.unpack_from(f"<{_MT_WORDS}Q", state, _MT_STATE_OFFSET))


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``os.urandom`` (its seed is not kept anywhere): a full random
    Mersenne-Twister state on CPU, a 63-bit seed for CUDA's Philox generator (which uses all 64 bits)."""
    generator = torch.Generator(device=device)
    if generator.device.type == "cpu":
        return fill_mt19937_state(generator)
    return generator.manual_seed(entropy_seed())


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
        >>> a.started
        True
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
        #: the replica whose noise this is when every replica adds its own (reproducible seeds differ per replica)
        self.replica: int | None = None
        #: generators were created for the current fit (reset by :meth:`stop`)
        self.started = False

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
        self.started = True

    def stop(self) -> None:
        """Forget the generators at the end of a fit (the next fit creates new ones)."""
        self.sampling = self.noise = None
        self.started = False

    def before_step(self, step: int) -> None:
        """Reseed the noise of DP step ``step`` (reproducible mode only; a no-op otherwise)."""
        if self.reproducible and self.noise is not None:
            self.noise.manual_seed(P.derive_seed(self.seed, *self.noise_stream, step))

    @property
    def noise_stream(self) -> tuple[Any, ...]:
        """The parts (before the step) of a reproducible noise seed: one stream for a fit whose noise is added once
        (one process, or rank 0 under DDP), one per replica when every replica adds its own (Local SGD, DiLoCo)."""
        return ("noise",) if self.replica is None else ("noise", "replica", self.replica)

    @property
    def sampling_seed(self) -> int | None:
        """The base seed of the Poisson sampler's derived seeds; ``None`` unless reproducible (then the sampler
        must get :attr:`sampling`)."""
        return int(self.seed) if self.reproducible else None  # type: ignore[arg-type]
