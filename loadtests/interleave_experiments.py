"""The sequential experiments of `banditgate bench interleave`, vectorized across seeds.

Every seed is one independent experiment: its own queries, coins and clicks, run until the
always-valid test (`router.preference.PreferenceTest`) first decides, or until the impression cap
(then it is censored: counted as "needed more than the cap", never as decided or wrong).

Interleaving is simulated click by click with the real merge (`router.interleave`). The A/B test
is simulated through what it observes: users alternate between the arms, consecutive A and B
impressions form a pair, and a pair is a win for A when A's impression got a click and B's did
not (a loss the other way round, else a tie) - the same sign test on the same
`PreferenceTest` as interleaving. Under the click model, A/B impressions are independent draws,
so a pair's outcome is a three-way draw with probabilities from each arm's exact click-through
rate (`ab_rates`); the experiment draws the non-tied pairs (signs) and the number of pairs
between them (geometric), which has exactly the distribution of simulating every click.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from loadtests.interleave_sim import LIST_LENGTH, CascadeClickModel, draw_grades, rank
from router.interleave import credit_click_matrix, multileave, team_draft
from router.preference import PreferenceTest

Z_95 = 1.959963984540054  # two-sided 95% normal quantile, for the fixed-sample comparison only


@dataclass(frozen=True)
class SequentialResult:
    """Per seed: impressions at the decision (inf: censored at `cap`) and whether it was wrong."""

    impressions: np.ndarray
    wrong: np.ndarray
    cap: int
    curve_confidence: np.ndarray | None = None  # [n_seeds, len(grid)]: 1 - running min p-value

    def median(self) -> float:
        """Median impressions, counting censored seeds as more than the cap (inf if half are)."""
        return float(np.quantile(self.impressions, 0.5, method="inverted_cdf"))

    def quantile(self, level: float) -> float:
        return float(np.quantile(self.impressions, level, method="inverted_cdf"))

    @property
    def censored_fraction(self) -> float:
        return float(np.mean(~np.isfinite(self.impressions)))

    @property
    def error_rate(self) -> float:
        return float(np.mean(self.wrong))


def _confidence(evidence: np.ndarray) -> np.ndarray:
    return 1.0 - np.exp(-np.maximum(evidence, 0.0))


def run_interleaving(noise_scales: np.ndarray, test: PreferenceTest, click_model: CascadeClickModel,
                     n_seeds: int, cap: int, rng: np.random.Generator,
                     grid: np.ndarray | None = None, max_cells: int = 65_536) -> SequentialResult:
    """Team-draft (2 rankers) or multileaving (more) experiments; ranker 0 is the best, then 1, ...

    With more than two rankers every pair is tested at alpha / n_pairs (Bonferroni), and a seed
    is decided when all pairs are: that is when it has ordered all rankers; it is wrong when any
    pair's verdict is. `grid` (impression counts) records the confidence of pair (0, 1).
    Chunks hold about max_cells impressions x rankers: small arrays stay in cache and avoid
    page-faulting fresh memory, which costs more than the arithmetic here.
    """
    n_rankers = len(noise_scales)
    pairs = np.array(list(combinations(range(n_rankers), 2)))
    n_pairs = len(pairs)
    pair_test = dataclasses.replace(test, confidence=1 - (1 - test.confidence) / n_pairs)
    merge = team_draft if n_rankers == 2 else multileave
    wins = np.zeros((n_seeds, n_pairs), dtype=np.int64)
    losses = np.zeros((n_seeds, n_pairs), dtype=np.int64)
    decided_at = np.full((n_seeds, n_pairs), np.inf)
    verdict = np.zeros((n_seeds, n_pairs), dtype=np.int8)
    running = np.full(n_seeds, -np.inf)
    curve = None if grid is None else np.full((n_seeds, grid.size), np.nan)
    active, done, chunk = np.arange(n_seeds), 0, 250
    while active.size and done < cap:
        steps = int(min(chunk, cap - done, max(1, max_cells // (n_rankers * active.size))))
        grades = draw_grades(active.size * steps, rng)
        merged = merge(rank(grades, noise_scales, rng), LIST_LENGTH, rng)
        shown_grades = np.where(merged.shown >= 0,
                                np.take_along_axis(grades, np.maximum(merged.shown, 0), axis=1), -1)
        credits = credit_click_matrix(merged.team, click_model.simulate(shown_grades, rng), n_rankers)
        outcome = np.sign(credits[:, pairs[:, 0]] - credits[:, pairs[:, 1]]).reshape(active.size, steps, n_pairs)
        cumulative_wins = wins[active][:, None, :] + np.cumsum(outcome > 0, axis=1)
        cumulative_losses = losses[active][:, None, :] + np.cumsum(outcome < 0, axis=1)
        evidence = pair_test.log_evidence(cumulative_wins, cumulative_losses)
        crossed = evidence >= pair_test.threshold
        first_step = crossed.argmax(axis=1)
        rows, pair_columns = np.nonzero(crossed.any(axis=1) & ~np.isfinite(decided_at[active]))
        steps_at = first_step[rows, pair_columns]
        decided_at[active[rows], pair_columns] = done + steps_at + 1
        verdict[active[rows], pair_columns] = np.sign(cumulative_wins[rows, steps_at, pair_columns]
                                                      - cumulative_losses[rows, steps_at, pair_columns])
        wins[active], losses[active] = cumulative_wins[:, -1], cumulative_losses[:, -1]
        if curve is not None and grid is not None:
            chunk_running = np.maximum(running[active][:, None], np.maximum.accumulate(evidence[:, :, 0], axis=1))
            in_chunk = np.nonzero((grid > done) & (grid <= done + steps))[0]
            curve[np.ix_(active, in_chunk)] = _confidence(chunk_running[:, grid[in_chunk] - done - 1])
            running[active] = chunk_running[:, -1]
        done += steps
        active = active[~np.isfinite(decided_at[active]).all(axis=1)]
        chunk *= 2
    if curve is not None:
        # a stopped seed's confidence can only grow; its value at the stop is a lower bound
        curve = np.where(np.isnan(curve), _confidence(running)[:, None], curve)
    # ranker i < j is the better one, so the right verdict on every pair is +1 ("prefer a")
    return SequentialResult(impressions=decided_at.max(axis=1), wrong=(verdict < 0).any(axis=1),
                            cap=cap, curve_confidence=curve)


def run_ab(win_probability: float, loss_probability: float, test: PreferenceTest, n_seeds: int,
           cap: int, rng: np.random.Generator, grid: np.ndarray | None = None) -> SequentialResult:
    """A/B experiments on pairs of impressions (A better); probabilities are a pair's win and loss.

    Raises ValueError when a pair can never be non-tied.
    """
    non_tied = win_probability + loss_probability
    if not 0 < non_tied <= 1:
        raise ValueError(f"pair win + loss probability must lie in (0, 1], got {non_tied}")
    win_share = win_probability / non_tied
    wins, losses, pairs = (np.zeros(n_seeds, dtype=np.int64) for _ in range(3))
    impressions = np.full(n_seeds, np.inf)
    wrong = np.zeros(n_seeds, dtype=bool)
    running = np.full(n_seeds, -np.inf)
    curve = None if grid is None else np.full((n_seeds, grid.size), np.nan)
    active, chunk = np.arange(n_seeds), 500
    while active.size:
        signs = rng.random((active.size, chunk)) < win_share
        pair_index = pairs[active][:, None] + np.cumsum(rng.geometric(non_tied, (active.size, chunk)), axis=1)
        cumulative_wins = wins[active][:, None] + np.cumsum(signs, axis=1)
        cumulative_losses = losses[active][:, None] + np.cumsum(~signs, axis=1)
        evidence = test.log_evidence(cumulative_wins, cumulative_losses)
        crossed = (evidence >= test.threshold) & (2 * pair_index <= cap)
        hit = crossed.any(axis=1)
        first = crossed.argmax(axis=1)
        rows = np.nonzero(hit)[0]
        impressions[active[rows]] = 2 * pair_index[rows, first[rows]]
        wrong[active[rows]] = cumulative_wins[rows, first[rows]] < cumulative_losses[rows, first[rows]]
        if curve is not None and grid is not None:
            chunk_running = np.maximum(running[active][:, None], np.maximum.accumulate(evidence, axis=1))
            for row, seed in enumerate(active):
                # confidence at g impressions: after the last non-tied pair completed by then
                inside = (grid >= 2 * pairs[seed]) & (grid < 2 * pair_index[row, -1])
                last = np.searchsorted(2 * pair_index[row], grid[inside], side="right") - 1
                before = running[seed] if np.isfinite(running[seed]) else 0.0
                values = np.where(last >= 0, chunk_running[row, np.maximum(last, 0)], before)
                curve[seed, inside] = _confidence(values)
            running[active] = chunk_running[:, -1]
        wins[active], losses[active] = cumulative_wins[:, -1], cumulative_losses[:, -1]
        pairs[active] = pair_index[:, -1]
        active = active[~hit & (2 * pairs[active] <= cap)]
        chunk = min(chunk * 2, 20_000)
    if curve is not None:
        curve = np.where(np.isnan(curve), _confidence(running)[:, None], curve)
    return SequentialResult(impressions=impressions, wrong=wrong, cap=cap, curve_confidence=curve)


def ab_rates(noise_scales: np.ndarray, click_model: CascadeClickModel, n_queries: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Exact per-arm click-through rate, mean and variance of clicks per impression.

    Each quantity is exact for every query (dynamic programming over the click model) and
    averaged over n_queries fresh queries that all arms share (so their differences carry
    little sampling noise). Arrays are [n_rankers].
    """
    grades = draw_grades(n_queries, rng)
    rankings = rank(grades, noise_scales, rng)
    counts = np.arange(LIST_LENGTH + 1)
    ctr, mean, variance = [], [], []
    for ranker in range(len(noise_scales)):
        shown = np.take_along_axis(grades, rankings[:, ranker], axis=1)
        distribution = click_model.click_count_distribution(shown).mean(axis=0)
        ctr.append(1 - distribution[0])
        mean.append(distribution @ counts)
        variance.append(distribution @ counts**2 - mean[-1] ** 2)
    return {"ctr": np.array(ctr), "clicks_mean": np.array(mean), "clicks_variance": np.array(variance)}


def pair_probabilities(ctr_a: float, ctr_b: float) -> tuple[float, float]:
    """An A/B pair's win and loss probabilities from the arms' click-through rates."""
    return ctr_a * (1 - ctr_b), ctr_b * (1 - ctr_a)


def fixed_sample_impressions(win_probability: float, loss_probability: float, per_outcome: int = 1) -> float:
    """Impressions at which a fixed-sample sign test's expected z reaches 1.96 (inf if A is not ahead).

    `per_outcome` is impressions per win/loss/tie outcome: 1 for interleaving, 2 for an A/B pair.
    """
    non_tied = win_probability + loss_probability
    edge = win_probability / non_tied - 0.5 if non_tied > 0 else 0.0
    if edge <= 0:
        return float("inf")
    return per_outcome * (Z_95 / (2 * edge)) ** 2 / non_tied


def interleaving_rates(noise_scales: np.ndarray, click_model: CascadeClickModel, n_impressions: int,
                       rng: np.random.Generator) -> tuple[float, float]:
    """Win and loss probability of ranker 0 over ranker 1 in team-draft interleaving.

    Exact over clicks for each of n_impressions sampled queries and merges (the click noise, the
    largest part of the variance, is integrated out), averaged over them.
    """
    grades = draw_grades(n_impressions, rng)
    merged = team_draft(rank(grades, noise_scales[:2], rng), LIST_LENGTH, rng)
    shown_grades = np.where(merged.shown >= 0,
                            np.take_along_axis(grades, np.maximum(merged.shown, 0), axis=1), -1)
    signs = np.select([merged.team == 0, merged.team == 1], [1, -1], 0)
    distribution = click_model.click_count_distribution(shown_grades, signs).mean(axis=0)
    return float(distribution[LIST_LENGTH + 1:].sum()), float(distribution[:LIST_LENGTH].sum())
