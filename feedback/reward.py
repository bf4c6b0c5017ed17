"""Rewards: checking an outcome's reward against its route, and mean reward with an interval (pure).

An outcome's ``reward`` scores the arm that served the request. A ``bernoulli`` route takes
rewards in [0, 1] (a fractional reward counts as a fractional success, as in
:mod:`router.arm_stats`); a ``gaussian`` route takes any finite number.

:class:`RewardStats` is three numbers, mergeable with ``+`` so per-bucket and per-worker
statistics add up (the feedback worker keeps them in Redis hashes as running sums).

>>> stats = RewardStats().updated(1.0).updated(0.0).updated(1.0).updated(1.0)
>>> stats.n, stats.mean
(4.0, 0.75)
>>> low, high = stats.interval(0.95, "bernoulli")
>>> round(low, 3), round(high, 3)
(0.301, 0.954)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

RewardKind = Literal["bernoulli", "gaussian"]


class RewardError(ValueError):
    """A reward does not fit its route (e.g. 3.0 on a bernoulli route). `reason` is a REASONS code."""

    reason = "out_of_range"


def checked_reward(reward: float, kind: RewardKind) -> float:
    """Return `reward` as a float if it fits a route of `kind`; raise RewardError otherwise."""
    value = float(reward)
    if not math.isfinite(value):
        raise RewardError(f"reward {reward!r} is not finite")
    if kind == "bernoulli" and not 0.0 <= value <= 1.0:
        raise RewardError(f"reward {value:g} is outside [0, 1] on a bernoulli route")
    return value


def z_value(confidence: float) -> float:
    """Two-sided standard normal quantile for `confidence` in (0, 1), e.g. 0.95 -> 1.96."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when n is 0. Works for fractional counts."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = min(1.0, max(0.0, successes / n))
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class RewardStats:
    """Count, sum and sum of squares of rewards (mergeable)."""

    n: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    def updated(self, reward: float) -> RewardStats:
        """These statistics plus one reward."""
        return RewardStats(self.n + 1.0, self.total + reward, self.total_sq + reward * reward)

    def __add__(self, other: RewardStats) -> RewardStats:
        return RewardStats(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        """Mean reward (0 with no rewards)."""
        return self.total / self.n if self.n > 0 else 0.0

    @property
    def variance(self) -> float:
        """Unbiased sample variance (0 with fewer than two rewards)."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1.0))

    def interval(self, confidence: float, kind: RewardKind) -> tuple[float, float]:
        """Confidence interval for the mean reward: Wilson for bernoulli rewards, normal
        approximation (mean ± z·s/√n) for gaussian ones. (0, 1) or (0, 0) with no rewards."""
        if kind == "bernoulli":
            return wilson_interval(self.total, self.n, confidence)
        if self.n <= 0:
            return 0.0, 0.0
        half = z_value(confidence) * math.sqrt(self.variance / self.n)
        return self.mean - half, self.mean + half
