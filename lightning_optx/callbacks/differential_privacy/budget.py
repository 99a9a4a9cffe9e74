"""The privacy budget of a fit: the noise multiplier (given, calibrated, or re-calibrated on a resume that changed
the sample rate), the accountant's per-step record, the guard that refuses a step beyond the budget, and the
checkpointed state (the same on every rank, also under Local SGD and DiLoCo: every replica has the same noise
multiplier, sample rate and steps).

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

_STATE_VERSION = 2


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
    _allowed_for: tuple[float | None, float | None, int] | None
    _dp_optimizer: Any
    expected_batch_size: float | None
    _steps_per_epoch: int | None
    clipping: str
    _restored_max_grad_norm: float | None
    _eps_cache: Any
    _ended_a_fit: bool

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

    def _rate_changed_mid_fit(self, trainer: pl.Trainer, previous_rate: float) -> None:
        """The training loader was rebuilt during the fit (``reload_dataloaders_every_n_epochs``) with another
        sample rate (its batch size or data set changed): re-calibrate the noise of the remaining steps so that
        epsilon stays within ``target_epsilon``, or refuse when the noise multiplier is fixed."""
        assert self.sample_rate is not None
        if self.noise_multiplier is not None or self.target_epsilon is None:
            raise ValueError(
                f"DifferentialPrivacy: the training loader was reloaded during the fit with sample rate "
                f"{self.sample_rate:.6g} (was {previous_rate:.6g}: its batch size or data set changed) and "
                f"noise_multiplier={self.noise_multiplier} is fixed, so the privacy spent would not be what was "
                "planned. Keep the batch size and data set constant within a fit, or pass target_epsilon=... instead "
                "of noise_multiplier to have the noise of the remaining steps re-calibrated."
            )
        remaining = self._remaining_steps_mid_fit(trainer)
        history = P.merge_history(self.accountant.history)
        previous = self.resolved_noise_multiplier
        if history:
            self.resolved_noise_multiplier = P.noise_multiplier_for_remaining(
                self.target_epsilon, self.target_delta, history, self.sample_rate, remaining, self.accountant_name)
        else:
            self.resolved_noise_multiplier = P.noise_multiplier_for_epsilon(
                self.target_epsilon, self.target_delta, self.sample_rate, remaining, self.accountant_name)
        self._planned_total = self.steps + remaining
        if self._dp_optimizer is not None:
            assert self.expected_batch_size is not None
            self._dp_optimizer.noise_multiplier = self.resolved_noise_multiplier
            self._dp_optimizer.expected_batch_size = self.expected_batch_size / trainer.world_size
        rank_zero_warn(f"DifferentialPrivacy: the training loader was reloaded with sample rate {self.sample_rate:.5g} "
                       f"(was {previous_rate:.5g}); re-calibrated noise_multiplier {previous} -> "
                       f"{self.resolved_noise_multiplier:.4f} for the remaining {remaining} steps, so that epsilon "
                       f"stays <= {self.target_epsilon} after the {self.steps} steps already taken.")
        self._allowed_steps = self._compute_allowed_steps()

    def _remaining_steps_mid_fit(self, trainer: pl.Trainer) -> int:
        """Optimizer steps left in this fit from the epoch whose loader was just built (an over-estimate only
        adds noise; the budget guard stops at the planned total either way)."""
        assert self._steps_per_epoch is not None
        bounds = []
        if trainer.max_steps not in (-1, None):
            bounds.append(trainer.max_steps - trainer.global_step)
        if trainer.max_epochs not in (-1, None):
            bounds.append((trainer.max_epochs - trainer.current_epoch) * self._steps_per_epoch)
        if not bounds:
            raise ValueError("DifferentialPrivacy(target_epsilon=...) needs a finite training length (max_steps or "
                             "max_epochs) to re-calibrate the noise.")
        return max(1, min(bounds))

    def _compute_allowed_steps(self) -> int | None:
        """Total DP steps (counting those already taken) that keep epsilon <= stop_at_epsilon and, with
        target_epsilon, <= target_epsilon and within the steps the noise was calibrated for. Computed on the
        accountant itself for the current noise multiplier and sample rate (:meth:`_step_allowed` recomputes it
        when either changes)."""
        assert self.resolved_noise_multiplier is not None and self.sample_rate is not None
        sigma, rate, history = self.resolved_noise_multiplier, self.sample_rate, self.accountant.history
        self._allowed_for = (sigma, rate, len(history))
        allowed = None
        if self.target_epsilon is not None and self.noise_multiplier is None and self._planned_total is not None:
            allowed = self._planned_total
            remaining = self._planned_total - self.steps
            if remaining > 0 and P.epsilon_of_history(P.merge_history([*history, (sigma, rate, remaining)]),
                                                      self.target_delta, self.accountant_name) > self.target_epsilon:
                more = P.steps_until_budget(sigma, rate, self.target_delta, self.target_epsilon, self.accountant_name,
                                            history=history)
                allowed = min(allowed, self.steps + more)
        if self.stop_at_epsilon is not None:
            more = P.steps_until_budget(sigma, rate, self.target_delta, self.stop_at_epsilon, self.accountant_name,
                                        history=history)
            allowed = self.steps + more if allowed is None else min(allowed, self.steps + more)
        return allowed

    def _step_allowed(self) -> bool:
        """Called by the DP optimizer before clipping and noise: refuse a step beyond the budget."""
        if self._allowed_for is None or self._allowed_for[:2] != (self.resolved_noise_multiplier, self.sample_rate):
            self._allowed_steps = self._compute_allowed_steps()  # the noise or the rate changed since computed
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

    # ------------------------------------------------------------------ checkpointing (the same on every rank)

    def state_dict(self) -> dict[str, Any]:
        max_grad_norm = None
        if self.clipping == "adaptive" and self._dp_optimizer is not None:
            max_grad_norm = float(self._dp_optimizer.max_grad_norm)
        return {
            "version": _STATE_VERSION,
            "accountant": self.accountant_name,
            "history": [(float(s), float(q), int(n)) for s, q, n in self.accountant.history],
            "steps": self.steps,
            "noise_multiplier": self.resolved_noise_multiplier,
            "calibrated": self._calibrated,
            "sample_rate": self.sample_rate,
            "target_delta": self.target_delta,
            "steps_per_epoch": self._steps_per_epoch,
            "max_grad_norm": max_grad_norm,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("accountant") != self.accountant_name:
            raise ValueError(f"DifferentialPrivacy: the checkpoint's accountant={state_dict.get('accountant')!r} "
                             f"differs from accountant={self.accountant_name!r}; resume with the same accountant.")
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state_dict["history"]]
        self.steps = int(state_dict["steps"])
        self._calibrated = bool(state_dict.get("calibrated", False)) and self.target_epsilon is not None
        if self._calibrated:
            self.resolved_noise_multiplier = float(state_dict["noise_multiplier"])
        self.sample_rate = state_dict.get("sample_rate")
        self._steps_per_epoch = state_dict.get("steps_per_epoch")
        self._restored_max_grad_norm = state_dict.get("max_grad_norm")
        self._eps_cache = None
        self._ended_a_fit = False

