"""Quality drift per model version: a Bernoulli CUSUM on each joined stream of errors (pure: no I/O).

The worker scores every model that predicted a request against its label, and the serving arm
with its reward. Each (route, role, arm, model, version, signal) is one series of 0/1 outcomes in
the order they were joined:

* ``label_error``    - 1 when the model's predicted label differs from the outcome's label
                       (classifiers; regressors have no such series);
* ``reward_failure`` - 1 - reward, on ``bernoulli`` routes, for rewards that are exactly 0 or 1
                       (default rewards are not outcomes and are left out).

A series first learns its in-control error rate p0 from its first `reference_outcomes`
outcomes, then runs :class:`banditgate.drift.bernoulli_cusum.BernoulliCusum` (p1 = its default, a 50 %
relative rise for small p0) with a threshold calibrated to `arl0` joined outcomes between false
alarms (:func:`banditgate.drift.calibration.bernoulli_threshold`, which takes ~1-2 s: the caller
supplies `threshold`, which may answer None until a background calibration is done; outcomes
wait in the series meanwhile, at most `max_pending`). Updates are vectorised: :meth:`update`
feeds each series all of its outcomes since the last call as one array.

Every alarm is returned (a :class:`SeriesAlarm`): the detector restarts after each, so a
persisting rise alarms again and again, and the caller groups them into episodes in time
(banditgate.drift.episodes: one alert when an episode opens, one when it has gone quiet). The
in-control rate is not re-learned, so a model that stays worse keeps alarming.

>>> import numpy as np
>>> tracker = QualityDriftTracker(arl0=1000, reference_outcomes=2000, threshold=lambda *args: 5.0)
>>> key = SeriesKey("churn", "primary", "a", "m", 1, "label_error")
>>> rng = np.random.default_rng(0)
>>> tracker.add_many(key, rng.random(2000) < 0.1); tracker.update()
[]
>>> tracker.add_many(key, rng.random(1000) < 0.1); tracker.update()
[]
>>> tracker.add_many(key, rng.random(1000) < 0.4); sorted({a.key.signal for a in tracker.update()})
['label_error']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from banditgate.drift.bernoulli_cusum import BernoulliCusum, QualityAlarm
from banditgate.jsontypes import JSONValue
from feedback.outcome_metrics import PredictionView, label_error

Signal = Literal["label_error", "reward_failure"]
ThresholdFor = Callable[[float, float, float, int], "float | None"]
"""(p0, p1, arl0, reference count) -> the calibrated threshold, or None while it is not known yet."""


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """Which model version and which signal a series watches."""

    route: str
    role: str
    """``primary`` or ``shadow``."""
    arm: str
    model: str
    version: int
    signal: Signal


_SeriesFields: TypeAlias = tuple[str, str, str, str, int, Signal]
"""A SeriesKey's fields as a plain tuple (route, role, arm, model, version, signal)."""


@dataclass(frozen=True, slots=True)
class SeriesAlarm:
    """One alarm of one series."""

    key: SeriesKey
    alarm: QualityAlarm
    outcomes: int
    """Outcomes the detector had seen (after the reference) when it alarmed."""


@dataclass(frozen=True, slots=True)
class SeriesState:
    """One series as the gauges show it."""

    key: SeriesKey
    statistic: float | None
    """None while the series is still learning its reference rate or waiting for calibration."""
    threshold: float | None
    p0: float | None
    in_alarm: bool
    """An alarm episode of the series is open (the caller's episodes say)."""
    alarms_total: int
    outcomes: int


class _Series:
    __slots__ = ("batch", "detector", "key", "p0", "pending", "reference", "reference_count")

    def __init__(self, key: SeriesKey) -> None:
        self.key = key
        self.batch: list[bool] = []
        self.reference: list[np.ndarray] = []
        self.reference_count = 0
        self.detector: BernoulliCusum | None = None
        self.pending: list[np.ndarray] = []
        self.p0: float | None = None


class QualityDriftTracker:
    """Bernoulli CUSUMs per series, fed in batches (see the module docstring).

    Raises ValueError for `arl0` < 10 or `reference_outcomes` < 20."""

    def __init__(self, *, arl0: float, reference_outcomes: int, threshold: ThresholdFor,
                 max_pending: int = 100_000) -> None:
        if not arl0 >= 10:
            raise ValueError(f"arl0 must be at least 10 outcomes, got {arl0}")
        if reference_outcomes < 20:
            raise ValueError(f"reference_outcomes must be at least 20, got {reference_outcomes}")
        self.arl0 = float(arl0)
        self.reference_outcomes = int(reference_outcomes)
        self._threshold = threshold
        self._max_pending = max_pending
        # by the key's fields as a plain tuple: hashing it is cheaper than hashing a SeriesKey,
        # and this runs once per scored outcome
        self._series: dict[_SeriesFields, _Series] = {}
        self._touched: set[_SeriesFields] = set()
        self.dropped = 0
        """Outcomes dropped because a series waited too long for its threshold."""

    # -- feeding -------------------------------------------------------------------------------
    def _get(self, fields: _SeriesFields) -> _Series:
        series = self._series.get(fields)
        if series is None:
            series = self._series[fields] = _Series(SeriesKey(*fields))
        self._touched.add(fields)
        return series

    def add(self, key: SeriesKey, error: bool) -> None:
        """One joined outcome of a series (in arrival order)."""
        self._get((key.route, key.role, key.arm, key.model, key.version, key.signal)).batch.append(error)

    def add_many(self, key: SeriesKey, errors: npt.ArrayLike) -> None:
        """Several outcomes of one series, in order (0/1 or booleans)."""
        series = self._get((key.route, key.role, key.arm, key.model, key.version, key.signal))
        series.batch.extend(bool(e) for e in np.asarray(errors).ravel())

    def add_label(self, route: str, role: str, arm: str, model: str, version: int, view: PredictionView,
                  label: JSONValue) -> None:
        """A model's prediction scored against the outcome's label (nothing for unscorable pairs)."""
        error = label_error(view, label)
        if error is not None:
            self._get((route, role, arm, model, version, "label_error")).batch.append(error)

    def add_reward(self, route: str, arm: str, model: str, version: int, reward: float) -> None:
        """A Bernoulli reward of the serving arm (only exact 0 and 1 count)."""
        if reward == 0.0 or reward == 1.0:
            self._get((route, "primary", arm, model, version, "reward_failure")).batch.append(reward == 0.0)

    # -- the batch update ---------------------------------------------------------------------
    def update(self) -> list[SeriesAlarm]:
        """Run every series that got outcomes since the last call; return their alarms."""
        alarms: list[SeriesAlarm] = []
        touched, self._touched = self._touched, set()
        for fields in touched:
            series = self._series[fields]
            key = series.key
            if not series.batch and not series.pending:
                continue
            values = np.fromiter(series.batch, dtype=bool, count=len(series.batch))
            series.batch.clear()
            if series.detector is None:
                learned = self._learn(fields, series, values)
                if learned is None:
                    continue
                values = learned
            alarms.extend(self._detect(key, series, values))
        return alarms

    def _learn(self, fields: _SeriesFields, series: _Series, values: np.ndarray) -> np.ndarray | None:
        """Reference phase and calibration; returns the outcomes ready for the detector, if any."""
        if series.p0 is None:
            need = self.reference_outcomes - series.reference_count
            series.reference.append(values[:need])
            series.reference_count += min(need, values.size)
            values = values[need:]
            if series.reference_count < self.reference_outcomes:
                return None
            reference = np.concatenate(series.reference)
            series.reference = []
            series.p0 = (float(reference.sum()) + 0.5) / (reference.size + 1.0)
        if values.size:
            series.pending.append(values)
        p0 = series.p0
        p1 = p0 + 0.5 * min(p0, 1.0 - p0)
        threshold = self._threshold(p0, p1, self.arl0, self.reference_outcomes)
        if threshold is None:
            waiting = sum(chunk.size for chunk in series.pending)
            while waiting > self._max_pending and series.pending:
                waiting -= series.pending[0].size
                self.dropped += series.pending.pop(0).size
            self._touched.add(fields)  # look again at the next update
            return None
        series.detector = BernoulliCusum(p0, p1, self.arl0, threshold=threshold)
        pending, series.pending = series.pending, []
        return np.concatenate(pending) if pending else None

    def _detect(self, key: SeriesKey, series: _Series, values: np.ndarray) -> Iterator[SeriesAlarm]:
        detector = series.detector
        assert detector is not None  # noqa: S101 - _learn made it
        for alarm in detector.update(values):
            yield SeriesAlarm(key, alarm, alarm.index + 1)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        """Some series have outcomes not yet run (call :meth:`update` again, e.g. on a timer)."""
        return bool(self._touched)

    def states(self, in_alarm: Callable[[SeriesKey], bool] = lambda key: False) -> list[SeriesState]:
        """Every series as it stands (for gauges); `in_alarm` says which have an open episode."""
        out = []
        for series in self._series.values():
            detector = series.detector
            out.append(SeriesState(key=series.key, statistic=None if detector is None else detector.statistic,
                                   threshold=None if detector is None else detector.threshold, p0=series.p0,
                                   in_alarm=in_alarm(series.key),
                                   alarms_total=0 if detector is None else detector.alarms_total,
                                   outcomes=series.reference_count + (0 if detector is None else detector.observations)))
        return out


__all__ = ["QualityDriftTracker", "SeriesAlarm", "SeriesKey", "SeriesState", "Signal", "ThresholdFor"]
