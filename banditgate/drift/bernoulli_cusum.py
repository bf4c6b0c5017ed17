"""Quality drift: a Bernoulli CUSUM on the joined error (or failure) stream.

Each joined outcome contributes 1 (error) or 0; the increments are the log-likelihood ratio of
an error rate p1 against the in-control p0, and the threshold is calibrated by simulation to
ARL0 (see calibration.py). Labels arrive late and out of order: the detector sees them in
arrival order, so ARL0 and detection delays are counted in joined outcomes, and a drift is found
that many outcomes after its labels start arriving. For Bernoulli rewards feed 1 - reward.

    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> detector = BernoulliCusum.from_reference(rng.random(5000) < 0.10, arl0=10_000)
    >>> detector.update(rng.random(3000) < 0.10)
    []
    >>> alarm = detector.update(rng.random(3000) < 0.20)[0]
    >>> 0 < alarm.index - 3000 < 600, alarm.change_index >= 2900
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from banditgate.drift.calibration import bernoulli_threshold
from banditgate.drift.cusum import _lindley


@dataclass(frozen=True)
class QualityAlarm:
    """A detected rise of the error rate.

    index: 0-based position (in arrival order) of the outcome at which the statistic crossed;
    change_index: the CUSUM's estimate of where the rise began (first outcome after the
    statistic last sat at zero); error_rate_since_change: the error rate from there to index.
    """

    index: int
    statistic: float
    threshold: float
    p0: float
    p1: float
    change_index: int
    error_rate_since_change: float


class BernoulliCusum:
    """One-sided CUSUM for an error rate rising from p0 to (at least about) p1.

    p1 defaults to p0 + min(p0, 1 - p0) / 2 (a 50% relative rise for small p0). With
    reference_count, p0 was estimated from that many outcomes and calibration accounts for its
    sampling error. Raises ValueError unless 0 < p0 < p1 < 1 and arl0 >= 10.
    """

    def __init__(self, p0: float, p1: float | None = None, arl0: float = 10_000, *,
                 reference_count: int | None = None, calibration_seed: int = 0,
                 threshold: float | None = None) -> None:
        if p1 is None:
            p1 = p0 + 0.5 * min(p0, 1.0 - p0)
        if not 0.0 < p0 < p1 < 1.0:
            raise ValueError(f"need 0 < p0 < p1 < 1, got p0={p0}, p1={p1}")
        if not arl0 >= 10:
            raise ValueError(f"arl0 must be at least 10 outcomes, got {arl0}")
        self.p0, self.p1, self.arl0 = float(p0), float(p1), float(arl0)
        self._up = math.log(p1 / p0)
        self._down = math.log((1.0 - p1) / (1.0 - p0))
        if threshold is None:
            threshold = bernoulli_threshold(self.p0, self.p1, self.arl0, reference_count, calibration_seed)
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        self._threshold = float(threshold)
        self._statistic = 0.0
        self._observations = 0
        self._alarms_total = 0
        # the current run: outcomes since the statistic last sat at zero (the change-point estimate)
        self._run_start = 0
        self._run_errors = 0

    @classmethod
    def from_reference(cls, errors: np.ndarray, p1: float | None = None, arl0: float = 10_000,
                       **options: object) -> BernoulliCusum:
        """Learn p0 from an in-control window of outcomes (smoothed: (errors + 1/2) / (n + 1))."""
        reference = _as_errors(errors)
        if reference.size == 0:
            raise ValueError("the reference window is empty")
        p0 = (float(reference.sum()) + 0.5) / (reference.size + 1.0)
        return cls(p0, p1, arl0, reference_count=int(reference.size), **options)  # type: ignore[arg-type]

    @property
    def statistic(self) -> float:
        return self._statistic

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def alarms_total(self) -> int:
        return self._alarms_total

    @property
    def observations(self) -> int:
        return self._observations

    def update(self, errors: np.ndarray) -> list[QualityAlarm]:
        """Feed outcomes in arrival order (bool, or 0/1 numbers). Every outcome is tested; at a
        crossing the alarm is returned and the statistic restarts from zero at the next outcome.
        Raises ValueError on values other than 0/1."""
        values = _as_errors(errors)
        increments = np.where(values, self._up, self._down)
        base = self._observations
        alarms: list[QualityAlarm] = []
        offset = 0
        while offset < values.size:
            path = _lindley(increments[offset:], np.asarray(self._statistic))
            crossed = path > self._threshold
            end = int(np.argmax(crossed)) + 1 if crossed.any() else path.size
            zeros = np.flatnonzero(path[:end] == 0.0)
            if zeros.size:
                self._run_start = base + offset + int(zeros[-1]) + 1
                self._run_errors = int(values[offset + int(zeros[-1]) + 1: offset + end].sum())
            else:
                self._run_errors += int(values[offset: offset + end].sum())
            if end == path.size and not crossed[-1]:
                self._statistic = float(path[-1])
                break
            index = base + offset + end - 1
            run_length = index + 1 - self._run_start
            self._alarms_total += 1
            alarms.append(QualityAlarm(index=index, statistic=float(path[end - 1]), threshold=self._threshold,
                                       p0=self.p0, p1=self.p1, change_index=self._run_start,
                                       error_rate_since_change=self._run_errors / max(run_length, 1)))
            self._statistic, self._run_start, self._run_errors = 0.0, index + 1, 0
            offset += end
        self._observations += values.size
        return alarms


def _as_errors(errors: np.ndarray) -> np.ndarray:
    values = np.asarray(errors).ravel()
    if values.dtype == bool:
        return values
    if values.dtype.kind not in "iuf" or not np.all((values == 0) | (values == 1)):
        raise ValueError("errors must be booleans or 0/1 numbers")
    return values.astype(bool)
