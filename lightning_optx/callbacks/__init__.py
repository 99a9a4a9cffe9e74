"""Lightning callbacks: thin adapters around the math in :mod:`lightning_optx.functional`."""

from lightning_optx.callbacks.differential_privacy import DifferentialPrivacy
from lightning_optx.callbacks.dropout import DropoutSchedule, EarlyDropout, LateDropout
from lightning_optx.callbacks.grades import GradES
from lightning_optx.callbacks.gradient_surgery import GradientSurgery
from lightning_optx.callbacks.grokfast import Grokfast

__all__ = [
    "DifferentialPrivacy",
    "DropoutSchedule", "EarlyDropout", "GradES", "GradientSurgery", "Grokfast", "LateDropout"]
