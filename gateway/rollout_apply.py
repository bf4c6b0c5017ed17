"""Gateways apply rollouts: the stored rollout record of each route becomes its arms, caps, floors,
shadows and drains; a new version folder in the model repository starts a rollout.

Every `snapshot_refresh_ms` (the arm-statistics refresh interval) each gateway reads the records
of its rollout routes in one round trip and, when a record's seq changed, loads the candidate's
model version (in a thread), then swaps the route's arm list and its policy's arms in one
synchronous step (router.decision.RoutePolicy.reconfigure), so a batch is routed wholly on the
old or the new lineup. Models a rollout retired (a rejected candidate, the replaced version after
its grace period) are unloaded when no route uses them any more. So every replica applies a
routing change within one refresh. When Redis is away the routes keep their last lineup.

The gateway also measures what the canary's latency criterion needs: rows served by a
candidate's model version, per latency bucket (queue wait + inference of their batch), added to
the store every second under the stage's seq (router.rollout_store); and it counts its drift
alarms of routes with ``retrain.drift`` there, for the feedback worker's retraining triggers.

Starting: every `models.poll_interval_s` the highest version folder of each rollout route's model
is offered to RolloutStore.begin (one Redis read when nothing starts), which starts it once
across replicas (compare-and-set) if no rollout is active and it is newer than the one serving
and than any rejected before. A version that appears during another rollout starts when that
one ends.

Admission: on a route with ``rollout.admission`` a new version starts at the ``admission``
stage (the route serves as before); at every refresh each gateway hands such a record to its
:class:`gateway.admission.AdmissionRunner`, whose lease in Redis lets one replica benchmark the
version (a child process, bounded in time) and write the verdict - on to ``shadow``, or
``refused`` - with its figures into the record. Every replica exports the stored figures of its
routes' rollouts as the ``banditgate_admission_*`` gauges (route, model, version).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from banditgate.config import Arm, Config, Route
from banditgate.jsontypes import JSONObject
from gateway.admission import AdmissionRunner
from gateway.dataplane import Dataplane
from gateway.errors import ModelError, ModelNotFound
from gateway.metrics import GatewayMetrics
from gateway.models.repository import ModelRepository
from router.lineup import Lineup, LineupArm, RolloutRecord, lineup
from router.rollout import RolloutError
from router.rollout_store import RolloutStore, latency_bucket

if TYPE_CHECKING:
    from gateway.models.onnx_runtime import OnnxModel

log = logging.getLogger("banditgate.rollout")

LATENCY_FLUSH_S = 1.0
LOAD_RETRY_S = 10.0
"""A lineup whose model version failed to load is tried again this often (said once per lineup)."""


def _arm(arm: LineupArm) -> Arm:
    return Arm(name=arm.name, model=arm.model, version=arm.version, weight=arm.weight,
               max_share=arm.cap if arm.cap < 1.0 else None)


class RolloutApplier:
    """Keeps this gateway's rollout routes on their stored lineup (see the module docstring)."""

    def __init__(self, config: Config, dataplane: Dataplane, repository: ModelRepository, store: RolloutStore,
                 clock: Callable[[], float] = time.time, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.dataplane = dataplane
        self.repository = repository
        self.store = store
        self.clock = clock
        self.routes: dict[str, Route] = {route.name: route for route in config.routes
                                         if route.rollout is not None and route.rollout.enabled
                                         and route.name in dataplane.routes}
        self.applied: dict[str, tuple[int, str] | None] = {}
        self.records: dict[str, RolloutRecord | None] = {}
        self._lineups: dict[str, Lineup] = {name: lineup(route, None) for name, route in self.routes.items()}
        self._latency_targets: dict[tuple[str, int], tuple[str, int]] = {}
        self._latency: dict[tuple[str, int], Counter[int]] = {}
        self._load_failed: dict[str, tuple[object, float]] = {}
        self.alarm_routes = {route.name for route in config.routes if route.retrain is not None and route.retrain.drift}
        self._alarms: dict[str, Counter[str]] = {}
        self.metrics = metrics
        """GatewayMetrics: the admission figures of the stored records are exported there."""
        self.admission = AdmissionRunner(config, repository, store, self.routes, clock, metrics)
        self._exported_admission: dict[str, tuple[int, int]] = {}

    # -- applying --------------------------------------------------------------------------------

    async def refresh_once(self) -> bool:
        """Read every rollout route's record and apply the changed ones; False when Redis failed."""
        if not self.routes:
            return True
        try:
            records = await self.store.read_many(self.routes)
        except RolloutError as exc:
            log.error("rollout records unreadable: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - Redis away: keep the last lineup (the refresher says so)
            log.debug("rollout records not refreshed: %s", exc)
            return False
        for name, record in records.items():
            self.admission.consider(name, record)  # cheap unless it waits at the admission gate
            key = None if record is None else (record.state.seq, record.state.stage)
            if key == self.applied.get(name):
                continue
            failed = self._load_failed.get(name)
            if failed is not None and failed[0] == key and time.monotonic() - failed[1] < LOAD_RETRY_S:
                continue
            await self.apply(name, record)
        return True

    async def apply(self, name: str, record: RolloutRecord | None) -> bool:
        """Make route `name` serve `record`'s lineup; returns whether it was applied (a model that
        fails to load leaves the previous lineup in place; it is tried again next refresh)."""
        route = self.routes[name]
        wanted = lineup(route, record)
        for model, version in sorted(wanted.models(), key=str):
            if version == "latest":
                continue
            try:
                await asyncio.to_thread(self.repository.ensure, model, int(version))
            except (ModelError, ModelNotFound) as exc:
                key = None if record is None else (record.state.seq, record.state.stage)
                if self._load_failed.get(name, (object(),))[0] != key:
                    log.error("route %s: rollout lineup not applied (the previous one keeps serving; tried again "
                              "every %.0f s), model %s version %s does not load: %s", name, LOAD_RETRY_S, model,
                              version, exc)
                self._load_failed[name] = (key, time.monotonic())
                return False
        runtime = self.dataplane.routes[name]
        arms = [_arm(arm) for arm in wanted.arms]
        shadows = [_arm(arm) for arm in wanted.shadows]
        try:
            runtime.policy.reconfigure([a.name for a in wanted.arms], [a.cap for a in wanted.arms],
                                       [a.weight for a in wanted.arms], [a.floor for a in wanted.arms],
                                       [s.name for s in wanted.shadows], wanted.held_drained)
        except ValueError as exc:
            key = None if record is None else (record.state.seq, record.state.stage)
            if self._load_failed.get(name, (object(),))[0] != key:
                log.error("route %s: rollout lineup not applied (the previous one keeps serving): %s", name, exc)
            self._load_failed[name] = (key, time.monotonic())
            return False
        # no await since reconfigure: the dataplane sees the new arms with the new policy
        runtime.route = runtime.route.model_copy(update={"arms": arms, "shadows": shadows})
        previous = self._lineups.get(name)
        self._lineups[name] = wanted
        self.records[name] = record
        self._load_failed.pop(name, None)
        self.applied[name] = None if record is None else (record.state.seq, record.state.stage)
        self._track_latency(name, record)
        self._export_admission(name, record)
        if record is not None:
            state = record.state
            log.info("routing change applied: route %s rollout of %s at %s (seq %d%s): arms %s; shadows %s%s",
                     name, state.candidate_arm, state.stage, state.seq, ", paused" if state.paused else "",
                     ", ".join(f"{a.name}={a.model}:{a.version}" + (f" cap {a.cap:g}" if a.cap < 1 else "")
                               + (f" floor {a.floor:g}" if a.floor > 0 else "") for a in wanted.arms),
                     ", ".join(s.name for s in wanted.shadows) or "none",
                     f"; held drained {', '.join(wanted.held_drained)}" if wanted.held_drained else "")
        self._unload_retired(previous, wanted)
        return True

    def _unload_retired(self, previous: Lineup | None, current: Lineup) -> None:
        in_use: set[tuple[str, int | str]] = set()
        for other in self._lineups.values():
            in_use |= other.models()
        for runtime in self.dataplane.routes.values():
            if runtime.route.name not in self.routes:
                in_use |= {(a.model, a.version) for a in (*runtime.route.arms, *runtime.route.shadows)}
        dropped = set(current.retired)
        if previous is not None:
            dropped |= {(m, v) for m, v in previous.models() if isinstance(v, int)}
        released = False
        for model, version in sorted(dropped):
            if (model, version) not in in_use:
                released |= self.repository.release(model, version)
        if released:
            # its batcher goes when its last rows are done (it stayed forever when busy here)
            self.dataplane.collect_retired()

    def _export_admission(self, name: str, record: RolloutRecord | None) -> None:
        """The stored admission figures of the route's current rollout as gauges (once per verdict)."""
        if self.metrics is None or record is None or record.admission is None:
            return
        marker = (record.state.version, record.state.seq)
        if self._exported_admission.get(name) == marker:
            return
        self._exported_admission[name] = marker
        base = next((arm for arm in record.base if arm.name == record.state.replaces), None)
        self.metrics.export_admission(name, record.state.model, record.state.version,
                                      base.model if base is not None else record.state.model,
                                      base.version if base is not None else "", record.admission)

    # -- latency of candidates -------------------------------------------------------------------

    def _track_latency(self, name: str, record: RolloutRecord | None) -> None:
        self._latency_targets = {key: target for key, target in self._latency_targets.items() if target[0] != name}
        if record is not None and record.state.stage in ("canary", "full"):
            self._latency_targets[(record.state.model, record.state.version)] = (name, record.state.seq)

    def observe_batch(self, model: OnnxModel, rows: int, queue_s: float, inference_s: float) -> None:
        """Count a served batch of a candidate's model version (called per batch; cheap otherwise)."""
        target = self._latency_targets.get((model.name, model.version))
        if target is not None:
            counts = self._latency.get(target)
            if counts is None:
                counts = self._latency[target] = Counter()
            counts[latency_bucket((queue_s + inference_s) * 1000.0)] += rows

    def note_alarm(self, alert: JSONObject) -> None:
        """Count a drift alarm of a route whose retraining triggers listen for it (the feedback
        worker evaluates the triggers; it does not read the alerts topic)."""
        route = alert.get("route")
        # a drift episode's `firing` alert counts; its `resolved` alert is no alarm
        if alert.get("kind") == "drift" and alert.get("state") != "resolved" and route in self.alarm_routes:
            self._alarms.setdefault(str(route), Counter())["drift"] += 1

    async def flush_latency(self) -> None:
        alarms, self._alarms = self._alarms, {}
        for route, counts in alarms.items():
            try:
                await self.store.add_alarms(route, counts)
            except Exception as exc:  # noqa: BLE001 - Redis away: counted again next flush
                log.debug("drift alarms not recorded yet: %s", exc)
                self._alarms.setdefault(route, Counter()).update(counts)
        pending, self._latency = self._latency, {}
        for (route, seq), buckets in pending.items():
            try:
                await self.store.add_latency(route, seq, buckets)
            except Exception as exc:  # noqa: BLE001 - Redis away: keep them for the next flush
                log.debug("candidate latency not recorded yet: %s", exc)
                for bucket, rows in buckets.items():
                    self._latency.setdefault((route, seq), Counter())[bucket] += rows

    # -- new versions ----------------------------------------------------------------------------

    async def offer_new_versions(self) -> list[RolloutRecord]:
        """Start a rollout for each route whose model has a newer version folder (once across replicas)."""
        started = []
        for name, route in self.routes.items():
            model = route.rollout_model()
            if model is None:
                continue
            try:
                versions = await asyncio.to_thread(self.repository.available_versions, model)
            except (ModelError, ModelNotFound):
                continue
            if not versions:
                continue
            try:
                record = await self.store.begin(route, versions[-1], self.clock())
            except RolloutError as exc:
                log.error("route %s: %s", name, exc)
                record = None
            except Exception as exc:  # noqa: BLE001 - Redis away: offered again next time
                log.debug("new version not offered yet: %s", exc)
                continue
            if record is not None:
                log.info("rollout started: route %s, %s version %d enters %s as %s (seq %d)", name, model,
                         record.state.version, record.state.stage, record.state.candidate_arm, record.state.seq)
                started.append(record)
                await self.apply(name, record)
                self.admission.consider(name, record)
        return started

    async def run(self, stopping: asyncio.Event) -> None:
        """Refresh every snapshot interval, flush latency every second, look for versions every poll."""
        refresh_s = self.config.redis.snapshot_refresh_ms / 1000.0
        poll_s = self.config.models.poll_interval_s
        last_flush = last_poll = time.monotonic()
        try:
            await self._loop(stopping, refresh_s, poll_s, last_flush, last_poll)
        finally:
            await self.admission.close()  # a running benchmark's child process is killed

    async def _loop(self, stopping: asyncio.Event, refresh_s: float, poll_s: float, last_flush: float,
                    last_poll: float) -> None:
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=refresh_s)
                return
            except TimeoutError:
                pass
            try:
                await self.refresh_once()
                now = time.monotonic()
                if now - last_flush >= LATENCY_FLUSH_S:
                    last_flush = now
                    await self.flush_latency()
                if poll_s > 0 and now - last_poll >= poll_s:
                    last_poll = now
                    await self.offer_new_versions()
            except Exception as exc:  # noqa: BLE001 - never let the applier die; say why
                log.warning("rollout applier: %s: %s", type(exc).__name__, exc)
