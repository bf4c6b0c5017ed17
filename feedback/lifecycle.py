"""The feedback worker drives the model lifecycle: rollout transitions and retraining triggers.

Every second (a faust timer, on every worker; the store makes each effect happen once):

* **rollouts** - for each route with ``rollout:`` and an active rollout (one at the
  ``admission`` stage only waits: a gateway's benchmark decides it), gather the evidence
  (:func:`gather_evidence`), call :func:`router.rollout.step`, and write the transition with a
  compare-and-set on the state's seq; the audit event (routing-changes topic) and the
  promote/reject/rollback alert are queued in the same atomic step and published from the
  route's outbox. The evidence and what is awaited are stored for ``rollout status``.
* **retraining** - for each route with ``retrain:``, count the joined outcomes since the last
  look (the ledger's ``joined`` counter, all workers together), evaluate the triggers
  (:mod:`feedback.triggers`), and on a fire claim it by compare-and-set (``rev``), export the
  window's joined rows as Parquet (when ``export_path`` is set; in a process of its own under a
  lease, feedback.export_job), then queue the ``retrain`` alert with the manifest's path and clear
  the fire by compare-and-set on ``rev`` (so one alert, whoever finishes). A fire whose export did
  not finish (worker killed, lease lost, export failed) stays pending in the stored state and is
  finished by the next worker that holds the lease (after a failure: 60 s later, doubling to 15 min).

Alerts go to the alerts topic through the worker's KafkaOut, keyed by route (the same path as
the quality alerts, so a per-route webhook fed from that path sees them too).

Evidence, from what the stack already records:

=================  ============================================================================
shadow verdict     the shadow's paired label losses in the feedback ledger (``fb:quality``),
                   judged by feedback.outcome_metrics.shadow_verdict at the rollout's shadow confidence
                   and margin
canary rewards     the candidate arm's statistics in the arm store (it has rewards only since
                   it serves); the replaced arm's statistics minus those stored when the canary
                   stage began (so: the same period; exact without discounting)
calls / errors     the gateways' per-arm call counters in the arm store
p99 latency        the gateways' latency histogram of the candidate's model for the current
                   stage (router.rollout_store); batch queue wait + inference time per row
guardrail          the candidate arm drained in the arm store (by the guardrail, or an operator)
=================  ============================================================================

Drift alarms reach the triggers through the store: gateways count their ``drift`` alerts of
routes with ``retrain.drift`` under ``P:{R}:rollout:alarms``, and the driver treats counts above
the ones it consumed last as new alarms. ``retrain.quality`` fires the same way on ``quality``
counts, but nothing adds them yet (the quality-drift watch sends its alerts to the topic only).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from banditgate import cloudevents
from banditgate.config import Config, Route
from banditgate.jsontypes import JSONObject, JSONValue
from feedback.export import ExportError
from feedback.export_job import ExportLease, LeaseLost, job_spec, run_export_job
from feedback.ledger import FeedbackKeys
from feedback.metrics import FeedbackMetrics
from feedback.outcome_metrics import shadow_verdict
from feedback.sinks import KafkaOut, Outgoing, parse_quality
from feedback.triggers import TriggerDecision, TriggerState, evaluate, retrain_alert
from router.arm_stats import ArmStats
from router.lineup import RolloutRecord, primaries_after, serving_version
from router.rollout import Evidence, status, step
from router.rollout_store import RolloutStore, latency_quantile
from router.stats_store import ArmStatsStore

if TYPE_CHECKING:
    import faust
    from redis import asyncio as aredis

    from feedback.producer import ReplaceableProducer

log = logging.getLogger("banditgate.lifecycle")

TICK_S = 1.0
EXPORT_LEASE_MS = 60_000
"""The retrain export's lease; extended every third of it while the export runs."""
EXPORT_RETRY_S = (60.0, 900.0)
"""A failed export is tried again after 60 s, doubling up to 15 min (the fire stays pending)."""


def stats_since(total: ArmStats, start: ArmStats | None) -> ArmStats:
    """The outcomes added to `total` after `start` was taken (Welford/Chan in reverse).

    Exact for undiscounted statistics; with discounting it is an approximation (the older part
    has decayed since). Returns `total` when `start` is None or empty.
    """
    if start is None or start.weight <= 0:
        return total
    weight = total.weight - start.weight
    if weight <= 1e-9:
        return ArmStats()
    mean = (total.weight * total.mean - start.weight * start.mean) / weight
    m2 = total.m2 - start.m2 - start.weight * weight / total.weight * (start.mean - mean) ** 2
    return ArmStats(weight=weight, mean=mean, m2=max(m2, 0.0))


class LifecycleDriver:
    """Rollout steps and retraining triggers for every configured route (see the module docstring)."""

    def __init__(self, config: Config,
                 redis: Any,  # Any: redis.asyncio.Redis, whose stubs type hgetall as dict[bytes | str, ...] (not per decode mode)
                 out: KafkaOut, clock: Callable[[], float] = time.time,
                 quality_alarms: collections.Counter[str] | None = None, metrics: FeedbackMetrics | None = None,
                 export_lease_ms: int = EXPORT_LEASE_MS,
                 export_observer: Callable[[JSONObject], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.export_lease_ms = export_lease_ms
        self.export_observer = export_observer
        """Awaited with every message of a running export (progress, ``commit?``): for tests and tools."""
        self._export_retry: dict[str, tuple[float, float]] = {}
        """route -> (monotonic time of the next try, the wait after it) for exports that failed."""
        self.metrics = metrics
        """FeedbackMetrics: the alerts this driver publishes are counted like the worker's others."""
        self.quality_alarms = quality_alarms
        """This worker's quality-drift alarm episodes not yet counted in the store (per route)."""
        self.redis = redis
        self.out = out
        self.clock = clock
        prefix = config.redis.key_prefix
        self.keys = FeedbackKeys(prefix)
        self.rollouts = RolloutStore(redis, prefix=prefix)
        self.arms = ArmStatsStore(redis, prefix=prefix, dedup_ttl_s=config.redis.dedup_ttl_s,
                                  half_lives={route.name: route.half_life for route in config.routes})
        self.rollout_routes = [r for r in config.routes if r.rollout is not None and r.rollout.enabled]
        self.retrain_routes = [r for r in config.routes if r.retrain is not None]
        self._retired: set[tuple[str, int]] = set()

    # -- publishing ------------------------------------------------------------------------------

    async def send_queued(self, items: list[JSONObject]) -> None:
        """Publish outbox items (audit events, alerts) through KafkaOut; raises unless all were acknowledged."""
        topics = self.config.kafka.topics
        messages: list[Outgoing] = []
        for item in items:
            value = item.get("value", {})
            route = str(value.get("route", ""))
            key, encoded = route.encode(), orjson.dumps(value)
            if item.get("topic") == "alerts":
                messages.append((topics.alerts, key, encoded))  # KafkaOut adds an alert's CloudEvents headers
                continue
            # a routing change: CloudEvents id routing-change:route/seq (the same when the outbox is
            # drained again); the trace-less record has no headers when they are off
            headers = cloudevents.headers("routing-change", cloudevents.source("feedback", route or None),
                                          f"{route}/{value.get('seq')}".encode(), None, self.config.kafka.cloudevents)
            messages.append((topics.routing_changes, key, encoded, headers) if headers else
                            (topics.routing_changes, key, encoded))
        await self.out.send_all(messages)
        if self.metrics is not None:
            for item in items:
                value = item.get("value", {})
                if item.get("topic") == "alerts" and value.get("kind"):
                    self.metrics.alerts.labels(str(value.get("route", "")), str(value["kind"])).inc()

    async def publish_pending(self) -> int:
        """Publish every route's queued audit events and alerts; returns how many were sent."""
        sent = 0
        for route in {r.name for r in (*self.rollout_routes, *self.retrain_routes)}:
            sent += await self.rollouts.drain_outbox(route, self.send_queued)
        return sent

    # -- rollouts --------------------------------------------------------------------------------

    async def gather_evidence(self, route: Route, record: RolloutRecord) -> Evidence:
        """What the stack knows about the candidate now (see the module docstring)."""
        state, rollout = record.state, route.rollout
        assert rollout is not None  # noqa: S101 - only rollout routes get here
        if state.stage == "admission":
            return Evidence()  # a gateway's benchmark decides this stage (gateway/admission.py), not evidence
        if state.stage == "shadow":
            raw = await self.redis.hgetall(self.keys.quality(route.name))
            stats = parse_quality(raw).get(("shadow", state.candidate_arm, state.model, str(state.version)))
            if stats is None:
                return Evidence()
            verdict = shadow_verdict(stats, rollout.shadow.confidence, rollout.shadow.margin)
            return Evidence(shadow_decision=verdict.decision, shadow_pairs=verdict.n,
                            shadow_advantage=verdict.advantage)
        snapshot = await self.arms.snapshot(route.name)
        candidate = snapshot.arm(state.candidate_arm)
        baseline = stats_since(snapshot.arm(state.replaces).stats, record.baseline)
        histogram = await self.rollouts.latency(route.name, state.seq)
        breach = None
        if candidate.state == "drained":
            marker = await self.redis.exists(self.arms.stats_key(route.name).removesuffix(":arms")
                                              + f":guardrail:{state.candidate_arm}")
            breach = "reward or error rate (guardrail drained it)" if marker else "drained by an operator"
        return Evidence(candidate=candidate.stats, baseline=baseline, calls=candidate.calls, errors=candidate.errors,
                        p99_latency_ms=latency_quantile(histogram, 0.99), guardrail_breach=breach)

    async def step_rollout(self, route: Route) -> bool:
        """One evaluation of the route's rollout; returns whether this call applied a transition."""
        record = await self.rollouts.read(route.name)
        if record is None:
            return False
        if not record.state.active:
            await self._retire(route, record)
            return False
        assert route.rollout is not None  # noqa: S101
        evidence = await self.gather_evidence(route, record)
        now = self.clock()
        await self.rollouts.set_status(route.name, {**status(record.state, evidence, route.rollout, now),
                                                    "ts": now})
        transition = step(record.state, evidence, route.rollout, now)
        if transition is None:
            return False
        baseline = None
        if transition.state.stage == "canary":
            # the replaced arm's statistics now: the canary is compared with what it gets from here on
            baseline = (await self.arms.snapshot(route.name)).arm(record.state.replaces).stats
            if baseline.weight <= 0:
                baseline = ArmStats(weight=1e-12)
        applied = await self.rollouts.apply(record, transition, baseline)
        if applied:
            level = logging.WARNING if transition.state.stage in ("rejected", "rolled_back") else logging.INFO
            log.log(level, "routing change: %s", transition.audit.log_line())
        return applied

    async def _retire(self, route: Route, record: RolloutRecord) -> None:
        """Mark the arm a finished rollout took out of the route drained in the arm store (the
        candidate after a reject or rollback, the replaced arm after done), once per rollout, so
        the guardrail, which tests every arm with statistics, never compares against an arm that
        no longer serves (nor drains a serving one in its favour)."""
        state = record.state
        marker = (route.name, state.seq)
        if marker in self._retired or state.stage not in ("done", "rejected", "rolled_back"):
            return
        arm = state.replaces if state.stage == "done" else state.candidate_arm
        snapshot = await self.arms.snapshot(route.name)
        if arm in snapshot.arms and snapshot.arms[arm].state != "drained":
            await self.arms.set_arm_state(route.name, arm, "drained")
            log.info("route %s: arm %s left the route with the rollout of %s (%s); its statistics are kept, "
                     "marked drained", route.name, arm, state.candidate_arm, state.stage)
        self._retired.add(marker)

    async def tick_rollouts(self) -> None:
        for route in self.rollout_routes:
            try:
                await self.step_rollout(route)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one route's problem never stops the others
                log.warning("rollout of route %s not evaluated: %s: %s", route.name, type(exc).__name__, exc)
        try:
            await self.publish_pending()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - queued: published on a later tick
            log.warning("routing-change events not published yet: %s: %s", type(exc).__name__, exc)

    # -- retraining ------------------------------------------------------------------------------

    def retrain_key(self, route: str) -> str:
        return f"{self.config.redis.key_prefix}:{{{route}}}:retrain"

    async def _joined(self, route: str) -> int:
        value = await self.redis.hget(self.keys.counts(route), "joined")
        return int(float(value)) if value is not None else 0

    @staticmethod
    def _fields(state: TriggerState, joined_seen: int, rev: int, pending: Mapping[str, JSONValue] | None,
                alarms_seen: Mapping[str, int] | None = None) -> dict[str, str]:
        fields = {key: "" if value is None else str(value) for key, value in state.to_dict().items()}
        fields.update(joined_seen=str(joined_seen), rev=str(rev))
        for kind, count in (alarms_seen or {}).items():
            fields[f"alarms_seen_{kind}"] = str(count)
        if pending is not None:
            fields["pending"] = orjson.dumps(dict(pending)).decode()
        return fields

    async def step_retrain(self, route: Route) -> TriggerDecision | None:
        """One evaluation of the route's triggers; returns the decision when this call fired."""
        config = route.retrain
        assert config is not None  # noqa: S101 - only retrain routes get here
        key, outbox = self.retrain_key(route.name), self.rollouts.key(route.name, "outbox")
        raw = {_text(k): _text(v) for k, v in (await self.redis.hgetall(key)).items()}
        joined = await self._joined(route.name)
        now = self.clock()
        counted = await self.rollouts.alarms(route.name)
        if not raw:
            # the first window starts now: outcomes joined before the triggers were on are not in
            # one, and alarms raised before are not new
            fields = self._fields(TriggerState(window_start=now), joined, 0, None, counted)
            await self.rollouts.compare_and_set_hash(key, outbox, "rev", None, fields)
            return None
        state, rev, seen = TriggerState.from_dict(raw), int(raw.get("rev", 0)), int(raw.get("joined_seen", 0))
        if raw.get("pending"):
            await self._finish(route, raw)
            return None
        delta = max(0, joined - seen)
        current = state.with_labels(delta, now) if delta else state
        alarms = tuple(kind for kind, count in sorted(counted.items())
                       if count > int(raw.get(f"alarms_seen_{kind}", 0) or 0))
        decision = evaluate(current, config, now, alarms)
        if not decision.fired and not delta and not alarms and decision.state == state:
            return None
        window = decision.window if decision.fired else None
        pending = None
        if window is not None:
            pending = {"window": list(window), "reasons": list(decision.reasons), "labels": decision.labels,
                       "fired_at": now}
        written = await self.rollouts.compare_and_set_hash(key, outbox, "rev", rev,
                                                           self._fields(decision.state, joined, rev + 1, pending,
                                                                        counted))
        if not written or window is None:  # no window: nothing fired (pending is None)
            return None
        log.warning("retrain trigger: route %s, %s, window [%.3f, %.3f], %d labels", route.name,
                    ", ".join(decision.reasons), window[0], window[1], decision.labels)
        raw = {_text(k): _text(v) for k, v in (await self.redis.hgetall(key)).items()}
        await self._finish(route, raw)
        return decision

    async def _finish(self, route: Route, raw: Mapping[str, str]) -> None:
        """Export the pending fire's window and queue its alert, under a lease (one worker at a time:
        the export runs in a process of its own while the lease is extended; see feedback.export_job)."""
        config = route.retrain
        assert config is not None  # noqa: S101 - only retrain routes get here
        key = self.retrain_key(route.name)
        retry = self._export_retry.get(route.name)
        if config.export_path and retry is not None and time.monotonic() < retry[0]:
            return
        lease = ExportLease(self.redis, key + ":lease", self.export_lease_ms)
        if not await lease.acquire():
            return
        try:
            pending = orjson.loads(raw["pending"])
            window = (float(pending["window"][0]), float(pending["window"][1]))
            decision = TriggerDecision(TriggerState.from_dict(raw), True, tuple(pending["reasons"]), window,
                                       int(pending["labels"]))
            manifest_path = None
            if config.export_path:
                manifest_path = await self._export(route, window, config.export_path, ",".join(decision.reasons),
                                                   lease)
                if manifest_path is None:
                    return
            model, version = await self._serving(route)
            alert = retrain_alert(decision, route.name, model, version, config, manifest_path)
            fields = dict(raw)
            fields.pop("pending", None)
            rev = int(raw.get("rev", 0))
            fields["rev"] = str(rev + 1)
            written = await self.rollouts.compare_and_set_hash(
                key, self.rollouts.key(route.name, "outbox"), "rev", rev, fields,
                [{"topic": "alerts", "value": alert.to_dict()}])
            if written:
                log.warning("retrain alert queued: route %s model %s version %s, window [%.3f, %.3f], %d labels%s",
                            route.name, model, version, window[0], window[1], decision.labels,
                            f", export {manifest_path}" if manifest_path else "")
        finally:
            await lease.release()

    async def _export(self, route: Route, window: tuple[float, float], destination: str, reason: str,
                      lease: ExportLease) -> str | None:
        """The window's export in its own process; its manifest's path, or None when it failed or the
        lease was lost (one log line either way; a failure is tried again after a backoff)."""
        spec = job_spec(self.config, route.name, window, destination, reason)
        try:
            done = await run_export_job(spec, lease, on_event=self.export_observer)
        except LeaseLost as exc:
            log.warning("retrain export of route %s stopped: %s", route.name, exc)
            return None
        except ExportError as exc:
            wait_s = self._export_retry.get(route.name, (0.0, EXPORT_RETRY_S[0]))[1]
            self._export_retry[route.name] = (time.monotonic() + wait_s, min(2 * wait_s, EXPORT_RETRY_S[1]))
            log.warning("retrain export of route %s failed (next try in %.0f s): %s", route.name, wait_s, exc)
            return None
        self._export_retry.pop(route.name, None)
        log.info("retrain export of route %s: %s rows, %s bytes in %s file(s), export process peak RSS %s MB",
                 route.name, done.get("rows"), done.get("bytes"), done.get("files"), done.get("max_rss_mb"))
        return str(done["manifest"])

    async def _serving(self, route: Route) -> tuple[str, int | None]:
        model = route.rollout_model() or route.arms[0].model
        record = await self.rollouts.read(route.name) if route.rollout is not None else None
        if record is not None:
            primaries = primaries_after(record)
            arm = next((a for a in primaries if a.model == model), None)
            return model, (serving_version(primaries, arm.name) if arm is not None else None)
        arm_config = next((a for a in route.arms if a.model == model), route.arms[0])
        return model, arm_config.version if isinstance(arm_config.version, int) else None

    async def count_quality_alarms(self) -> None:
        """Add this worker's new quality-drift alarms to the routes' alarm counts in the store, where
        every worker's `quality` trigger reads them (a count is taken off only once it is stored)."""
        if not self.quality_alarms:
            return
        for route, count in list(self.quality_alarms.items()):
            if count > 0:
                await self.rollouts.add_alarms(route, {"quality": count})
                self.quality_alarms[route] -= count
            if self.quality_alarms[route] <= 0:
                del self.quality_alarms[route]

    async def tick_retrain(self) -> None:
        try:
            await self.count_quality_alarms()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: the counts wait for the next tick
            log.warning("quality alarms not counted for retraining yet: %s: %s", type(exc).__name__, exc)
        for route in self.retrain_routes:
            try:
                await self.step_retrain(route)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one route's problem never stops the others
                log.warning("retrain triggers of route %s not evaluated: %s: %s", route.name, type(exc).__name__, exc)


class LifecycleHost(Protocol):
    """What `install` reads of feedback.app.FeedbackRuntime (a protocol, so this module does not
    import the app that installs it)."""

    ready: asyncio.Event
    _producer: ReplaceableProducer | None
    _redis: aredis.Redis | None


def install(app: faust.App, runtime: LifecycleHost, config: Config) -> None:
    """Register the lifecycle timers on the faust app (only when some route has rollout or retrain).
    The driver is built once the runtime has its Redis client and producer."""
    if not any((r.rollout is not None and r.rollout.enabled) or r.retrain is not None for r in config.routes):
        return
    holder: dict[str, LifecycleDriver] = {}

    def driver() -> LifecycleDriver | None:
        if not runtime.ready.is_set():
            return None
        if "driver" not in holder:
            out = KafkaOut(runtime._producer, config.kafka.topics.deadletter, config.kafka.topics.alerts,  # noqa: SLF001
                           getattr(runtime, "webhooks", None),  # the route's webhook gets these alerts too
                           getattr(runtime, "metrics", None),  # refused alerts are counted
                           cloudevents=config.kafka.cloudevents)
            drift = getattr(runtime, "quality_drift", None)
            holder["driver"] = LifecycleDriver(config, runtime._redis, out,  # noqa: SLF001
                                               quality_alarms=drift.pending_alarms if drift is not None else None,
                                               metrics=getattr(runtime, "metrics", None))
        return holder["driver"]

    async def rollouts() -> None:
        current = driver()
        if current is not None:
            await current.tick_rollouts()

    async def retrain() -> None:
        current = driver()
        if current is not None:
            await current.tick_retrain()

    app.timer(interval=TICK_S, name="lifecycle-rollouts")(rollouts)
    app.timer(interval=TICK_S, name="lifecycle-retrain")(retrain)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
