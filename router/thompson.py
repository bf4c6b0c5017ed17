"""Thompson-sampling posteriors: batch sampling and the probability that each arm is best (pure).

Two conjugate models, both arrays over arms (last axis) with any leading batch axes, so the same
code serves one route in the gateway and thousands of simulated seeds in the benchmark:

* :class:`BetaPosterior` - Beta-Bernoulli, prior Beta(1, 1); rewards in [0, 1].
* :class:`StudentTPosterior` - the marginal posterior of an arm's mean under a
  Normal-Inverse-Gamma model (unknown mean and variance), prior NIG(mean 0, weight 0.01,
  shape 1, scale 1). Sampling the mean from its Student-t marginal is exactly Thompson sampling
  of the NIG model (variance integrated out) and takes one numpy call.

:func:`probability_best` is the propensity of plain Thompson sampling: P(arm i has the largest
draw) = integral of f_i(x) * prod_{j != i} F_j(x) dx, computed by deterministic quadrature on a
grid that is dense where each arm's posterior has its mass (sinh-spaced nodes, so heavy t tails
are covered too, plus nodes at and towards the ends of a bounded support). Against a 4001-node
reference its largest error over 400 random Beta posteriors (counts from 0 to 10^5) is 2e-4
(Student-t: 1.3e-4), and it agrees with Monte Carlo of 400 000 draws within Monte Carlo noise;
the promise documented to callers is +-0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from router.arm_stats import ArmStats


class Posterior(Protocol):
    """What Thompson sampling and the quadrature need from a posterior family."""

    def sample(self, rng: np.random.Generator, count: int | None = None) -> np.ndarray: ...
    def location_scale(self) -> tuple[np.ndarray, np.ndarray]: ...
    def log_density(self, x: np.ndarray) -> np.ndarray: ...
    def support(self) -> tuple[float, float]: ...
    def mean(self) -> np.ndarray: ...


@dataclass(frozen=True)
class BetaPrior:
    """Beta prior pseudo-counts. Both must be >= 1 (keeps the density bounded for the quadrature)."""

    alpha: float = 1.0
    beta: float = 1.0


@dataclass(frozen=True)
class NormalInverseGammaPrior:
    """NIG prior: mean `mean` worth `weight` outcomes; variance ~ InvGamma(`shape`, `scale`)."""

    mean: float = 0.0
    weight: float = 0.01
    shape: float = 1.0
    scale: float = 1.0


class BetaPosterior:
    """Beta(alpha, beta) per arm; arrays of equal shape, arms on the last axis."""

    def __init__(self, alpha: np.ndarray, beta: np.ndarray) -> None:
        self.alpha = np.asarray(alpha, dtype=np.float64)
        self.beta = np.asarray(beta, dtype=np.float64)
        if self.alpha.shape != self.beta.shape or np.any(self.alpha < 1) or np.any(self.beta < 1):
            raise ValueError("BetaPosterior needs alpha and beta of the same shape, all >= 1")

    @classmethod
    def from_counts(cls, weight: np.ndarray, successes: np.ndarray, prior: BetaPrior = BetaPrior()) -> BetaPosterior:
        """Posterior after `successes` out of `weight` (weighted) outcomes; successes clipped to [0, weight]."""
        weight = np.maximum(np.asarray(weight, dtype=np.float64), 0.0)
        successes = np.clip(np.asarray(successes, dtype=np.float64), 0.0, weight)
        return cls(prior.alpha + successes, prior.beta + (weight - successes))

    @classmethod
    def from_stats(cls, stats: list[ArmStats], prior: BetaPrior = BetaPrior()) -> BetaPosterior:
        return cls.from_counts(np.array([s.weight for s in stats]), np.array([s.reward_sum for s in stats]), prior)

    def sample(self, rng: np.random.Generator, count: int | None = None) -> np.ndarray:
        """One draw per arm; with `count`, shape (*batch, count, arms) in a single numpy call."""
        if count is None:
            return rng.beta(self.alpha, self.beta)
        batch = self.alpha.shape[:-1]
        return rng.beta(self.alpha[..., None, :], self.beta[..., None, :], size=(*batch, count, self.alpha.shape[-1]))

    def mean(self) -> np.ndarray:
        return self.alpha / (self.alpha + self.beta)

    def location_scale(self) -> tuple[np.ndarray, np.ndarray]:
        total = self.alpha + self.beta
        return self.mean(), np.sqrt(self.alpha * self.beta / (total * total * (total + 1.0)))

    def support(self) -> tuple[float, float]:
        return 0.0, 1.0

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """Unnormalised log density at x (arms broadcast on axis -2 of x's grid axis -1)."""
        a = self.alpha[..., None] - 1.0
        b = self.beta[..., None] - 1.0
        # a or b is 0 for an arm without successes/failures: 0 * log(0) must be 0, not nan
        return a * np.log(np.maximum(x, 1e-300)) + b * np.log(np.maximum(1.0 - x, 1e-300))


class StudentTPosterior:
    """Marginal posterior of each arm's mean under NIG: loc + scale * t(dof)."""

    def __init__(self, loc: np.ndarray, scale: np.ndarray, dof: np.ndarray) -> None:
        self.loc = np.asarray(loc, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.dof = np.asarray(dof, dtype=np.float64)
        if not (self.loc.shape == self.scale.shape == self.dof.shape) or np.any(self.scale <= 0) or np.any(self.dof <= 0):
            raise ValueError("StudentTPosterior needs loc, scale, dof of one shape with scale > 0 and dof > 0")

    @classmethod
    def from_moments(cls, weight: np.ndarray, mean: np.ndarray, m2: np.ndarray,
                     prior: NormalInverseGammaPrior = NormalInverseGammaPrior()) -> StudentTPosterior:
        """NIG update from weighted count, mean and sum of squared deviations (conjugate, exact)."""
        weight = np.maximum(np.asarray(weight, dtype=np.float64), 0.0)
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.maximum(np.asarray(m2, dtype=np.float64), 0.0)
        kappa = prior.weight + weight
        loc = (prior.weight * prior.mean + weight * mean) / kappa
        shape = prior.shape + weight / 2.0
        scale = prior.scale + m2 / 2.0 + prior.weight * weight * (mean - prior.mean) ** 2 / (2.0 * kappa)
        return cls(loc, np.sqrt(scale / (shape * kappa)), 2.0 * shape)

    @classmethod
    def from_stats(cls, stats: list[ArmStats],
                   prior: NormalInverseGammaPrior = NormalInverseGammaPrior()) -> StudentTPosterior:
        return cls.from_moments(np.array([s.weight for s in stats]), np.array([s.mean for s in stats]),
                                np.array([s.m2 for s in stats]), prior)

    def sample(self, rng: np.random.Generator, count: int | None = None) -> np.ndarray:
        """One draw of each arm's mean; with `count`, shape (*batch, count, arms), one numpy call."""
        if count is None:
            return self.loc + self.scale * rng.standard_t(self.dof)
        batch = self.loc.shape[:-1]
        draws = rng.standard_t(self.dof[..., None, :], size=(*batch, count, self.loc.shape[-1]))
        return self.loc[..., None, :] + self.scale[..., None, :] * draws

    def mean(self) -> np.ndarray:
        return self.loc.copy()

    def location_scale(self) -> tuple[np.ndarray, np.ndarray]:
        return self.loc, self.scale

    def support(self) -> tuple[float, float]:
        return -np.inf, np.inf

    def log_density(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.loc[..., None]) / self.scale[..., None]
        dof = self.dof[..., None]
        return -0.5 * (dof + 1.0) * np.log1p(z * z / dof) - np.log(self.scale[..., None])


_BOUNDARY_STEPS = np.geomspace(1e-9, 0.05, 24)


def _bounded_nodes(low: float, high: float) -> np.ndarray:
    width = high - low
    return np.concatenate([np.linspace(low, high, 33), low + width * _BOUNDARY_STEPS, high - width * _BOUNDARY_STEPS])


def probability_best(posterior: Posterior, nodes_per_arm: int = 161, span: float = 7.0) -> np.ndarray:
    """P(each arm's Thompson draw is the largest), shape (*batch, arms), summing to 1.

    Deterministic quadrature; `nodes_per_arm` sinh-spaced nodes cover loc +- sinh(span) scales
    of each arm (about +-550 scales at the default, so even t(2) tails are inside). Cost is
    O(arms^2 * arms * nodes_per_arm) per batch entry: computed once per snapshot, never per request.
    """
    loc, scale = posterior.location_scale()
    arms = loc.shape[-1]
    if arms == 1:
        return np.ones_like(loc)
    low, high = posterior.support()
    offsets = np.sinh(np.linspace(-span, span, nodes_per_arm))
    grid = (loc[..., :, None] + scale[..., :, None] * offsets).reshape(*loc.shape[:-1], arms * nodes_per_arm)
    if np.isfinite(low) and np.isfinite(high):
        # a bounded support gets its own nodes: both ends, an even spread, and geometric steps
        # towards each end, where a Beta density with a shape in (1, 2) has an infinite slope
        grid = np.clip(np.concatenate([grid, np.broadcast_to(_bounded_nodes(low, high), (*grid.shape[:-1],
                                                                                        len(_BOUNDARY_STEPS) * 2 + 33))],
                                      axis=-1), low, high)
    grid = np.sort(grid, axis=-1)
    log_density = posterior.log_density(grid[..., None, :])  # (*batch, arms, grid)
    density = np.exp(log_density - log_density.max(axis=-1, keepdims=True))
    width = np.diff(grid, axis=-1)[..., None, :]
    pieces = 0.5 * (density[..., 1:] + density[..., :-1]) * width
    cdf = np.concatenate([np.zeros_like(density[..., :1]), np.cumsum(pieces, axis=-1)], axis=-1)
    total = cdf[..., -1:]
    density = density / total
    cdf = cdf / total
    # product of the other arms' CDFs from prefix and suffix products (no division by a zero
    # CDF); a Python loop over arms keeps every array operation contiguous
    others = [np.ones_like(cdf[..., 0, :]) for _ in range(arms)]
    running = np.ones_like(cdf[..., 0, :])
    for arm in range(1, arms):
        running = running * cdf[..., arm - 1, :]
        others[arm] = running
    running = np.ones_like(cdf[..., 0, :])
    for arm in range(arms - 2, -1, -1):
        running = running * cdf[..., arm + 1, :]
        others[arm] = others[arm] * running
    integrand = density * np.stack(others, axis=-2)
    best = np.sum(0.5 * (integrand[..., 1:] + integrand[..., :-1]) * width, axis=-1)
    best = np.maximum(best, 0.0)
    return best / best.sum(axis=-1, keepdims=True)
