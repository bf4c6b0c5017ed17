"""The script of a demo run: traffic rate, when the inputs shift, when an arm breaks (pure).

Times are seconds since the first scenario request. Three phases:

* ``baseline``: held-out rows as they are; the bandit should find the best arm;
* ``shift``: from `drift_at_s`, the `drift_features` are multiplied by `drift_factor` (a scanner
  recalibration: texture readings come out higher) and stay so to the end — the drift monitors
  should alarm after this point and not before;
* ``broken``: from `degrade_at_s`, a new version of `degrade_model` (trained on shuffled labels,
  a broken label join in its pipeline) is dropped into the repository; the gateway swaps it in
  and the bandit, whose statistics are discounted with `half_life`, should move traffic away.

At `retrain_at_s` (in the broken phase) a retrained version of the `stump` arm arrives; that arm
has a progressive rollout (docs/lifecycle.md), so the version enters as a shadow and the feedback
worker promotes or rejects it on its own. The retrained version swapped the classes, so the
shadow test must reject it before it serves a single request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHASES = ("baseline", "shift", "broken")


@dataclass(frozen=True)
class Scenario:
    """One run's parameters. Raises ValueError when the times are out of order."""

    name: str
    rate_rps: float
    """Requests per second the product service sends (fixed rate, sampled rows)."""
    drift_at_s: float
    degrade_at_s: float
    end_s: float
    outcome_delay_mean_s: float
    """Mean of the exponential delay between a prediction and its outcome."""
    half_life: float
    """Route discounting in outcomes: how fast the bandit forgets (needed to notice the broken arm)."""
    exploration_floor: float
    drift_features: tuple[str, ...] = ("mean_texture", "worst_texture")
    drift_factor: float = 1.5
    degrade_model: str = "gbm"
    seed: int = 2
    retrain_at_s: float | None = None
    """When the retrained `stump` version arrives (None: it does not)."""
    episode_quiet_s: float = 600.0
    """Seconds without an alarm that close a drift or quality alarm episode (`drift.episode_quiet_s`,
    `feedback.quality_episode_quiet_s`). Shorter than in production so the run shows episodes
    resolve (the replaced `gbm` v1 goes quiet), longer than the gaps between a persisting
    drift's alarms at the arms' traffic, so no drift opens two episodes."""

    def __post_init__(self) -> None:
        if not 0 < self.drift_at_s < self.degrade_at_s < self.end_s:
            raise ValueError("scenario times must satisfy 0 < drift_at_s < degrade_at_s < end_s")
        if self.retrain_at_s is not None and not self.degrade_at_s < self.retrain_at_s < self.end_s:
            raise ValueError("retrain_at_s must be between degrade_at_s and end_s")
        if self.rate_rps <= 0 or self.outcome_delay_mean_s <= 0 or self.half_life <= 0:
            raise ValueError("rate_rps, outcome_delay_mean_s and half_life must be positive")

    @classmethod
    def quick(cls) -> Scenario:
        """Under two minutes end to end on a 2-core machine (used by the test suite)."""
        return cls(name="quick", rate_rps=60, drift_at_s=13, degrade_at_s=26, end_s=46,
                   outcome_delay_mean_s=0.8, half_life=150, exploration_floor=0.03, retrain_at_s=30,
                   episode_quiet_s=12)

    @classmethod
    def full(cls) -> Scenario:
        """The README's first command: about four minutes."""
        return cls(name="full", rate_rps=50, drift_at_s=60, degrade_at_s=120, end_s=200,
                   outcome_delay_mean_s=1.5, half_life=300, exploration_floor=0.03, retrain_at_s=140,
                   episode_quiet_s=30)

    @property
    def total_requests(self) -> int:
        return int(self.rate_rps * self.end_s)

    def phase(self, t_s: float) -> str:
        """The phase at `t_s` seconds into the scenario."""
        if t_s < self.drift_at_s:
            return "baseline"
        if t_s < self.degrade_at_s:
            return "shift"
        return "broken"

    def phase_bounds(self, phase: str) -> tuple[float, float]:
        """[start, end) of a phase in scenario seconds. Raises KeyError for an unknown phase."""
        return {"baseline": (0.0, self.drift_at_s), "shift": (self.drift_at_s, self.degrade_at_s),
                "broken": (self.degrade_at_s, self.end_s)}[phase]

    def shifted(self, rows: np.ndarray, feature_names: list[str]) -> np.ndarray:
        """A copy of `rows` [n, features] with the covariate shift applied."""
        out = np.array(rows, dtype=np.float32, copy=True)
        for name in self.drift_features:
            out[:, feature_names.index(name)] *= self.drift_factor
        return out
