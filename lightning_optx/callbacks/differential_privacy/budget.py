"""The privacy budget of a fit: the noise multiplier (given, calibrated, or re-calibrated on a resume that changed
the sample rate), the accountant's per-step record, and the guard that refuses a step beyond the budget.

:class:`PrivacyBudget` is mixed into :class:`~lightning_optx.callbacks.DifferentialPrivacy`; the arithmetic is
:mod:`lightning_optx.functional.privacy` (Opacus' accountants).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_optx.functional import privacy as P

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


class PrivacyBudget:
    """Noise resolution, accounting and the budget guard (state lives on the callback)."""

    noise_multiplier: float | None
    target_epsilon: float | None
    target_delta: float
    stop_at_epsilon: float | None
    accountant_name: Any
    accountant: Any
    resolved_noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    skipped_over_budget: int
    randomness: Any
    _calibrated: bool
    _planned_total: int | None
    _allowed_steps: int | None
    _warned_budget: bool
    _trainer: pl.Trainer | None

    def _resolve_noise(self, trainer: pl.Trainer, planned: float, restored_rate: float | None,
                       restored_spe: int | None) -> None:
        assert self.sample_rate is not None
        rate_changed = self.steps > 0 and restored_rate is not None and restored_rate != self.sample_rate
        if self.noise_multiplier is not None:
            if rate_changed:
                raise ValueError(
                    f"DifferentialPrivacy: the checkpoint was written at sample rate {restored_rate:.6g}, this run "
                    f"samples at {self.sample_rate:.6g} (the world size, batch size or data set changed) and "
                    f"noise_multiplier={self.noise_multiplier} is fixed, so the privacy spent would not be what was "
                    "planned. Resume with the same devices and batch size, or pass target_epsilon=... instead of "
                    "noise_multiplier to have the noise of the remaining steps re-calibrated."
                )
            self.resolved_noise_multiplier = self.noise_multiplier
            return
        if not math.isfinite(planned) or planned < 1:
            raise ValueError("DifferentialPrivacy(target_epsilon=...) needs a finite training length (max_steps or "
                             "max_epochs) to calibrate the noise.")
        assert self.target_epsilon is not None
        remaining = self._remaining_steps(trainer, int(planned), restored_spe)
        self._planned_total = self.steps + remaining
        history = P.merge_history(self.accountant.history)
        if not history:
            self.resolved_noise_multiplier = P.noise_multiplier_for_epsilon(
                self.target_epsilon, self.target_delta, self.sample_rate, remaining, self.accountant_name)
        elif self._calibrated and self.resolved_noise_multiplier is not None and P.epsilon_of_history(
                P.merge_history([*history, (self.resolved_noise_multiplier, self.sample_rate, remaining)]),
                self.target_delta, self.accountant_name) <= self.target_epsilon:
            return  # a resume whose plan still fits: keep the noise (and bit-exact reproducibility)
        else:
            previous = self.resolved_noise_multiplier
            self.resolved_noise_multiplier = P.noise_multiplier_for_remaining(
                self.target_epsilon, self.target_delta, history, self.sample_rate, remaining, self.accountant_name)
            rank_zero_warn(f"DifferentialPrivacy: re-calibrated noise_multiplier {previous} -> "
                           f"{self.resolved_noise_multiplier:.4f} for the remaining {remaining} steps at sample rate "
                           f"{self.sample_rate:.5g} (was {restored_rate}), so that epsilon stays <= "
                           f"{self.target_epsilon} after the {self.steps} steps already taken.")
        self._calibrated = True
        rank_zero_info(f"DifferentialPrivacy: noise_multiplier={self.resolved_noise_multiplier:.4f} for epsilon <= "
                       f"{self.target_epsilon} at delta={self.target_delta} after {self._planned_total} steps "
                       f"(sample rate {self.sample_rate:.5g}).")

    def _remaining_steps(self, trainer: pl.Trainer, planned: int, restored_spe: int | None) -> int:
        """Steps still to take. On an epoch-bound resume whose steps per epoch changed, ``planned - steps``
        undercounts (the epochs done had another length): count the epochs left at the new length instead."""
        remaining = planned - self.steps
        if self.steps and restored_spe and trainer.max_steps in (-1, None) and trainer.max_epochs:
            epochs_left = trainer.max_epochs - self.steps // restored_spe
            remaining = max(remaining, math.ceil(epochs_left * planned / trainer.max_epochs))
        return max(1, remaining)

    # ------------------------------------------------------------------ accounting and the budget

    def _account_step(self, optimizer: DPOptimizer) -> None:
        """Opacus step hook: runs once per optimizer step, after the noise, before the update."""
        assert self.sample_rate is not None
        self.accountant.step(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=self.sample_rate)
        self.steps += 1

    def _compute_allowed_steps(self) -> int | None:
        """Total DP steps (counting those already taken) that keep epsilon <= stop_at_epsilon, and, with
        target_epsilon, within the steps the noise was calibrated for (so <= target_epsilon)."""
        allowed = None
        if self.target_epsilon is not None and self.noise_multiplier is None:
            allowed = self._planned_total
        if self.stop_at_epsilon is not None:
            assert self.resolved_noise_multiplier is not None and self.sample_rate is not None
            more = P.steps_until_budget(self.resolved_noise_multiplier, self.sample_rate, self.target_delta,
                                        self.stop_at_epsilon, self.accountant_name, history=self.accountant.history)
            allowed = self.steps + more if allowed is None else min(allowed, self.steps + more)
        return allowed

    def _step_allowed(self) -> bool:
        """Called by the DP optimizer before clipping and noise: refuse a step beyond the budget."""
        if self._allowed_steps is None or self.steps < self._allowed_steps:
            return True
        self.skipped_over_budget += 1
        if self._trainer is not None:
            self._trainer.should_stop = True
        if not self._warned_budget:
            rank_zero_warn(f"DifferentialPrivacy: the next step would take epsilon above the budget (stop_at_epsilon="
                           f"{self.stop_at_epsilon}, target_epsilon={self.target_epsilon}); the DP optimizer skips "
                           "it (training continued past the stop, e.g. because of min_steps/min_epochs).")
            self._warned_budget = True
        return False

    def _before_noise(self) -> None:
        self.randomness.before_step(self.steps)

