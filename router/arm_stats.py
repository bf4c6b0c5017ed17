"""Per-arm sufficient statistics: mergeable, discountable, a few numbers each (pure: numpy only).

One :class:`ArmStats` holds, for the outcomes an arm has received, their total weight (the
effective number of outcomes), their weighted mean and their weighted sum of squared deviations
from that mean (``m2``, Welford/West). That is enough for both conjugate models the router uses:

* Beta-Bernoulli: successes = ``weight * mean``, failures = ``weight - successes``
  (rewards in [0, 1]; a fractional reward counts as a fractional success);
* Normal-Inverse-Gamma: ``weight``, ``mean`` and ``m2`` are its sufficient statistics.

Discounting (``half_life`` in outcomes of the route) multiplies ``weight`` and ``m2`` of every arm
by ``2 ** (-1 / half_life)`` per outcome of the route; the mean is unchanged by decay. Because the
factor is the same for every arm, it can be applied lazily: an arm remembers the route's outcome
counter when it was last touched and is decayed by the elapsed count when it is next read or
updated (what the Redis store does), which is exactly equivalent to decaying all arms per outcome.

>>> stats = ArmStats.empty().updated(1.0).updated(0.0).updated(1.0)
>>> round(stats.mean, 4), stats.weight
(0.6667, 3.0)
>>> round((stats + ArmStats.empty().updated(0.0)).mean, 4)
0.5
>>> stats.decayed(decay_factor(100, half_life=100)).weight
1.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

ARM_STATES = ("active", "drained")


@dataclass(frozen=True, slots=True)
class ArmStats:
    """Weighted outcome statistics of one arm. Immutable: operations return new values."""

    weight: float = 0.0
    """Effective number of outcomes (decayed count)."""
    mean: float = 0.0
    """Weighted mean reward (0 when ``weight`` is 0)."""
    m2: float = 0.0
    """Weighted sum of squared deviations from ``mean``."""

    @classmethod
    def empty(cls) -> ArmStats:
        return cls()

    @classmethod
    def from_rewards(cls, rewards: list[float] | tuple[float, ...]) -> ArmStats:
        """Statistics of a list of rewards, each with weight 1."""
        stats = cls()
        for reward in rewards:
            stats = stats.updated(reward)
        return stats

    @property
    def reward_sum(self) -> float:
        """Weighted sum of rewards (successes for a Bernoulli arm)."""
        return self.weight * self.mean

    @property
    def variance(self) -> float:
        """Weighted population variance of the rewards (0 with less than one outcome of weight)."""
        return self.m2 / self.weight if self.weight > 0 else 0.0

    def updated(self, reward: float, weight: float = 1.0) -> ArmStats:
        """These statistics plus one reward of the given weight (West's weighted update).

        Raises ValueError for a non-finite reward or a negative or non-finite weight.
        """
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
        if weight == 0:
            return self
        total = self.weight + weight
        delta = reward - self.mean
        mean = self.mean + delta * weight / total
        return ArmStats(weight=total, mean=mean, m2=self.m2 + weight * delta * (reward - mean))

    def __add__(self, other: ArmStats) -> ArmStats:
        """Merge two disjoint sets of outcomes (Chan et al.'s parallel formula)."""
        if not isinstance(other, ArmStats):
            return NotImplemented
        total = self.weight + other.weight
        if total == 0:
            return ArmStats()
        delta = other.mean - self.mean
        mean = self.mean + delta * other.weight / total
        m2 = self.m2 + other.m2 + delta * delta * self.weight * other.weight / total
        return ArmStats(weight=total, mean=mean, m2=m2)

    def decayed(self, factor: float) -> ArmStats:
        """Old evidence weighs ``factor`` (in [0, 1]) times as much; the mean is unchanged.

        Raises ValueError for a factor outside [0, 1].
        """
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"decay factor must be in [0, 1], got {factor!r}")
        if factor == 0:
            return ArmStats()
        return ArmStats(weight=self.weight * factor, mean=self.mean, m2=self.m2 * factor)


def decay_factor(outcomes: float, half_life: float | None) -> float:
    """Weight left after `outcomes` further outcomes of the route: ``2 ** (-outcomes / half_life)``.

    Returns 1 when `half_life` is None (no discounting). Raises ValueError for a negative count
    or a non-positive half-life.
    """
    if outcomes < 0:
        raise ValueError(f"outcomes must be >= 0, got {outcomes!r}")
    if half_life is None:
        return 1.0
    if not half_life > 0:
        raise ValueError(f"half_life must be > 0, got {half_life!r}")
    return 2.0 ** (-outcomes / half_life)


@dataclass(frozen=True, slots=True)
class ArmSnapshot:
    """What the store knows about one arm at snapshot time."""

    stats: ArmStats = ArmStats()
    state: str = "active"
    """``active`` or ``drained`` (admin or guardrail)."""
    calls: int = 0
    """Requests served (gateway counters, undecayed), for the guardrail's error-rate test."""
    errors: int = 0
    """Of those, how many failed."""


_EMPTY_ARM = ArmSnapshot()  # immutable: one instance serves every arm a store has never heard of


@dataclass(frozen=True, slots=True)
class RouteSnapshot:
    """All arms of one route as read in one round trip; statistics already decayed to read time."""

    route: str
    arms: Mapping[str, ArmSnapshot] = field(default_factory=dict)
    outcome_count: int = 0
    """Outcomes the route has counted so far (the discounting clock)."""
    unusable: tuple[str, ...] = ()
    """Arms whose stored statistics are not numbers: drained here, never sampled from."""

    def arm(self, name: str) -> ArmSnapshot:
        """The named arm, or an empty active one if the store has never heard of it."""
        return self.arms.get(name, _EMPTY_ARM)

    @property
    def drained(self) -> frozenset[str]:
        return frozenset(name for name, arm in self.arms.items() if arm.state == "drained")
