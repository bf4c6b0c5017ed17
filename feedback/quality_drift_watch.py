"""The worker's quality-drift watch: joined outcomes in, gauges and ``quality`` alerts out.

After each batch's effects are in Redis, the Label and Reward effects the ledger applied *now*
(so a replayed or redelivered outcome is fed once) go to the pure
:class:`feedback.quality_drift_tracker.QualityDriftTracker`, one series per route / role / arm / model
version / signal. Thresholds are calibrated in a worker thread (1-2 s per distinct error rate,
cached for the process) in a helper process at a lower CPU priority, never on the event loop; a
series waits, holding its outcomes, until its
threshold is known. Alarms are grouped in episodes per (route, arm, model, version, metric)
(banditgate.drift.episodes): the alarm that opens one becomes a `firing` alert on the alerts topic
(through :class:`feedback.sinks.KafkaOut`, like every alert of the worker), later alarms only
count, and `feedback.quality_episode_quiet_s` seconds without an alarm close it with a
`resolved` alert:

``{"kind": "quality", "state": "firing", "route", "arm", "model_version", "metric":
"label_error_rate" | "reward_failure_rate", "value": <error rate since the estimated change>,
"threshold": <p1, the rate the CUSUM is tuned to detect>, "ts", "details": {model, feature: null,
episode, opened_at, role, signal, statistic, cusum_threshold, p0, p1, change_outcome,
alarm_outcome, arl0, reference_outcomes}}``; the resolved alert repeats the key fields and adds
details.alarms, last_alarm_at and quiet_s.

Each worker watches the outcomes of its own partitions; an episode is claimed in Redis
(banditgate.episode_store), so workers that see the same rise send one alert between them. The
detectors live in the process (a restarted worker learns the reference rates again); a crash
between an alarm and its alert loses that alert, and the claim of a dead owner expires, so the
next alarm of a persisting drift opens a new episode.

The watch is fed from the batch pipeline, which does not wait for Redis here: claims and the
quiet-episode sweep run as tasks, and their alerts are handed out by the next `observe` (the
worker calls it at least every sweep while `waiting` is true).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor

from banditgate.drift.calibration import bernoulli_threshold
from banditgate.drift.episodes import EpisodeBook, EpisodeKey
from banditgate.episode_store import Episodes
from banditgate.events import Alert
from banditgate.jsontypes import JSONObject, JSONValue
from feedback.join import Label, Reward
from feedback.metrics import FeedbackMetrics
from feedback.quality_drift_tracker import QualityDriftTracker, SeriesAlarm, SeriesKey

log = logging.getLogger("banditgate.feedback.quality_drift")

_METRIC = {"label_error": "label_error_rate", "reward_failure": "reward_failure_rate"}
SWEEP_INTERVAL_S = 1.0
"""How often quiet episodes are looked at."""


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


def episode_key(key: SeriesKey) -> EpisodeKey:
    """The alert episode a series' alarms belong to (its role is in the arm name)."""
    return EpisodeKey(key.route, key.arm, key.model, key.version, _METRIC[key.signal], None)


class QualityDriftWatch:
    """Feeds applied effects to the tracker, refreshes the gauges, makes the alerts. `episodes`:
    how alarms become alerts (default: this process alone, episodes closed after 600 s quiet)."""

    def __init__(self, tracker: QualityDriftTracker, reward_kinds: Mapping[str, str], metrics: FeedbackMetrics,
                 clock: Callable[[], float] = time.time, episodes: Episodes | None = None) -> None:
        self.tracker = tracker
        self._bernoulli = {route for route, kind in reward_kinds.items() if kind == "bernoulli"}
        self._metrics = metrics
        self._clock = clock
        self.episodes = episodes or Episodes("quality", EpisodeBook(600.0), None, clock=clock)
        self.pending_alarms: collections.Counter[str] = collections.Counter()
        """Alarm episodes of serving (not shadow) models per route, not yet counted for the
        route's `quality` retraining trigger (feedback.lifecycle takes them)."""
        self._ready: list[Alert] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._swept_at = -float("inf")

    @property
    def waiting(self) -> bool:
        """Some series hold outcomes until their threshold is calibrated, alerts wait to be handed
        out, or episodes are open (they close on a later call)."""
        return self.tracker.waiting or bool(self._ready) or bool(self._tasks) or len(self.episodes.book) > 0

    def observe(self, scored: Iterable[Label | Reward]) -> list[Alert]:
        """One batch's applied Label / Reward effects, in order; returns the alerts ready to send
        (of episodes opened or closed since the last call) and refreshes the gauges."""
        tracker = self.tracker
        bernoulli = self._bernoulli
        for effect in scored:
            served = effect.served
            if type(effect) is Label:  # exact class (as __class__ was), and mypy narrows on it
                tracker.add_label(effect.route, served.role, served.arm, served.model, served.model_version,
                                  served.view, effect.label)
            elif type(effect) is Reward and not effect.default and effect.route in bernoulli:
                tracker.add_reward(effect.route, served.arm, served.model, served.model_version,
                                   effect.reward)
        alarms = tracker.update()
        if alarms:
            self._spawn(self._alarms(alarms))
        now = self._clock()
        if len(self.episodes.book) and now - self._swept_at >= SWEEP_INTERVAL_S:
            self._swept_at = now
            self._spawn(self._sweep())
        book = self.episodes.book
        self._metrics.quality_drift.update(tracker.states(lambda key: book.get(episode_key(key)) is not None))
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        """Cancel claims and sweeps in flight (their alerts are not sent)."""
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _alarms(self, alarms: list[SeriesAlarm]) -> None:
        for item in alarms:
            key, alarm = item.key, item.alarm
            details = self._details(item)
            alert = await self.episodes.alarm(episode_key(key), {"value": alarm.error_rate_since_change,
                                                                  "threshold": alarm.p1}, details)
            if alert is None:
                continue
            log.warning("quality drift: route %s %s %s (%s v%s) %s rose from %.4f to %.4f since outcome %d "
                        "(CUSUM %.2f > %.2f); one alert until %.0fs pass without an alarm", key.route, key.role,
                        key.arm, key.model, key.version, key.signal, alarm.p0, alarm.error_rate_since_change,
                        alarm.change_index, alarm.statistic, alarm.threshold, self.episodes.book.quiet_s)
            if key.role != "shadow":
                self.pending_alarms[key.route] += 1
            self._ready.append(_alert(alert))

    async def _sweep(self) -> None:
        for alert in await self.episodes.sweep():
            log.info("quality drift resolved: route %s arm %s (%s v%s) %s after %d alarm(s)", alert["route"],
                     alert["arm"], alert["details"]["model"], alert["model_version"], alert["metric"],
                     alert["details"]["alarms"])
            self._ready.append(_alert(alert))

    def _details(self, item: SeriesAlarm) -> JSONObject:
        key, alarm = item.key, item.alarm
        return {
            "role": key.role, "signal": key.signal, "statistic": alarm.statistic,
            "cusum_threshold": alarm.threshold, "p0": alarm.p0, "p1": alarm.p1,
            "change_outcome": alarm.change_index, "alarm_outcome": alarm.index,
            "arl0": self.tracker.arl0, "reference_outcomes": self.tracker.reference_outcomes,
            "test": "Bernoulli CUSUM of the error rate p0 -> p1 on joined outcomes, threshold calibrated to arl0",
        }


def _alert(alert: Mapping[str, JSONValue]) -> Alert:
    return Alert(kind=alert["kind"], route=alert["route"], arm=alert["arm"], model_version=alert["model_version"],
                 metric=alert["metric"], value=alert["value"], threshold=alert["threshold"], ts=alert["ts"],
                 details=alert["details"], state=alert["state"])


__all__ = ["QualityDriftWatch", "ThresholdCache"]
