"""Shared test harness: tiny models and data, an N-process Trainer runner, exact state comparison."""

from tests.helpers.compare import assert_ranks_identical, assert_tree_equal, tree_differences
from tests.helpers.resume import check_resume_equivalence
from tests.helpers.runner import InMemoryLogger, RankResult, TrainJob, run_distributed, run_job

__all__ = [
    "InMemoryLogger",
    "RankResult",
    "TrainJob",
    "assert_ranks_identical",
    "assert_tree_equal",
    "check_resume_equivalence",
    "run_distributed",
    "run_job",
    "tree_differences",
]
