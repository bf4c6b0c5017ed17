"""Sequential test of a pairwise preference between two rankers, valid under continuous monitoring.

Every impression of an interleaved list is a win, a loss or a tie for ranker A against ranker B
(`router.interleave.pairwise_outcome`). Ties carry no information about which ranker users
prefer, so the test looks only at the non-tied impressions: each is a win for A with some
probability p, independently, and "no preference" is p = 1/2.

The test is a mixture sequential probability ratio test (Robbins 1970; the "mSPRT" of Johari,
Pekelis and Walsh 2017): the likelihood of the wins and losses under p ~ Beta(a, a), divided by
their likelihood under p = 1/2,

    M = B(wins + a, losses + a) / B(a, a) * 2 ** (wins + losses).

Under p = 1/2, M is a nonnegative martingale with mean 1, so by Ville's inequality the chance
that it EVER reaches 1/alpha is at most alpha: the test may be checked after every impression,
forever, and stopped the first time it crosses, without inflating the error (a fixed-sample test
checked repeatedly would not be). A verdict names the side that has more wins. Its chance of
naming the worse ranker is at most alpha/2 whatever p is: the crossing region is symmetric
and monotone in wins - losses, so a path under p > 1/2 (coupled to one under 1/2 with the same
uniforms) reaches the "prefer B" side only if the p = 1/2 path does, which has chance alpha/2.

`prior_strength` a sets the effect size the test is quickest at: the prior's spread is about
1 / (2 sqrt(2a + 1)) around 1/2, so the default a = 100 suits win probabilities within a few
hundredths of 1/2, where rankers worth comparing usually are; any a keeps the guarantee, only the
speed changes (a prior far too wide costs about half a log of the sample size in evidence).

>>> test = PreferenceTest(confidence=0.95)
>>> test.verdict(wins=60, losses=40)
'undecided'
>>> test.verdict(wins=600, losses=400)
'prefer_a'
>>> test.verdict(wins=400, losses=600)
'prefer_b'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["PreferenceTest", "Verdict", "log_beta", "log_gamma"]

Verdict = Literal["prefer_a", "prefer_b", "undecided"]
ArmVerdict = Literal["promote", "reject", "undecided"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)
_STIRLING_SHIFT = 16  # Stirling's series with four terms is accurate to ~1e-14 from here on


def log_gamma(x: np.ndarray | float) -> np.ndarray:
    """ln Gamma(x) for positive x, elementwise (float64 array; numpy has no vectorized lgamma).

    Raises ValueError when any x is not positive and finite.
    """
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    x = x.reshape(-1)  # a 1-d view, so that masked assignment works for scalars too
    if not np.all(np.isfinite(x) & (x > 0)):
        raise ValueError("log_gamma is defined here for positive finite arguments only")
    small = x < _STIRLING_SHIFT
    # Gamma(x) = Gamma(x + s) / (x (x + 1) ... (x + s - 1)) moves small arguments into the series' range
    z = np.where(small, x + _STIRLING_SHIFT, x)
    inverse = 1.0 / z
    inverse_squared = inverse * inverse
    series = inverse * (1 / 12 - inverse_squared * (1 / 360 - inverse_squared * (1 / 1260 - inverse_squared / 1680)))
    result = (z - 0.5) * np.log(z) - z + _HALF_LOG_TWO_PI + series
    if np.any(small):
        shifted = x[small][..., None] + np.arange(_STIRLING_SHIFT)
        result[small] -= np.log(shifted).sum(axis=-1)
    return result.reshape(shape)


def log_beta(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """ln B(a, b) for positive a and b, elementwise. Raises ValueError as `log_gamma` does."""
    return log_gamma(a) + log_gamma(b) - log_gamma(np.add(a, b))


@dataclass(frozen=True)
class PreferenceTest:
    """Always-valid test of "users prefer ranker A to ranker B" from win and loss counts.

    `confidence` is 1 - alpha: the chance of any verdict when users have no preference is at
    most alpha, and of the wrong verdict at most alpha / 2, however often the test is checked.
    Raises ValueError when confidence is not in (0, 1) or prior_strength is not positive.
    """

    confidence: float = 0.95
    prior_strength: float = 100.0

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        if not (math.isfinite(self.prior_strength) and self.prior_strength > 0):
            raise ValueError(f"prior_strength must be positive, got {self.prior_strength}")

    @property
    def threshold(self) -> float:
        """ln(1 / alpha): the log evidence at which the test decides."""
        return -math.log1p(-self.confidence)

    def log_evidence(self, wins: np.ndarray | int, losses: np.ndarray | int) -> np.ndarray:
        """ln M, the mixture likelihood ratio against "no preference", elementwise (float64).

        Raises ValueError on negative counts.
        """
        wins = np.asarray(wins, dtype=np.float64)
        losses = np.asarray(losses, dtype=np.float64)
        if np.any(wins < 0) or np.any(losses < 0):
            raise ValueError("win and loss counts must be nonnegative")
        strength = self.prior_strength
        return (log_beta(wins + strength, losses + strength) - log_beta(strength, strength)
                + (wins + losses) * math.log(2))

    def decide(self, wins: np.ndarray | int, losses: np.ndarray | int) -> np.ndarray:
        """Vectorized verdicts: int8 array, +1 prefer A, -1 prefer B, 0 undecided.

        Raises ValueError on negative counts.
        """
        crossed = self.log_evidence(wins, losses) >= self.threshold
        # M <= 1 when wins == losses, so a crossing always has a side
        return (crossed * np.sign(np.subtract(wins, losses, dtype=np.float64))).astype(np.int8)

    def verdict(self, wins: int, losses: int) -> Verdict:
        """"prefer_a", "prefer_b" or "undecided" for one pair of counts.

        Raises ValueError on negative counts.
        """
        decision = int(self.decide(wins, losses))
        return "prefer_a" if decision > 0 else "prefer_b" if decision < 0 else "undecided"

    def p_value(self, wins: np.ndarray | int, losses: np.ndarray | int) -> np.ndarray:
        """min(1, 1/M) elementwise; its running minimum over time is an always-valid p-value."""
        return np.exp(-np.maximum(self.log_evidence(wins, losses), 0.0))

    def arm_verdicts(self, wins: np.ndarray) -> list[ArmVerdict]:
        """Promote/reject verdicts for n rankers from pairwise win counts (multileaving).

        `wins[i, j]` counts impressions where ranker i beat ranker j. Each pair is tested at
        alpha divided by the number of pairs (Bonferroni), so all verdicts together hold at
        `confidence`. A ranker preferred to every other one is "promote"; one that some other
        ranker is preferred to is "reject"; the rest are "undecided". With two rankers this is
        the pair's verdict.
        Raises ValueError unless wins is a square matrix of nonnegative counts with n >= 2.
        """
        wins = np.asarray(wins)
        if wins.ndim != 2 or wins.shape[0] != wins.shape[1] or wins.shape[0] < 2:
            raise ValueError(f"wins must be a square [n_rankers, n_rankers] matrix, n >= 2; got {wins.shape}")
        n_rankers = wins.shape[0]
        n_pairs = n_rankers * (n_rankers - 1) // 2
        pair_test = PreferenceTest(confidence=1 - (1 - self.confidence) / n_pairs,
                                   prior_strength=self.prior_strength)
        decision = pair_test.decide(wins, wins.T)
        np.fill_diagonal(decision, 0)
        verdicts: list[ArmVerdict] = []
        for ranker in range(n_rankers):
            beaten_by_someone = bool((decision[ranker] < 0).any())
            beats_all = bool((np.delete(decision[ranker], ranker) > 0).all())
            verdicts.append("reject" if beaten_by_someone else "promote" if beats_all else "undecided")
        return verdicts
