"""Input and prediction-score drift, watched where the rows are: in the gateway's batches.

For every model version that has a `reference.json` (built by `banditgate profile`), a feature
monitor and a score monitor (banditgate.drift) are updated with each served batch, off the event
loop (in the default thread pool, never the inference pool) and in order per model. Alarms update
gauges and counters; alarm *episodes* become `alerts` events (kind `drift`): one `firing` alert
when an episode opens, one `resolved` alert after `drift.episode_quiet_s` without an alarm, and
across replicas an episode is opened once (a claim in Redis; banditgate.drift.episodes,
banditgate.episode_store). Shipping the inputs to the feedback worker instead would double the
Kafka volume for nothing: the statistics are mergeable per replica and each replica sees a
sample of the same traffic.

A model's monitors are built when it is loaded, off the event loop; readiness never waits for
them. Thresholds stored in its reference.json under the matching calibration key (written by
`banditgate profile`) are used as they are, so the monitors are ready within milliseconds. A key
that is not stored (an old reference.json, another `drift.arl0`) is calibrated by simulation,
seconds per key, once per key per process, in one dedicated thread (so at most one simulation
competes with serving for the CPU and the GIL); batches served before the monitors are ready are
not watched.

Under overload the watch skips whole batches rather than delay serving (counted in
`banditgate_drift_batches_skipped_total`); the monitors' false-alarm rate is per observation, so
skipping keeps it calibrated and only delays detection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from banditgate.drift.episodes import EpisodeBook, EpisodeKey
from banditgate.drift.monitor import DriftAlarm, FeatureDriftMonitor, ScoreDriftMonitor, profile_keys
from banditgate.drift.reference import ProfileError, ReferenceProfile
from banditgate.episode_store import EpisodeClaims, Episodes
from banditgate.jsontypes import JSONObject
from gateway.metrics import GatewayMetrics
from gateway.models.onnx_runtime import OnnxModel

if TYPE_CHECKING:
    from redis import asyncio as aredis

log = logging.getLogger("banditgate.drift")

MAX_PENDING_BATCHES = 8
SWEEP_INTERVAL_S = 1.0
"""How often quiet episodes are looked at (a resolved alert is at most this late)."""


@dataclass
class _Watch:
    model: OnnxModel
    features: FeatureDriftMonitor | None
    score: ScoreDriftMonitor | None
    lock: asyncio.Lock
    pending: int = 0


def score_column(model: OnnxModel, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The prediction score per row: `score_output` from the model's config (positive-class column
    of a two-column output), else the first float output's last column."""
    name = model.config.score_output
    if name is None:
        name = next((n for n, a in outputs.items() if a.dtype.kind == "f"), None)
    array = outputs.get(name) if name else None
    if array is None or array.dtype.kind != "f" or array.size == 0:
        return None
    return array.reshape(array.shape[0], -1)[:, -1]


class DriftWatch:
    """arl0: `drift.arl0`. quiet_s: `drift.episode_quiet_s`. redis, prefix: where episodes are
    claimed across replicas (None: this process decides alone)."""

    def __init__(self, arl0: float, metrics: GatewayMetrics,
                 publish_alert: Callable[[JSONObject], None], enabled: bool = True, *,
                 quiet_s: float = 600.0, redis: aredis.Redis | None = None, prefix: str = "banditgate",
                 clock: Callable[[], float] = time.time) -> None:
        self.arl0 = arl0
        self.metrics = metrics
        self.publish_alert = publish_alert
        self.enabled = enabled
        self._watches: dict[tuple[str, int, int], _Watch | None] = {}
        self._open: Counter[tuple[str, str, str]] = Counter()
        self.episodes = Episodes("drift", EpisodeBook(quiet_s), EpisodeClaims(redis, prefix, "drift") if redis else None,
                                 clock=clock, on_change=self._episode_changed)
        # simulations only: one at a time, never in the default pool (Kafka's DNS lookups and
        # to_thread calls must not wait behind seconds of numpy)
        self._calibration = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-calibration")

    def _watch_for(self, model: OnnxModel) -> _Watch | None:
        """The model's monitors once built; the first call starts building them off the event loop
        (threshold calibration takes a while) and returns None until they are ready."""
        key = (model.name, model.version, model.mtime_ns)
        if key in self._watches:
            return self._watches[key]
        self._watches[key] = None  # building (or no reference): batches until then are not watched
        asyncio.get_running_loop().create_task(self._build(key, model))
        return None

    def prepare(self, model: OnnxModel) -> None:
        """Start building a loaded model's monitors now, before its first batch."""
        if self.enabled:
            self._watch_for(model)

    async def _build(self, key: tuple[str, int, int], model: OnnxModel) -> None:
        # never the inference pool: calibration takes seconds and must never hold up inference
        # batches (they would time out behind it). Reading the profile is quick (default pool);
        # only a profile that lacks some thresholds goes to the calibration thread.
        started = time.monotonic()
        profile = await asyncio.to_thread(self._load_profile, model)
        if profile is None:
            return
        missing = len(profile_keys(profile, self.arl0).keys() - profile.thresholds.keys())
        if missing:
            log.info("drift monitors for %s: %d threshold(s) not stored in reference.json for ARL0 %g (run "
                     "`banditgate profile` to store them); calibrating in the background", model.key, missing,
                     self.arl0)
            watch = await asyncio.get_running_loop().run_in_executor(self._calibration, self._monitors, model, profile)
        else:
            watch = await asyncio.to_thread(self._monitors, model, profile)
        if key not in self._watches:
            return  # the version was unloaded while its monitors were being built
        if watch is not None:
            log.info("drift monitors for %s ready after %.2fs: %d features%s (ARL0 %.0f, %s)", model.key,
                     time.monotonic() - started, len(profile.features), " + prediction score" if watch.score else "",
                     self.arl0, f"{missing} threshold(s) calibrated" if missing else "thresholds from reference.json")
            self._watches[key] = watch
            self._export(watch)  # the series exist (statistic 0, threshold) from the moment it watches
            for monitor in (watch.features, watch.score):
                for name in (monitor.feature_names if monitor is not None else ()):
                    self.metrics.drift_alarms.labels(model.name, str(model.version), name)

    def _load_profile(self, model: OnnxModel) -> ReferenceProfile | None:
        """The model's reference.json, None if it has none or it is unusable (blocking: a thread)."""
        path = model.path.parent / "reference.json"
        parents = model.path.parents  # <repository>/<model>/<version>/model.onnx
        repository = (parents[2] if len(parents) > 2 else model.path.parent).resolve()
        if not path.exists():
            return None
        if not path.resolve().is_relative_to(repository):
            log.error("%s: is a link outside the repository %s; drift not monitored for %s", path, repository,
                      model.key)
            return None
        try:
            return ReferenceProfile.load(path)
        except (ProfileError, OSError) as exc:
            log.error("%s: drift reference unusable, drift not monitored for %s: %s", path, model.key, exc)
            return None

    def _monitors(self, model: OnnxModel, profile: ReferenceProfile) -> _Watch | None:
        """Build the monitors, calibrating any threshold the profile does not store (blocking)."""
        try:
            features = FeatureDriftMonitor(profile, family_arl0=self.arl0) if profile.features else None
            score = ScoreDriftMonitor(profile, arl0=self.arl0) if profile.score is not None else None
        except (ProfileError, ValueError) as exc:
            log.error("drift reference of %s unusable, drift not monitored: %s", model.key, exc)
            return None
        return _Watch(model, features, score, asyncio.Lock())

    def forget(self, model: OnnxModel) -> None:
        """Drop an unloaded model version's monitors and their series (statistic, threshold, alarms)."""
        for key in [k for k in self._watches if k[:2] == (model.name, model.version)]:
            watch = self._watches.pop(key)
            for monitor in (watch.features, watch.score) if watch is not None else ():
                for name in (monitor.feature_names if monitor is not None else ()):
                    for metric in (self.metrics.drift_statistic, self.metrics.drift_threshold,
                                   self.metrics.drift_alarms):
                        with contextlib.suppress(KeyError):
                            metric.remove(model.name, str(model.version), name)

    def observe(self, model: OnnxModel, route: str, arm: str, feeds: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray]) -> None:
        """Queue one served batch for the model's monitors (never blocks; may skip under load)."""
        if not self.enabled:
            return
        watch = self._watch_for(model)
        if watch is None:
            return
        if watch.pending >= MAX_PENDING_BATCHES:
            self.metrics.drift_skipped.labels(model.name, str(model.version)).inc()
            return
        rows = next(iter(feeds.values())) if len(feeds) == 1 else None
        if rows is not None and rows.ndim != 2:
            rows = None
        scores = score_column(model, outputs)
        watch.pending += 1
        asyncio.get_running_loop().create_task(self._update(watch, route, arm, rows, scores))

    async def _update(self, watch: _Watch, route: str, arm: str, rows: np.ndarray | None,
                      scores: np.ndarray | None) -> None:
        try:
            async with watch.lock:  # one update at a time per model: the monitors are sequential
                loop = asyncio.get_running_loop()
                alarms = await loop.run_in_executor(None, self._apply, watch, rows, scores)
        except Exception as exc:  # noqa: BLE001 - drift must never break serving; say so once per batch
            log.error("drift update for %s failed: %s", watch.model.key, exc)
            return
        finally:
            watch.pending -= 1
        self._export(watch)
        model = watch.model
        for metric, alarm in alarms:
            self.metrics.drift_alarms.labels(model.name, str(model.version), alarm.feature).inc()
            key = EpisodeKey(route, arm, model.name, model.version, metric,
                             alarm.feature if metric == "feature_drift" else None)
            values = {"value": alarm.statistic, "threshold": alarm.threshold, "psi": alarm.effect_size_psi,
                      "js": alarm.effect_size_js}
            alert = await self.episodes.alarm(key, values, {"index": alarm.index, "psi": alarm.effect_size_psi,
                                                            "js": alarm.effect_size_js})
            if alert is None:
                log.debug("drift alarm in an open episode: model %s feature %s statistic %.2f > threshold %.2f",
                          model.key, alarm.feature, alarm.statistic, alarm.threshold)
                continue
            log.warning("drift episode opened: model %s feature %s statistic %.2f > threshold %.2f (PSI %.3f); "
                        "further alarms are counted, not alerted, until %.0fs pass without one", model.key,
                        alarm.feature, alarm.statistic, alarm.threshold, alarm.effect_size_psi,
                        self.episodes.book.quiet_s)
            self.publish_alert(alert)

    async def run(self, stopping: asyncio.Event) -> None:
        """Close quiet episodes (their `resolved` alerts) every SWEEP_INTERVAL_S until `stopping`."""
        try:
            while not stopping.is_set():
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=SWEEP_INTERVAL_S)
                except TimeoutError:
                    pass
                for alert in await self.episodes.sweep():
                    details = alert["details"]
                    log.info("drift episode resolved: model %s v%s %s %s after %d alarm(s), quiet for %.0fs",
                             details["model"], alert["model_version"], alert["metric"], details["feature"] or "",
                             details["alarms"], details["quiet_s"])
                    self.publish_alert(alert)
        finally:
            self._calibration.shutdown(wait=False, cancel_futures=True)

    def _episode_changed(self, key: EpisodeKey, opened: bool) -> None:
        labels = (key.model, str(key.version), key.feature if key.feature is not None else "score")
        self._open[labels] += 1 if opened else -1
        if self._open[labels] <= 0:
            del self._open[labels]
        self.metrics.drift_episodes_open.labels(*labels).set(self._open.get(labels, 0))

    @staticmethod
    def _apply(watch: _Watch, rows: np.ndarray | None, scores: np.ndarray | None) -> list[tuple[str, DriftAlarm]]:
        alarms: list[tuple[str, DriftAlarm]] = []
        if watch.features is not None and rows is not None and rows.shape[1] == len(watch.features.feature_names):
            alarms += [("feature_drift", a) for a in watch.features.update(rows)]
        if watch.score is not None and scores is not None:
            alarms += [("score_drift", a) for a in watch.score.update(scores)]
        return alarms

    def _export(self, watch: _Watch) -> None:
        model, version = watch.model.name, str(watch.model.version)
        for monitor in (watch.features, watch.score):
            if monitor is None:
                continue
            for name, statistic, threshold in zip(monitor.feature_names, monitor.statistic, monitor.threshold):
                self.metrics.drift_statistic.labels(model, version, name).set(float(statistic))
                self.metrics.drift_threshold.labels(model, version, name).set(float(threshold))
