"""The worker's quality-drift watch: joined outcomes in, gauges and ``quality`` alerts out.

After each batch's effects are in Redis, the Label and Reward effects the ledger applied *now*
(so a replayed or redelivered outcome is fed once) go to the pure
:class:`feedback.quality_drift.QualityDriftTracker`, one series per route / role / arm / model
version / signal. Thresholds are calibrated in a worker thread (1-2 s per distinct error rate,
cached for the process) in a helper process at a lower CPU priority, never on the event loop; a
series waits, holding its outcomes, until its
threshold is known. A new alarm episode becomes one alert on the alerts topic (through
:class:`feedback.sinks.KafkaOut`, like every alert of the worker):

``{"kind": "quality", "route", "arm", "model_version", "metric": "label_error_rate" |
"reward_failure_rate", "value": <error rate since the estimated change>, "threshold": <p1, the
rate the CUSUM is tuned to detect>, "ts", "details": {model, role, signal, statistic,
cusum_threshold, p0, p1, change_outcome, alarm_outcome, arl0, reference_outcomes}}``

Each worker watches the outcomes of its own partitions; the detectors live in the process (a
restarted worker learns the reference rates again), so the alert is at most once per episode per
process, and a crash between an alarm and its alert loses that alert (the next alarm of a
persisting drift opens a new episode after a restart).
"""

from __future__ import annotations

import collections

import asyncio
import logging
import multiprocessing
import os
import time
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from banditgate.drift.calibration import bernoulli_threshold
from banditgate.events import Alert
from feedback.join import Label, Reward
from feedback.metrics import FeedbackMetrics
from feedback.quality_drift import Episode, QualityDriftTracker

log = logging.getLogger("banditgate.feedback.quality_drift")

_METRIC = {"label_error": "label_error_rate", "reward_failure": "reward_failure_rate"}


def _lower_priority() -> None:
    os.nice(10)


class ThresholdCache:
    """Calibrated thresholds by (p0, p1, arl0, reference count); unknown ones are computed in the
    background and answered None until they are done. Call from the event loop.

    A calibration is a few seconds of numpy simulation: it runs in one helper process at a lower
    CPU priority (`processes=True`), so it neither holds the worker's GIL nor takes a core from
    the worker, Kafka or Redis while they are busy; if that process cannot run, in a thread."""

    def __init__(self, seed: int = 0, processes: bool = True) -> None:
        self._seed = seed
        self._known: dict[tuple[float, float, float, int], float] = {}
        self._running: set[tuple[float, float, float, int]] = set()
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor | None:
        if self._processes and self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_lower_priority)
        return self._pool

    def close(self) -> None:
        """Stop the helper process (calibrations in progress are abandoned)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __call__(self, p0: float, p1: float, arl0: float, reference_count: int) -> float | None:
        key = (p0, p1, arl0, reference_count)
        known = self._known.get(key)
        if known is not None or key in self._running:
            return known
        self._running.add(key)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor(), bernoulli_threshold, p0, p1, arl0, reference_count,
                                      self._seed)

        def done(f: asyncio.Future[float]) -> None:
            self._running.discard(key)
            if f.cancelled():
                return
            exc = f.exception()
            if isinstance(exc, BrokenExecutor):
                log.warning("quality-drift calibration process failed (%s); calibrating in a thread instead", exc)
                self._processes, self._pool = False, None
                return  # asked again at the next update
            if exc is not None:
                log.error("quality-drift calibration for p0=%.4f failed: %s: %s", p0, type(exc).__name__, exc)
                return
            self._known[key] = f.result()

        future.add_done_callback(done)
        return None


class QualityDriftWatch:
    """Feeds applied effects to the tracker, refreshes the gauges, makes the alerts."""

    def __init__(self, tracker: QualityDriftTracker, reward_kinds: Mapping[str, str], metrics: FeedbackMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.tracker = tracker
        self._bernoulli = {route for route, kind in reward_kinds.items() if kind == "bernoulli"}
        self._metrics = metrics
        self._clock = clock
        self.pending_alarms: collections.Counter[str] = collections.Counter()
        """Alarm episodes of serving (not shadow) models per route, not yet counted for the
        route's `quality` retraining trigger (feedback.lifecycle takes them)."""

    @property
    def waiting(self) -> bool:
        """Some series hold outcomes until their threshold is calibrated."""
        return self.tracker.waiting

    def observe(self, scored: Iterable[Label | Reward]) -> list[Alert]:
        """One batch's applied Label / Reward effects, in order; returns the alerts of the alarm
        episodes they opened (to be sent) and refreshes the gauges."""
        tracker = self.tracker
        bernoulli = self._bernoulli
        for effect in scored:
            served = effect.served
            if effect.__class__ is Label:
                tracker.add_label(effect.route, served.role, served.arm, served.model, served.model_version,
                                  served.view, effect.label)  # type: ignore[union-attr]
            elif not effect.default and effect.route in bernoulli:  # type: ignore[union-attr]
                tracker.add_reward(effect.route, served.arm, served.model, served.model_version,
                                   effect.reward)  # type: ignore[union-attr]
        episodes = tracker.update()
        self._metrics.quality_drift.update(tracker.states())
        for episode in episodes:
            if episode.key.role != "shadow":
                self.pending_alarms[episode.key.route] += 1
        return [self._alert(episode) for episode in episodes]

    def _alert(self, episode: Episode) -> Alert:
        key, alarm = episode.key, episode.alarm
        log.warning("quality drift: route %s %s %s (%s v%s) %s rose from %.4f to %.4f since outcome %d "
                    "(CUSUM %.2f > %.2f)", key.route, key.role, key.arm, key.model, key.version, key.signal,
                    alarm.p0, alarm.error_rate_since_change, alarm.change_index, alarm.statistic, alarm.threshold)
        details: dict[str, Any] = {
            "model": key.model, "role": key.role, "signal": key.signal, "statistic": alarm.statistic,
            "cusum_threshold": alarm.threshold, "p0": alarm.p0, "p1": alarm.p1,
            "change_outcome": alarm.change_index, "alarm_outcome": alarm.index,
            "arl0": self.tracker.arl0, "reference_outcomes": self.tracker.reference_outcomes,
            "test": "Bernoulli CUSUM of the error rate p0 -> p1 on joined outcomes, threshold calibrated to arl0",
        }
        return Alert(kind="quality", route=key.route, arm=key.arm, model_version=key.version,
                     metric=_METRIC[key.signal], value=alarm.error_rate_since_change, threshold=alarm.p1,
                     ts=self._clock(), details=details)


__all__ = ["QualityDriftWatch", "ThresholdCache"]
