"""The math behind every method, as plain-tensor functions with no Lightning import."""

from lightning_optx.functional import diloco, grades, grokfast, local_sgd, schedules, surgery

__all__ = ["diloco", "grades", "grokfast", "local_sgd", "schedules", "surgery"]
