"""The error-rate CUSUM: detects 0.10 -> 0.16 fast, keeps its false-alarm rate, never loses an alarm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.drift import BernoulliCusum


def test_error_rate_rise_is_found_within_600_outcomes_median() -> None:
    # the target is on the median: one unlucky reference window (p0 estimated high) can be slower
    rng = np.random.default_rng(1)
    delays = []
    for _ in range(21):
        detector = BernoulliCusum.from_reference(rng.random(5000) < 0.10, arl0=10_000)
        assert detector.p1 == pytest.approx(1.5 * detector.p0)
        stream = np.concatenate([rng.random(4000) < 0.10, rng.random(4000) < 0.16])
        after = [a for a in detector.update(stream) if a.index >= 4000]
        delays.append(after[0].index - 4000 + 1 if after else np.inf)
        if after:  # the change-point estimate lands near the true change
            assert after[0].change_index > 3000
    assert np.median(delays) <= 600, delays


def test_in_control_false_alarms_match_arl0() -> None:
    # 40 streams x 50 000 outcomes at ARL0 = 10 000 -> 200 expected; Poisson sd ~7%, calibration ~5%
    rng = np.random.default_rng(6)
    alarms = 0
    for _ in range(40):
        detector = BernoulliCusum.from_reference(rng.random(5000) < 0.10, arl0=10_000)
        alarms += len(detector.update(rng.random(50_000) < 0.10))
    assert abs(alarms - 200) <= 50, alarms


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=10), seed=st.integers(0, 10_000))
def test_batching_is_invisible(cuts: list[int], seed: int) -> None:
    stream = np.random.default_rng(seed).random(4000) < 0.3
    whole = BernoulliCusum(0.1, 0.2, threshold=3.0)
    pieces = BernoulliCusum(0.1, 0.2, threshold=3.0)
    expected = whole.update(stream)
    bounds = [0, *sorted(cuts), 4000]
    got = [a for lo, hi in zip(bounds, bounds[1:]) for a in pieces.update(stream[lo:hi])]
    assert [(a.index, a.change_index) for a in got] == [(a.index, a.change_index) for a in expected]
    assert [a.statistic for a in got] == pytest.approx([a.statistic for a in expected])
    assert pieces.statistic == pytest.approx(whole.statistic) and pieces.alarms_total == len(expected)


def test_scalar_reference_loop_agrees() -> None:
    rng = np.random.default_rng(7)
    stream = rng.random(3000) < 0.25
    detector = BernoulliCusum(0.1, 0.2, threshold=2.0)
    alarms = detector.update(stream)
    up, down = np.log(2.0), np.log(0.8 / 0.9)
    statistic, expected = 0.0, []
    for index, error in enumerate(stream):
        statistic = max(0.0, statistic + (up if error else down))
        if statistic > 2.0:
            expected.append(index)
            statistic = 0.0
    assert [a.index for a in alarms] == expected and detector.statistic == pytest.approx(statistic)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="0 < p0 < p1 < 1"):
        BernoulliCusum(0.2, 0.1)
    with pytest.raises(ValueError, match="arl0 must be at least 10"):
        BernoulliCusum(0.1, arl0=1)
    with pytest.raises(ValueError, match="0/1"):
        BernoulliCusum(0.1, threshold=3.0).update(np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="empty"):
        BernoulliCusum.from_reference(np.array([], dtype=bool))
