"""The always-valid pairwise preference test: guarantees under continuous monitoring (fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.interleave import credit_click_matrix, team_draft
from router.preference import PreferenceTest, log_beta, log_gamma


@given(st.floats(min_value=1e-3, max_value=1e7))
def test_log_gamma_matches_the_standard_library(x: float) -> None:
    assert log_gamma(x) == pytest.approx(math.lgamma(x), rel=1e-12, abs=1e-12)
    # a difference of two values near x ln x: double precision leaves ~1e-16 x ln x absolute error
    expected = math.lgamma(x) + math.lgamma(2.5) - math.lgamma(x + 2.5)
    assert log_beta(x, 2.5) == pytest.approx(expected, abs=1e-6)


@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_evidence_is_symmetric_and_never_above_one_when_even(wins: int, losses: int) -> None:
    test = PreferenceTest()
    assert test.log_evidence(wins, losses) == pytest.approx(test.log_evidence(losses, wins), rel=1e-12, abs=1e-9)
    assert test.log_evidence(wins, wins) <= 1e-9
    assert test.verdict(wins, wins) == "undecided"


def test_verdicts_and_pinned_crossing() -> None:
    test = PreferenceTest(confidence=0.95)
    # a run of wins only: the first count at which the test decides, pinned
    decisions = test.decide(np.arange(200), np.zeros(200, dtype=np.int64))
    assert int(np.argmax(decisions > 0)) == 39
    assert test.verdict(39, 0) == "prefer_a" and test.verdict(38, 0) == "undecided"
    assert test.verdict(0, 39) == "prefer_b"
    assert 0 < float(test.p_value(39, 0)) <= 0.05 < float(test.p_value(38, 0))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        PreferenceTest(confidence=1.0)
    with pytest.raises(ValueError):
        PreferenceTest(prior_strength=0)
    with pytest.raises(ValueError):
        PreferenceTest().verdict(-1, 3)
    with pytest.raises(ValueError):
        PreferenceTest().arm_verdicts(np.zeros((3, 2)))


def test_no_preference_rarely_ever_crosses_even_when_checked_after_every_outcome() -> None:
    # 2 000 fair coin walks of 20 000 outcomes, tested after each: Ville's inequality bounds the
    # share that ever crosses by alpha = 0.05; the binomial sd over 2 000 walks is 0.005, so
    # 0.05 + 3 sd = 0.065 fails a test that is not valid under continuous monitoring
    generator = np.random.default_rng(2024)
    test = PreferenceTest(confidence=0.95)
    ever = np.zeros(2000, dtype=bool)
    wins = np.zeros(2000, dtype=np.int64)
    for chunk in range(10):
        steps = generator.random((2000, 2000)) < 0.5
        cumulative = wins[:, None] + np.cumsum(steps, axis=1)
        n = (np.arange(1, 2001) + 2000 * chunk)[None, :]
        ever |= (test.decide(cumulative, n - cumulative) != 0).any(axis=1)
        wins = cumulative[:, -1]
    assert ever.mean() < 0.065


def test_a_real_preference_is_found_and_in_the_right_direction() -> None:
    generator = np.random.default_rng(7)
    test = PreferenceTest(confidence=0.95)
    steps = generator.random((500, 20_000)) < 0.55
    wins = np.cumsum(steps, axis=1)
    losses = np.arange(1, 20_001) - wins
    decisions = test.decide(wins, losses)
    first = np.where((decisions != 0).any(axis=1), np.argmax(decisions != 0, axis=1), -1)
    assert (first >= 0).all()  # every walk decides within 20 000 outcomes at p = 0.55
    assert (decisions[np.arange(500), first] > 0).mean() >= 0.975  # wrong side at most alpha / 2


def test_random_clicker_produces_no_preference() -> None:
    # two different rankers, a user who clicks each shown position with probability 0.3 whatever
    # it shows: 200 experiments x 3 000 impressions, tested after every impression. At most
    # alpha = 5% may ever decide; 0.05 + 3 binomial sd (0.015) = 0.095. Over all 600 000
    # impressions the win share among non-ties stays within 4 sd (0.0011 each) of one half.
    generator = np.random.default_rng(99)
    n_experiments, n_impressions = 200, 3000
    rankings = np.argsort(generator.random((n_experiments * n_impressions, 2, 30)), axis=-1)
    merged = team_draft(rankings, 10, generator)
    clicked = generator.random(merged.shown.shape) < 0.3
    credits = credit_click_matrix(merged.team, clicked, 2)
    outcome = np.sign(credits[:, 0] - credits[:, 1]).reshape(n_experiments, n_impressions)
    wins, losses = np.cumsum(outcome > 0, axis=1), np.cumsum(outcome < 0, axis=1)
    decided = (PreferenceTest(confidence=0.95).decide(wins, losses) != 0).any(axis=1)
    assert decided.mean() <= 0.095
    share = wins[:, -1].sum() / (wins[:, -1].sum() + losses[:, -1].sum())
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / (wins[:, -1].sum() + losses[:, -1].sum()))


def test_arm_verdicts_promote_the_ranker_preferred_to_all_and_reject_the_beaten() -> None:
    test = PreferenceTest(confidence=0.95)
    wins = np.array([[0, 600, 700], [400, 0, 520], [300, 480, 0]])
    assert test.arm_verdicts(wins) == ["promote", "reject", "reject"]
    assert test.arm_verdicts(np.array([[0, 51], [49, 0]])) == ["undecided", "undecided"]
    assert test.arm_verdicts(np.array([[0, 40], [400, 0]])) == ["reject", "promote"]
