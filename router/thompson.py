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
from scipy import special  # type: ignore[import-untyped]  # scipy ships no stubs; results go through np.asarray

from router.arm_stats import ArmStats


class Posterior(Protocol):
    """What Thompson sampling and the quadrature need from a posterior family."""

    def sample(self, rng: np.random.Generator, count: int | None = None) -> np.ndarray: ...
    def location_scale(self) -> tuple[np.ndarray, np.ndarray]: ...
    def log_density(self, grid: np.ndarray, arms: np.ndarray) -> np.ndarray: ...
    def cdf(self, x: np.ndarray, arms: np.ndarray) -> np.ndarray: ...
    def quantile(self, probability: np.ndarray, arms: np.ndarray) -> np.ndarray: ...
    def entry(self, index: tuple[int, ...]) -> Posterior: ...
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

    def log_density(self, grid: np.ndarray, arms: np.ndarray) -> np.ndarray:
        """Unnormalised log density of the given arms (1-D posterior) on a 1-D grid: (grid, arms)."""
        # a or b is 0 for an arm without successes/failures: 0 * log(0) must be 0, not nan
        out = np.multiply.outer(np.log(np.maximum(grid, 1e-300)), self.alpha[arms] - 1.0)
        out += np.multiply.outer(np.log(np.maximum(1.0 - grid, 1e-300)), self.beta[arms] - 1.0)
        return out

    def cdf(self, x: np.ndarray, arms: np.ndarray) -> np.ndarray:
        """P(arm's mean <= x) for the given arms of a 1-D posterior (regularised incomplete beta)."""
        return np.asarray(special.betainc(self.alpha[arms], self.beta[arms], x), dtype=np.float64)

    def quantile(self, probability: np.ndarray, arms: np.ndarray) -> np.ndarray:
        return np.asarray(special.betaincinv(self.alpha[arms], self.beta[arms], probability), dtype=np.float64)

    def entry(self, index: tuple[int, ...]) -> BetaPosterior:
        """The 1-D posterior of one batch entry."""
        return BetaPosterior(self.alpha[index], self.beta[index])


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

    def log_density(self, grid: np.ndarray, arms: np.ndarray) -> np.ndarray:
        """Log density (up to a constant per arm) of the given arms on a 1-D grid: (grid, arms)."""
        dof = self.dof[arms]
        z = (grid[:, None] - self.loc[arms]) / self.scale[arms]
        z *= z
        z /= dof
        return np.log1p(z, out=z) * (-0.5 * (dof + 1.0))

    def cdf(self, x: np.ndarray, arms: np.ndarray) -> np.ndarray:
        return np.asarray(special.stdtr(self.dof[arms], (x - self.loc[arms]) / self.scale[arms]), dtype=np.float64)

    def quantile(self, probability: np.ndarray, arms: np.ndarray) -> np.ndarray:
        return self.loc[arms] + self.scale[arms] * np.asarray(special.stdtrit(self.dof[arms], probability),
                                                              dtype=np.float64)

    def entry(self, index: tuple[int, ...]) -> StudentTPosterior:
        """The 1-D posterior of one batch entry."""
        return StudentTPosterior(self.loc[index], self.scale[index], self.dof[index])


_BOUNDARY_STEPS = np.geomspace(1e-9, 0.05, 24)
TAIL = 1e-10
"""Probability mass treated as negligible: the grid starts where the largest draw is below
with at most this probability, and an arm that exceeds that point with at most this probability
gets propensity 0 (its true value is below TAIL)."""
GRID_NODES = 384
"""Shared nodes per posterior (plus 24 towards each end of a bounded support); see :func:`probability_best`."""


def _sinh_segment(start: float, end: float, finest: float, nodes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Nodes start + sign * finest * sinh(u) for u uniform, from `start` to `end` (either order):
    the nodes, dx/du at them, and the step in u."""
    reach = float(np.arcsinh(abs(end - start) / finest))
    u = np.linspace(0.0, reach, nodes)
    grid = start + np.copysign(finest, end - start) * np.sinh(u)
    grid[-1] = end
    return grid, finest * np.cosh(u), reach / (nodes - 1)


def _interval_integrals(density: np.ndarray, step: float) -> np.ndarray:
    """Integral over each interval of a grid uniform in u (axis 0) of `density` (already times
    dx/du): the third-order rule through three neighbouring nodes, (5 g_i + 8 g_i+1 - g_i+2) step / 12."""
    unit = step / 12.0
    pieces = np.empty((density.shape[0] - 1, *density.shape[1:]), dtype=density.dtype)
    inner = pieces[:-1]
    np.multiply(density[1:-1], 8.0 * unit, out=inner)
    inner += density[:-2] * (5.0 * unit)
    inner -= density[2:] * unit
    pieces[-1] = (-density[-3] + 8.0 * density[-2] + 5.0 * density[-1]) * unit
    return pieces


def _assemble(segments: list[tuple[float, float, float, int]]
              ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, float, np.ndarray, bool]]]:
    """Join sinh segments ``(anchor, far end, scale, nodes)`` into one increasing grid.

    Consecutive segments share their meeting node (where dx/du differs on either side). Returns
    the grid, quadrature weights in x (the summed interval rules times dx/du), and per segment
    (first node, last node, step in u, dx/du at its nodes, whether its u runs against x)."""
    grids: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    bounds: list[tuple[int, int, float, np.ndarray, bool]] = []
    offset = 0
    for anchor, far, scale, nodes in segments:
        grid, stretch, step = _sinh_segment(anchor, far, scale, nodes)
        weights = _rule_weights(nodes, step) * stretch
        reverse = far < anchor
        if reverse:
            grid, stretch, weights = grid[::-1], stretch[::-1], weights[::-1]
        if grids:  # the first node is the previous segment's last
            offset -= 1
            weight_parts[-1] = weight_parts[-1].copy()
            weight_parts[-1][-1] += weights[0]
            bounds.append((offset, offset + nodes - 1, step, stretch, reverse))
            grid, weights = grid[1:], weights[1:]
        else:
            bounds.append((0, nodes - 1, step, stretch, reverse))
        grids.append(grid)
        weight_parts.append(weights)
        offset += nodes
    return np.concatenate(grids), np.concatenate(weight_parts), bounds


def _rule_weights(nodes: int, step: float) -> np.ndarray:
    """Weights w with sum_i w_i g_i = the sum of :func:`_interval_integrals` over all intervals."""
    weights = np.zeros(nodes)
    weights[:-2] += 5.0
    weights[1:-1] += 8.0
    weights[2:] -= 1.0
    weights[-3:] += (-1.0, 8.0, 5.0)
    return weights * (step / 12.0)


MAX_CENTRES = 8
"""Student-t grids cluster nodes around at most this many centres (each arm's core within
RESOLVED of its own scales from one, or the centres run out)."""
RESOLVED = 4.0


def _centres(loc: np.ndarray, scale: np.ndarray, relevant: np.ndarray, x_lo: float, x_hi: float
             ) -> list[tuple[float, float]]:
    """(centre, scale) pairs, increasing: the narrowest unresolved arm becomes a centre, until every
    relevant arm's location is within RESOLVED of its scales of a centre (or MAX_CENTRES)."""
    waiting = relevant[np.argsort(scale[relevant], kind="stable")]
    centres: list[tuple[float, float]] = []
    while len(waiting) and len(centres) < MAX_CENTRES:
        arm = waiting[0]
        centre = float(np.clip(loc[arm], x_lo, x_hi))
        if not any(abs(centre - other) <= 1e-12 * max(1.0, abs(centre)) for other, _ in centres):
            centres.append((centre, float(scale[arm])))
        waiting = waiting[np.abs(loc[waiting] - loc[arm]) > RESOLVED * scale[waiting]]
    return sorted(centres)


def _centred_segments(centres: list[tuple[float, float]], x_lo: float, x_hi: float, nodes: int
                      ) -> list[tuple[float, float, float, int]]:
    """Segments (anchor, far end, scale, nodes) covering [x_lo, x_hi] in increasing order: from each
    centre down and up to the meeting points with its neighbours (where their spacings are
    equal), nodes shared in proportion to each segment's length in u (at least 8 each)."""
    pieces: list[tuple[float, float, float]] = []
    edge = x_lo
    for index, (centre, scale) in enumerate(centres):
        if index + 1 < len(centres):
            following, following_scale = centres[index + 1]
            # where both sides' node spacings, (distance + scale) * step, are equal
            gap = following - centre
            meet = centre + float(np.clip(0.5 * (gap + following_scale - scale), 0.0, gap))
        else:
            meet = x_hi
        if centre > edge:
            pieces.append((centre, edge, scale))
        if meet > centre:
            pieces.append((centre, meet, scale))
        edge = meet
    reaches = np.array([np.arcsinh(abs(far - anchor) / scale) for anchor, far, scale in pieces])
    counts = np.maximum(8, np.round(nodes * reaches / reaches.sum()).astype(int))
    return [(anchor, far, scale, int(count)) for (anchor, far, scale), count in zip(pieces, counts)]


def _lower_tail_point(posterior: Posterior, loc: np.ndarray, scale: np.ndarray) -> float:
    """A point x_lo with P(largest draw < x_lo) <= TAIL: the largest exact TAIL-quantile of a few arms.

    Exact quantiles cost ~10 us each for a Beta, so only the 4 arms with the largest normal-
    approximated quantile are computed exactly; a max over a subset is never above the max over
    all arms, so x_lo errs only on the safe side (a slightly longer grid).
    """
    candidates = np.argsort(loc - 6.4 * scale)[-4:]
    return float(np.max(posterior.quantile(np.full(len(candidates), TAIL), candidates)))


def _probability_best_1d(posterior: Posterior, nodes: int) -> np.ndarray:
    loc, scale = posterior.location_scale()
    arms = loc.shape[0]
    if arms == 1:
        return np.ones(1)
    low, high = posterior.support()
    x_lo = max(low, _lower_tail_point(posterior, loc, scale))
    # an arm that exceeds x_lo with probability <= TAIL is best with probability <= TAIL: it gets 0
    below = posterior.cdf(np.full(arms, x_lo), np.arange(arms))
    relevant = np.flatnonzero(below < 1.0 - TAIL)
    best = np.zeros(arms)
    if len(relevant) <= 1:
        best[relevant if len(relevant) else np.argmax(loc)] = 1.0
        return best
    finest = float(np.min(scale[relevant]))
    if np.isfinite(high):
        # every relevant arm straddles x_lo (its TAIL-quantile is below it, its 1 - TAIL quantile
        # above) and a Beta's tails are light, so its mass lies within a few of its own scales of
        # x_lo: nodes sinh-spaced from x_lo with the narrowest relevant scale are fine next to x_lo
        # and geometric far from it. A Beta density with a shape in (1, 2) has an infinite slope
        # at 1: the upper half is a mirrored sinh map clustering a third of the nodes towards 1.
        x_hi = high
        middle = x_lo + 0.5 * (x_hi - x_lo)
        segments = [(x_lo, middle, finest, nodes - nodes // 3), (x_hi, middle, 1e-4 * (x_hi - x_lo), nodes // 3)]
    else:
        # a Student-t with few degrees of freedom may straddle x_lo from thousands of scales away,
        # so its core can lie anywhere: nodes cluster around a few centres instead, sinh-spaced
        # both ways with the scale of the narrowest arm near each
        x_hi = float(np.max(posterior.quantile(np.full(len(relevant), 1.0 - TAIL), relevant)))
        segments = _centred_segments(_centres(loc, scale, relevant, x_lo, x_hi), x_lo, x_hi, nodes)
    grid, weights, bounds = _assemble(segments)
    # layout (grid, arms): the cumulative sum runs down rows, vectorised across arms
    log_density = posterior.log_density(grid, relevant)
    log_density -= log_density.max(axis=0)
    # single precision from here: half the memory traffic and twice the SIMD width, and 7 digits
    # are plenty for propensities promised to +-0.01 (measured: within 2e-4 of the reference)
    density = np.exp(log_density.astype(np.float32))
    # each arm's CDF on the grid: cumulative third-order interval integrals of the density in u
    # (where each segment's nodes are uniform), rescaled to the exact mass between x_lo and x_hi
    # (special functions at the two ends)
    cdf = np.empty_like(density)
    cdf[0] = 0.0
    for first, last, step, stretch, reverse in bounds:
        part = density[first:last + 1] * stretch[:, None].astype(np.float32)
        cdf[first + 1:last + 1] = _interval_integrals(part[::-1], step)[::-1] if reverse else \
            _interval_integrals(part, step)
    np.cumsum(cdf, axis=0, out=cdf)
    start = below[relevant]
    scale_to_mass = (posterior.cdf(np.full(len(relevant), x_hi), relevant) - start) / cdf[-1]
    cdf *= scale_to_mass.astype(np.float32)
    cdf += start.astype(np.float32)
    # P(k best) = integral of f_k * prod_{j != k} F_j. Every F_j >= TAIL on [x_lo, x_hi], so the
    # product of the others is the product of all divided by F_k; where the product underflows,
    # the others' product is below 1e-290 and contributes nothing
    np.maximum(cdf, TAIL, out=cdf)
    everything = np.prod(cdf, axis=1)
    np.divide(density, cdf, out=density)
    # einsum, not a BLAS call: BLAS threads would contend with the event loop for a sum this small
    best[relevant] = np.maximum(np.einsum("gk,g->k", density, (weights * everything).astype(np.float32),
                                          dtype=np.float64) * scale_to_mass, 0.0)
    return best / best.sum()


def probability_best(posterior: Posterior, nodes: int = GRID_NODES) -> np.ndarray:
    """P(each arm's Thompson draw is the largest), shape (*batch, arms), summing to 1.

    P(k best) = integral of f_k(x) prod_{j != k} F_j(x) dx, by quadrature on one grid shared by
    all arms and restricted to where the largest draw can lie: from x_lo, below which the largest
    draw falls with probability <= TAIL, to the end of the support (Beta) or the largest
    1 - TAIL quantile (Student-t). Each arm's density is evaluated once on the grid
    (O(arms * nodes)); its CDF is the cumulative integral rescaled to exact end values (special
    functions), and the product of the other arms' CDFs is the product of all divided by the
    arm's own. Arms that exceed x_lo with probability <= TAIL get 0 and cost nothing more.
    Leading batch axes are looped over.
    """
    loc, _ = posterior.location_scale()
    if loc.ndim == 1:
        return _probability_best_1d(posterior, nodes)
    best = np.empty(loc.shape)
    for index in np.ndindex(*loc.shape[:-1]):
        best[index] = _probability_best_1d(posterior.entry(index), nodes)
    return best
