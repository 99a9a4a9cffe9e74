"""Lightning callbacks: thin adapters around the math in :mod:`lightning_optx.functional`."""

from lightning_optx.callbacks.grokfast import Grokfast

__all__ = ["Grokfast"]
