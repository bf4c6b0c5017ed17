"""The simulated world of `banditgate bench interleave`: queries, rankers and a cascade click model.

Queries: each has 30 candidates with graded relevance 0..4, drawn independently with
probabilities GRADE_PROBABILITIES; every impression draws a fresh query (an unbounded query
population, so no seed shares a finite pool with another).
Rankers: ranker r scores a candidate as grade + noise_scale[r] * N(0, 1), noise independent per
ranker, query and candidate; a larger scale means a worse ranker. `calibrate_noise_scale` finds
the scale that gives a target NDCG@10 (gain 2^grade - 1, log2 discount, ideal over all 30).
Clicks: `CascadeClickModel` (see its docstring). Pure numpy; every random draw takes the
caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRADE_PROBABILITIES = (0.50, 0.25, 0.13, 0.08, 0.04)
N_CANDIDATES = 30
LIST_LENGTH = 10  # k: the shown list and the NDCG cut-off


def draw_grades(n_queries: int, rng: np.random.Generator) -> np.ndarray:
    """Relevance grades of n_queries fresh queries: int8 [n_queries, N_CANDIDATES]."""
    uniform = rng.random((n_queries, N_CANDIDATES), dtype=np.float32)
    grades = np.zeros(uniform.shape, dtype=np.int8)
    for threshold in np.cumsum(GRADE_PROBABILITIES)[:-1].astype(np.float32):
        grades += uniform >= threshold  # a handful of comparisons beat searchsorted here
    return grades


def top_k(scores: np.ndarray, k: int = LIST_LENGTH) -> np.ndarray:
    """Indices of the k highest scores along the last axis, best first: int64 [..., k].

    Sorting packed integer keys (score quantized to ~5e-7, candidate index in the low 5 bits)
    after a partition is ~3x faster than argsort; scores outside [-16, 16) are clipped, a tie
    order change at odds far below the simulation's noise.
    """
    if scores.shape[-1] > 32:
        raise ValueError(f"top_k packs candidate indices in 5 bits: at most 32 candidates, got {scores.shape[-1]}")
    keys = np.clip((16.0 - scores) * np.float32(2.0**21), 0, 2**26 - 1).astype(np.int32)
    keys <<= 5
    keys |= np.arange(scores.shape[-1], dtype=np.int32)
    keys = np.partition(keys, k - 1, axis=-1)[..., :k]
    keys.sort(axis=-1)
    return (keys & 31).astype(np.int64)


def rank(grades: np.ndarray, noise_scales: np.ndarray, rng: np.random.Generator,
         k: int = LIST_LENGTH) -> np.ndarray:
    """Each ranker's top-k of each query: int64 [n_queries, n_rankers, k].

    The top k of every ranker is all a team-draft merge of length k can reach: a pointer passes
    only shown candidates and its own picks, k at most together.
    """
    noise_scales = np.asarray(noise_scales, dtype=np.float32)
    scores = rng.standard_normal((grades.shape[0], noise_scales.size, grades.shape[1]), dtype=np.float32)
    scores *= noise_scales[None, :, None]  # in place: fresh temporaries cost more than the arithmetic
    scores += grades[:, None, :]
    return top_k(scores, k)


def ndcg(grades: np.ndarray, ranking: np.ndarray, k: int = LIST_LENGTH) -> np.ndarray:
    """NDCG@k per query of one ranking [n_queries, >= k] of grades [n_queries, n_candidates]."""
    gain = np.exp2(grades.astype(np.float64)) - 1
    discount = 1 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(gain, ranking[:, :k], axis=1) * discount).sum(axis=1)
    ideal = (-np.sort(-gain, axis=1)[:, :k] * discount).sum(axis=1)
    # a query without any relevant candidate cannot be ranked well or badly; it scores 1
    return np.divide(dcg, ideal, out=np.ones_like(dcg), where=ideal > 0)


def calibrate_noise_scale(target_ndcg: float, rng: np.random.Generator, n_queries: int = 20_000,
                          iterations: int = 30) -> float:
    """Noise scale whose ranker has mean NDCG@10 = target_ndcg (bisection, common random numbers).

    Raises ValueError when the target is outside what noise scales in [0, 50] reach.
    """
    grades = draw_grades(n_queries, rng)
    noise = rng.standard_normal(grades.shape, dtype=np.float32)

    def quality(scale: float) -> float:
        return float(ndcg(grades, top_k(grades + np.float32(scale) * noise)).mean())

    low, high = 0.0, 50.0
    if not quality(high) < target_ndcg < quality(low):
        raise ValueError(f"NDCG@10 {target_ndcg} is not reachable by noisy rankers in this world")
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if quality(middle) > target_ndcg else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class CascadeClickModel:
    """A cascade click model with graded click and stop probabilities (Hofmann et al. 2013).

    The user examines the list top-down from position 1. At an examined result of grade g the
    user clicks with probability click_probability[g]; after a click, stops (satisfied) with
    probability stop_probability[g]. If the user has not stopped, they go on to the next position
    with probability `patience` (1: they scan to the end of the list). Users are independent;
    position matters only through the order of examination (no other position bias); a click
    depends only on the result's own grade, not on what was shown around it. Grade -1 (padding)
    is never clicked.
    """

    name: str
    click_probability: tuple[float, ...]
    stop_probability: tuple[float, ...]
    patience: float = 1.0

    def _table(self, values: tuple[float, ...]) -> np.ndarray:
        # index -1 (padding) reads the appended zero
        return np.array((*values, 0.0))

    def simulate(self, grades_shown: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Which positions get clicked: bool [n_impressions, k] for grades int [n_impressions, k]."""
        attracted = rng.random(grades_shown.shape) < self._table(self.click_probability)[grades_shown]
        stops = attracted & (rng.random(grades_shown.shape) < self._table(self.stop_probability)[grades_shown])
        goes_on = ~stops
        if self.patience < 1:
            goes_on &= rng.random(grades_shown.shape) < self.patience
        examined = np.ones(grades_shown.shape, dtype=bool)
        examined[:, 1:] = np.logical_and.accumulate(goes_on[:, :-1], axis=1)
        return attracted & examined

    def click_count_distribution(self, grades_shown: np.ndarray, signs: np.ndarray | None = None) -> np.ndarray:
        """Exact distribution of the number of clicks per impression (dynamic programming).

        Without `signs`: P(clicks = c), c = 0..k, float [n_impressions, k + 1]. With `signs`
        (int [n_impressions, k] of +1 / -1 / 0 per position): the distribution of the signed sum
        of clicks, values -k..k, float [n_impressions, 2k + 1] - e.g. +1 for team A's positions
        and -1 for team B's gives P(A's clicks - B's clicks = d).
        """
        n_impressions, k = grades_shown.shape
        width = k + 1 if signs is None else 2 * k + 1
        signs = np.ones((n_impressions, k), dtype=np.int8) if signs is None else np.asarray(signs)
        result = np.empty((n_impressions, width))
        for start in range(0, n_impressions, self._block_rows):  # blocks that stay in cache
            block = slice(start, start + self._block_rows)
            result[block] = self._signed_distribution(grades_shown[block], signs[block], width)
        return result

    _block_rows = 8192

    def _signed_distribution(self, grades_shown: np.ndarray, signs: np.ndarray, width: int) -> np.ndarray:
        n_impressions, k = grades_shown.shape
        click = self._table(self.click_probability)[grades_shown]
        stop = self._table(self.stop_probability)[grades_shown]
        # still[:, zero + d]: probability of examining the current position with signed sum d so far
        still = np.zeros((n_impressions, width))
        still[:, width - k - 1] = 1.0
        done = np.zeros_like(still)
        shifted_up, shifted_down = np.zeros_like(still), np.zeros_like(still)
        for position in range(k):
            p_click, p_stop = click[:, position, None], stop[:, position, None]
            sign = signs[:, position, None]
            shifted_up[:, 1:], shifted_down[:, :-1] = still[:, :-1], still[:, 1:]
            clicked = np.where(sign > 0, shifted_up, np.where(sign < 0, shifted_down, still)) * p_click
            done += clicked * p_stop
            carry = clicked * (1 - p_stop) + still * (1 - p_click)
            still = carry * self.patience
            done += carry * (1 - self.patience)
        return done + still


# Hofmann, Whiteson and de Rijke (2013), as used by Schuth et al. (2014) for five grades
NAVIGATIONAL = CascadeClickModel("navigational", (0.05, 0.3, 0.5, 0.7, 0.95), (0.2, 0.3, 0.5, 0.7, 0.9))
INFORMATIONAL = CascadeClickModel("informational", (0.4, 0.6, 0.7, 0.8, 0.9), (0.1, 0.2, 0.3, 0.4, 0.5))
PERFECT = CascadeClickModel("perfect", (0.0, 0.2, 0.4, 0.8, 1.0), (0.0, 0.0, 0.0, 0.0, 0.0))
