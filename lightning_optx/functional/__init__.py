"""The math behind every method, as plain-tensor functions with no Lightning import."""

from lightning_optx.functional import grokfast

__all__ = ["grokfast"]
