"""Thresholds stored in reference.json under their calibration key: used without simulating when
the key matches, keyed by exactly the calibration's inputs; a key is calibrated once per process
however many threads miss it at the same time; old profiles without thresholds still load."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from banditgate.drift import calibration
from banditgate.drift.adaptive import EstimatorSettings
from banditgate.drift.calibration import _Memo, bernoulli_key, calibrations_run, clear_memo, feature_key
from banditgate.drift.monitor import FeatureDriftMonitor, ScoreDriftMonitor, profile_keys, profile_thresholds
from banditgate.drift.reference import ProfileError, ReferenceProfile

EIGHT = np.array([1 / 8] * 8 + [0.0])


@pytest.fixture(autouse=True)
def fresh_memo():  # type: ignore[no-untyped-def]
    """No test here leaves a threshold (real or made up) in the process's memo for the others."""
    clear_memo()
    yield
    clear_memo()


def profile() -> ReferenceProfile:
    rng = np.random.default_rng(0)
    return ReferenceProfile.build(rng.normal(size=(2000, 3)), ["a", "b", "c"], scores=rng.random(2000), bins=8)


def test_stored_thresholds_are_used_without_simulation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = profile()
    keys = profile_keys(base, 10_000)
    assert len(keys) == 2  # three features with the same bin shares share one key; the score has its own
    stored = base.with_thresholds({key: 40.0 + index for index, key in enumerate(sorted(keys))})
    stored.save(tmp_path / "reference.json")
    loaded = ReferenceProfile.load(tmp_path / "reference.json")
    assert loaded.thresholds == stored.thresholds
    clear_memo()
    features = FeatureDriftMonitor(loaded, family_arl0=10_000)
    score = ScoreDriftMonitor(loaded, arl0=10_000)
    assert calibrations_run() == 0
    by_key = loaded.thresholds
    feature_key_, score_key = (k for k in keys if keys[k][0].name != "score"), (k for k in keys if keys[k][0].name == "score")
    assert list(features.threshold) == [by_key[next(feature_key_)]] * 3 and list(score.threshold) == [by_key[next(score_key)]]
    assert profile_thresholds(loaded, 10_000) == loaded.thresholds and calibrations_run() == 0


def test_the_key_is_stable_and_changes_with_every_input() -> None:
    settings = EstimatorSettings()
    reference = feature_key(EIGHT, 1000, 10_000, settings, 0)
    assert reference == feature_key(EIGHT.copy(), 1000, 10_000.0, EstimatorSettings(), 0)  # same inputs, same key
    assert reference == "feature:95dd05b94e6795509e1897b0e002d563"  # pinned: a change must come with METHOD
    variants = [
        feature_key(np.array([1 / 10] * 10 + [0.0]), 1000, 10_000, settings, 0),  # bins
        feature_key(np.array([0.3] + [0.1] * 7 + [0.0]), 1000, 10_000, settings, 0),  # bin shares
        feature_key(EIGHT, 2000, 10_000, settings, 0),  # reference count
        feature_key(EIGHT, 1000, 20_000, settings, 0),  # ARL0
        feature_key(EIGHT, 1000, 10_000, replace(settings, block_size=64), 0),  # estimator settings
        feature_key(EIGHT, 1000, 10_000, replace(settings, shrinkage=0.2), 0),
        feature_key(EIGHT, 1000, 10_000, settings, 1),  # seed
    ]
    assert len({reference, *variants}) == len(variants) + 1
    assert bernoulli_key(0.1, 0.15, 1e6, 1000) != bernoulli_key(0.1, 0.15, 1e6, 2000) != bernoulli_key(0.1, 0.15, 1e5, 2000)


def test_a_stored_threshold_under_another_key_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    base = profile()
    other = {feature_key(EIGHT, 2000, 99_999, EstimatorSettings(), 0): 1.0}  # another ARL0's threshold
    computed: list[tuple[float, ...]] = []
    # the simulation is replaced here (a pure unit test of which key is looked up, not of the statistics)
    monkeypatch.setattr(calibration, "_feature_threshold", lambda frequencies, *rest: computed.append(frequencies) or 7.0)
    clear_memo()
    monitor = FeatureDriftMonitor(base.with_thresholds(other), family_arl0=10_000)
    assert list(monitor.threshold) == [7.0] * 3 and len(computed) == 1 and calibrations_run() == 1


def test_concurrent_misses_compute_once() -> None:
    memo = _Memo()
    started, release = threading.Event(), threading.Event()
    calls = []

    def compute() -> float:
        calls.append(threading.get_ident())
        started.set()
        release.wait(5)
        return 3.5

    results: list[float] = []
    threads = [threading.Thread(target=lambda: results.append(memo.get("k", compute))) for _ in range(8)]
    threads[0].start()
    started.wait(5)  # the first caller is simulating; the others miss while it runs
    for thread in threads[1:]:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == [3.5] * 8 and len(calls) == 1 and memo.computed == 1
    assert memo.get("k", compute) == 3.5 and len(calls) == 1


def test_a_failed_calibration_is_not_kept_and_the_memo_is_bounded() -> None:
    memo = _Memo(size=2)

    def fail() -> float:
        raise calibration.CalibrationError("no")

    with pytest.raises(calibration.CalibrationError):
        memo.get("k", fail)
    assert memo.get("k", lambda: 1.0) == 1.0
    memo.get("a", lambda: 2.0)
    memo.get("b", lambda: 3.0)  # "k" is the oldest: forgotten
    assert memo.get("k", lambda: 4.0) == 4.0 and memo.computed == 4


def test_old_profiles_without_thresholds_load_and_write_as_before(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = profile()
    document = json.loads(base.to_json())
    assert "thresholds" not in document  # a profile without thresholds writes the old format
    loaded = ReferenceProfile.from_json(json.dumps(document))
    assert loaded.thresholds == {} and loaded.to_json() == base.to_json()
    document["thresholds"] = {"feature:x": -1.0}
    with pytest.raises(ProfileError, match="positive finite"):
        ReferenceProfile.from_json(json.dumps(document))
    document["thresholds"] = [1.0]
    with pytest.raises(ProfileError, match="object"):
        ReferenceProfile.from_json(json.dumps(document))
