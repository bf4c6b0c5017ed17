"""The quality-drift tracker (pure): reference phase, calibration wait, vectorised updates that do
not depend on how a stream is cut into batches. (Alarms become episodes in the watch: see
tests/drift/test_episodes.py and test_quality_drift_watch.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from banditgate.drift.calibration import bernoulli_threshold
from feedback.outcome_metrics import PredictionView, label_error
from feedback.quality_drift_tracker import QualityDriftTracker, SeriesKey

KEY = SeriesKey("churn", "primary", "a", "churn-gbm", 3, "label_error")


def calibrated(p0: float, p1: float, arl0: float, count: int) -> float:
    return bernoulli_threshold(p0, p1, arl0, count, 0)


def run(stream: np.ndarray, cuts: list[int], **options: object) -> list[tuple[int, int]]:
    """Feed `stream` cut at `cuts`; return (alarm index, change index) of each alarm."""
    tracker = QualityDriftTracker(arl0=10_000, reference_outcomes=1000, threshold=calibrated, **options)
    out = []
    for part in np.split(stream, cuts):
        tracker.add_many(KEY, part)
        out.extend((a.alarm.index, a.alarm.change_index) for a in tracker.update())
    return out


def test_stationary_streams_stay_quiet() -> None:
    """Ten seeded in-control streams of 1 000 reference + 5 000 monitored outcomes at ARL0 10 000:
    about 0.5 false alarms are expected per stream before calibration error, so a fixed set of
    seeds that raised none is pinned (a change in the statistic or calibration shows here)."""
    rng = np.random.default_rng(11)
    alarms = [run(rng.random(6000) < 0.1, [3000]) for _ in range(10)]
    assert sum(len(a) for a in alarms) <= 3
    assert alarms[0] == []


def test_a_rise_alarms_after_it_and_batches_do_not_matter() -> None:
    """Error rate 0.10 -> 0.30 at outcome 3 000 (2 000 after the reference): the first alarm
    within 400 outcomes, the change estimated near the true one, none before; a persisting rise
    alarms again (the restarted CUSUM), and cutting the stream differently gives the same alarms."""
    rng = np.random.default_rng(5)
    stream = np.concatenate([rng.random(3000) < 0.1, rng.random(3000) < 0.3])
    alarms = run(stream, [500, 1500, 2999, 3001, 4000])
    alarm, change = alarms[0]
    assert 2000 < alarm < 2400 and 1800 < change <= alarm
    assert len(alarms) > 1 and all(index > 2000 for index, _ in alarms)
    assert run(stream, [7, 1000, 1001, 2500, 5999]) == alarms
    assert run(stream, []) == alarms


def test_outcomes_wait_for_the_threshold_and_none_are_lost() -> None:
    answer: list[float | None] = [None]
    tracker = QualityDriftTracker(arl0=10_000, reference_outcomes=100, threshold=lambda *a: answer[0])
    rng = np.random.default_rng(1)
    tracker.add_many(KEY, rng.random(100) < 0.1)
    tracker.add_many(KEY, np.ones(300, dtype=bool))
    assert tracker.update() == []
    assert tracker.states()[0].statistic is None and tracker.states()[0].p0 is not None
    answer[0] = 4.0
    alarms = tracker.update()  # nothing new arrived: the waiting outcomes are run now
    assert alarms and alarms[0].alarm.change_index == 0
    state = tracker.states(lambda key: key == KEY)[0]
    assert state.in_alarm and state.threshold == 4.0 and state.outcomes == 400


def test_reward_and_label_series() -> None:
    tracker = QualityDriftTracker(arl0=1000, reference_outcomes=20, threshold=lambda *a: 3.0)
    view = PredictionView(score=0.8, predicted=1)
    for _ in range(20):
        tracker.add_label("r", "shadow", "c", "m", 2, view, 1)
        tracker.add_reward("r", "a", "m", 1, 1.0)
        tracker.add_reward("r", "a", "m", 1, 0.5)  # not a 0/1 reward: not a Bernoulli outcome
    tracker.update()
    signals = {(s.key.role, s.key.signal): s.outcomes for s in tracker.states()}
    assert signals == {("shadow", "label_error"): 20, ("primary", "reward_failure"): 20}
    assert label_error(view, 0) is True and label_error(PredictionView(score=3.2), 1.5) is None


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        QualityDriftTracker(arl0=5, reference_outcomes=100, threshold=calibrated)
    with pytest.raises(ValueError):
        QualityDriftTracker(arl0=1000, reference_outcomes=5, threshold=calibrated)
