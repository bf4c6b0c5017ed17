"""Streaming quality metrics, windows, rewards and the sequential promote/reject test (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, log_loss, precision_score, recall_score

from feedback.outcome_metrics import (
    FIELD_NAMES,
    WINDOW_BUCKETS,
    PredictionView,
    QualityStats,
    bucket_index,
    confidence_sequence,
    labelled,
    loss,
    outputs_view,
    rewarded,
    shadow_observation,
    shadow_verdict,
    window_buckets,
)
from feedback.reward import RewardError, RewardStats, checked_reward, wilson_interval


def test_outputs_view_reads_the_gateway_format() -> None:
    assert outputs_view({"probability": [0.73], "label": 1}) == PredictionView(0.73, 1, None)
    assert outputs_view({"probability": [0.2, 0.8], "label": 1, "class": "churn"}) == PredictionView(0.8, 1, "churn")
    assert outputs_view({"variable": [[3.5]]}) == PredictionView(3.5, None, None)
    assert outputs_view({"label": [2.0]}).predicted == 2
    assert outputs_view({"text": "x"}) == PredictionView(None, None, None)


_SCALARS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(),
                     st.text(max_size=2), st.none())


@given(probability=st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)),
       label=st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2)), key=st.sampled_from(["probability", "score"]))
@settings(max_examples=400, deadline=None)
def test_outputs_view_fast_path_reads_what_the_general_rules_read(probability, label, key) -> None:
    # a third, non-numeric output changes nothing the rules read, but takes the general path
    fast = outputs_view({key: probability, "label": label})
    general = outputs_view({key: probability, "label": label, "note": "x"})
    assert fast == general or (fast.score != fast.score and general.score != general.score)


@given(score=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       predicted=st.one_of(st.none(), st.integers(-2, 3), st.booleans(), st.floats(-1, 2), st.sampled_from(["a", "1"])),
       name=st.one_of(st.none(), st.sampled_from(["churn", "stay"])),
       label=st.one_of(st.integers(-2, 3), st.booleans(), st.floats(-1, 2), st.sampled_from(["a", "1", "churn"]), st.none()))
@settings(max_examples=600, deadline=None)
def test_labelled_fields_and_label_error_fast_paths_agree_with_the_general_rules(score, predicted, name, label) -> None:
    from feedback.outcome_metrics import _label_error, _labelled_fields, label_error, labelled_fields

    view = PredictionView(score, predicted, name)
    assert labelled_fields(view, label) == _labelled_fields(view, label)
    assert label_error(view, label) == _label_error(view, label)


def test_streaming_metrics_equal_sklearn_on_a_fixed_sample() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 500), 0.001, 0.999)
    predicted = (p >= 0.5).astype(int)
    stats = QualityStats()
    for yi, pi, li in zip(y, p, predicted):
        stats = stats + labelled(PredictionView(float(pi), int(li)), int(yi))
    assert stats.accuracy == pytest.approx(accuracy_score(y, predicted))
    assert stats.precision == pytest.approx(precision_score(y, predicted))
    assert stats.recall == pytest.approx(recall_score(y, predicted))
    assert stats.f1 == pytest.approx(f1_score(y, predicted))
    assert stats.log_loss == pytest.approx(log_loss(y, p))
    assert stats.brier == pytest.approx(brier_score_loss(y, p))


def test_regression_and_string_labels() -> None:
    stats = labelled(PredictionView(score=3.0), 5.0) + labelled(PredictionView(score=4.0), 3.0)
    assert stats.mae == pytest.approx(1.5) and stats.rmse == pytest.approx(math.sqrt(2.5)) and stats.n == 0
    named = labelled(PredictionView(None, 1, "churn"), "churn") + labelled(PredictionView(None, 0, "stay"), "churn")
    assert named.accuracy == 0.5 and named.precision is None  # not a binary 0/1 label
    assert labelled(PredictionView(score=0.9), True).tp == 1  # probability only: thresholded at 0.5
    assert labelled(PredictionView(), 1) == QualityStats()


def test_shadow_observation_pairs_losses_and_agreement() -> None:
    primary, shadow = PredictionView(0.9, 1), PredictionView(0.2, 0)
    obs = shadow_observation(shadow, primary, 1)
    assert obs.n_agree == 1 and obs.agree_sum == 0
    assert obs.n_pair == 1 and obs.pair_primary_loss_sum == pytest.approx(0.01)
    assert obs.pair_shadow_loss_sum == pytest.approx(0.64)
    assert shadow_observation(shadow, None, 1) == QualityStats()
    assert loss(PredictionView(None, "a"), "b") == ("error", 1.0)


stats_values = st.builds(QualityStats, *[st.floats(0, 1000, allow_nan=False) for _ in FIELD_NAMES])


@given(st.lists(stats_values, min_size=1, max_size=6), st.integers(0, 6))
def test_stats_merge_in_any_grouping(parts: list[QualityStats], split: int) -> None:
    whole = QualityStats()
    for part in parts:
        whole = whole + part
    left, right = QualityStats(), QualityStats()
    for part in parts[:split]:
        left = left + part
    for part in parts[split:]:
        right = right + part
    merged = left + right
    for name in FIELD_NAMES:
        assert getattr(merged, name) == pytest.approx(getattr(whole, name))
    assert QualityStats.from_fields(whole.to_fields()) == whole


def test_window_covers_the_last_buckets() -> None:
    now = 3600.0 * 10 + 1
    buckets = window_buckets(now=now, window_s=3600.0)
    assert len(buckets) == WINDOW_BUCKETS
    assert buckets[-1] == bucket_index(now, 300.0)
    # the window reaches back between 11 and 12 buckets: it slides in steps of one bucket
    assert bucket_index(now - 3600.0 + 300.0, 300.0) == buckets[0]
    assert bucket_index(now - 3600.0 - 1.0, 300.0) not in buckets


# ---------------------------------------------------------------------------------------------
# rewards


def test_checked_reward() -> None:
    assert checked_reward(1, "bernoulli") == 1.0
    assert checked_reward(-3.5, "gaussian") == -3.5
    with pytest.raises(RewardError, match="outside"):
        checked_reward(1.5, "bernoulli")
    with pytest.raises(RewardError, match="finite"):
        checked_reward(float("inf"), "gaussian")


def test_reward_intervals_cover_at_the_stated_rate() -> None:
    """Fixed seed, 2000 samples of 200 Bernoulli(0.3) rewards: the 95% Wilson interval covers 0.3
    in 95% ± 1.5% of them (3.4 binomial standard errors at n = 2000)."""
    rng = np.random.default_rng(11)
    covered = 0
    for successes in rng.binomial(200, 0.3, 2000):
        low, high = wilson_interval(float(successes), 200.0, 0.95)
        covered += low <= 0.3 <= high
    assert abs(covered / 2000 - 0.95) < 0.015
    stats = RewardStats()
    for value in rng.normal(2.0, 1.0, 400):
        stats = stats.updated(float(value))
    low, high = stats.interval(0.95, "gaussian")
    assert low < 2.0 < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert rewarded(0.5).rewards.mean == 0.5


# ---------------------------------------------------------------------------------------------
# the sequential test


def _paths(rng: np.random.Generator, n_paths: int, n: int, mean: float) -> np.ndarray:
    """Paired loss differences in [-1, 1]: primary and shadow 0/1 errors with a given mean gap."""
    primary_err = rng.random((n_paths, n)) < 0.3
    shadow_err = rng.random((n_paths, n)) < 0.3 - mean
    return primary_err.astype(float) - shadow_err.astype(float)


def _first_decision(path: np.ndarray, confidence: float, margin: float) -> tuple[str | None, int]:
    totals = np.cumsum(path)
    for n in range(10, len(path) + 1, 10):  # monitored every 10 observations, forever
        stats = QualityStats(n_pair=n, pair_primary_loss_sum=float(totals[n - 1]), pair_shadow_loss_sum=0.0)
        decision = shadow_verdict(stats, confidence, margin).decision
        if decision is not None:
            return decision, n
    return None, len(path)


def test_sequential_test_keeps_its_error_rate_under_continuous_monitoring() -> None:
    """Fixed seed: 300 equal-quality streams of 3000 paired labels, checked every 10: the share
    that ever says promote or reject stays under alpha = 0.05 (the bound holds for all n at once;
    with Hoeffding's constant it is conservative, so the observed rate is far lower)."""
    rng = np.random.default_rng(3)
    paths = _paths(rng, 300, 3000, 0.0)
    false = sum(_first_decision(p, 0.95, 0.0)[0] is not None for p in paths)
    assert false / 300 <= 0.05


def test_sequential_test_promotes_a_better_shadow_and_rejects_a_worse_one() -> None:
    """Fixed seed: a shadow with 10 points less error is promoted and one with 10 points more is
    rejected, within 3000 paired labels in all of 50 streams."""
    rng = np.random.default_rng(5)
    for path in _paths(rng, 50, 3000, 0.10):
        assert _first_decision(path, 0.95, 0.0)[0] == "promote"
    for path in _paths(rng, 50, 3000, -0.10):
        assert _first_decision(path, 0.95, 0.0)[0] == "reject"


def test_margin_holds_back_promotion() -> None:
    stats = QualityStats(n_pair=5000, pair_primary_loss_sum=1500.0, pair_shadow_loss_sum=1250.0)  # +0.05
    assert shadow_verdict(stats, 0.95, 0.0).decision == "promote"
    assert shadow_verdict(stats, 0.95, 0.1).decision is None


@given(st.floats(1, 1e6), st.floats(-1, 1), st.floats(0.6, 0.999))
@settings(max_examples=200)
def test_confidence_sequence_contains_the_mean_and_shrinks(n: float, mean: float, confidence: float) -> None:
    low, high = confidence_sequence(n, mean * n, confidence)
    assert -1.0 <= low <= mean <= high <= 1.0
    low4, high4 = confidence_sequence(4 * n, 4 * n * mean, confidence)
    assert high4 - low4 <= high - low + 1e-12


def test_outputs_view_reads_the_positive_class_of_two_column_probabilities() -> None:
    from feedback.outcome_metrics import outputs_view

    assert outputs_view({"probabilities": [0.9, 0.1], "label": 0}).score == pytest.approx(0.1)
    assert outputs_view({"probability": [0.73], "label": 1}).score == pytest.approx(0.73)
    assert outputs_view({"probabilities": [[0.2, 0.8]], "label": 1}).score == pytest.approx(0.8)
