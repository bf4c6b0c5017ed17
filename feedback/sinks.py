"""Where the join's effects go: Redis (arm statistics through the router's store, and the feedback
ledger of counts and quality sums: :mod:`feedback.ledger` plans the script calls, `RedisSink` here
sends them and counts what landed), Kafka (dead letters, alerts) and Prometheus (the quality
monitor's gauges and its promote/reject alerts).

A chunk Redis refuses for good (the ledger script's ``BGREFUSED``: it changed nothing) is split
until the single effects Redis refuses are found, and those are handed back to be dead-lettered
(docs/feedback.md, "Poison values and Redis errors").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import orjson

from banditgate import cloudevents, redis_errors
from banditgate.config import Route
from banditgate.events import Alert, DeadLetter, dead_letter_payload, encode
from banditgate.kafka_delivery import is_delivery_error, needs_new_producer, refusal
from feedback.join import Count, Effect, Label, Reward
from feedback.ledger import ChunkApplied, FeedbackKeys, Ledger, LedgerChunk, LedgerPlanner, Refusal
from feedback.metrics import FeedbackMetrics
from feedback.outcome_metrics import (
    QualityStats,
    ShadowVerdict,
    shadow_verdict,
    window_buckets,
)
from feedback.webhooks import WebhookNotifier, alert_route
from router.stats_store import ArmStatsStore

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from redis import asyncio as aredis

    from feedback.producer import ReplaceableProducer

log = logging.getLogger("banditgate.feedback.sinks")

# ---------------------------------------------------------------------------------------------
# Redis: both stores together


@dataclass
class Applied:
    """What a batch of effects did in Redis."""

    counts: list[Count]
    """Count effects applied now (not seen before)."""
    arm_applied: int
    arm_duplicates: int
    scored: list[Label | Reward] = field(default_factory=list)
    """Label and Reward effects applied now: what the quality-drift watch is fed (once each)."""
    refused: list[Refusal] = field(default_factory=list)
    """Effects left out (the planner's checks) or refused by Redis for good: to dead-letter."""


class Plan:
    """One batch's script calls and how far they got. `RedisSink.apply_planned` moves each
    chunk from `pending` to `done` (with its result) or, refused for good, splits it until the
    refused effects are found (`refused`); called again after an outage it sends only what is
    still pending, so the result counts every applied effect once."""

    __slots__ = ("done", "pending", "refused")

    def __init__(self, chunks: Iterable[LedgerChunk], refused: list[Refusal] | None = None) -> None:
        self.pending: list[LedgerChunk] = list(chunks)
        self.done: list[tuple[LedgerChunk, ChunkApplied]] = []
        self.refused: list[Refusal] = refused if refused is not None else []


class RedisSink:
    """Applies effects to the router's arm statistics and to the feedback ledger."""

    def __init__(self, store: ArmStatsStore, ledger: Ledger, planner: LedgerPlanner) -> None:
        self._store = store
        self._ledger = ledger
        self._planner = planner

    async def apply(self, effects: Sequence[Effect], metrics: FeedbackMetrics | None = None) -> Applied:
        """Apply every effect at most once (ledger items and arm updates in the same script
        calls, one round trip). Raises RedisError (or OSError) on failure: calling again with the
        same effects is safe (what landed is not applied twice)."""
        return await self.apply_planned(self.plan(effects), metrics)

    def plan(self, effects: Sequence[Effect]) -> Plan:
        """The script calls that apply `effects` (pure CPU: a batch plans while the one before it
        is in Redis); a reward the arm statistics cannot take is refused here (`Plan.refused`)."""
        refused: list[Refusal] = []
        return Plan(self._planner.plan(effects, self._store, refused), refused)

    async def apply_planned(self, plan: Plan | list[LedgerChunk], metrics: FeedbackMetrics | None = None) -> Applied:
        """`apply` for a plan from `plan` (or a list of chunks); as safe to call again with the
        same plan, which then sends only the chunks not applied yet.

        A chunk Redis refuses for good (banditgate.redis_errors.REFUSED: our script's argument
        checks, WRONGTYPE, a stored field that is not a number; the script changed nothing) is
        split in halves and sent again, until the single effects it refuses are found: those go
        to `Applied.refused` (reason ``redis_refused``), every other effect is applied. Raises the
        first transient or operator error (after recording what was applied) or a bug."""
        if not isinstance(plan, Plan):
            plan = Plan(plan)
        while plan.pending:
            replies = await self._ledger.apply_each(plan.pending)
            again: list[LedgerChunk] = []
            failure: BaseException | None = None
            for chunk, reply in zip(plan.pending, replies):
                if not isinstance(reply, BaseException):
                    plan.done.append((chunk, reply))
                elif redis_errors.classify(reply) != redis_errors.REFUSED:
                    again.append(chunk)
                    failure = failure or reply
                elif len(chunk.members) == 1:
                    effect = chunk.members[0]
                    plan.refused.append(Refusal(effect, "redis_refused", f"Redis refused the ledger item of "
                                                f"{effect.request_id!r} on route {chunk.route!r}: "
                                                f"{redis_errors.one_line(reply)}"))
                else:
                    again.extend(self._halves(chunk))
            plan.pending = again
            if failure is not None:
                raise failure
        return self._applied(plan, metrics)

    def _halves(self, chunk: LedgerChunk) -> list[LedgerChunk]:
        """`chunk`'s effects as two chunks (re-planned: keys and names are per chunk)."""
        middle = len(chunk.members) // 2
        ignored: list[Refusal] = []  # refused when first planned, never members
        return [*self._planner.plan(chunk.members[:middle], self._store, ignored),
                *self._planner.plan(chunk.members[middle:], self._store, ignored)]

    @staticmethod
    def _applied(plan: Plan, metrics: FeedbackMetrics | None) -> Applied:
        counts: list[Count] = []
        scored: list[Label | Reward] = []
        arm_applied = arm_duplicates = 0
        arm_counts: dict[str, list[int]] = {}
        for chunk, result in plan.done:
            for member, applied in zip(chunk.members, result.items):
                if applied:
                    cls = member.__class__
                    if cls is Count:
                        counts.append(member)  # type: ignore[arg-type]
                    elif cls is Label or cls is Reward:
                        scored.append(member)  # type: ignore[arg-type]
            if chunk.arm:
                arm_applied += result.arm_applied
                arm_duplicates += result.arm_duplicates
                totals = arm_counts.setdefault(chunk.route, [0, 0])
                totals[0] += result.arm_applied
                totals[1] += result.arm_duplicates
        if metrics is not None:
            for route, (applied_now, duplicates) in arm_counts.items():
                metrics.arm_updates.labels(route, "applied").inc(applied_now)
                metrics.arm_updates.labels(route, "duplicate").inc(duplicates)
        return Applied(counts, arm_applied, arm_duplicates, scored, list(plan.refused))


# ---------------------------------------------------------------------------------------------
# Kafka: dead letters and alerts


Outgoing = tuple[str, bytes | None, bytes] | tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]
"""A message KafkaOut sends: (topic, key, value), or with the record's headers as a 4th item."""


class KafkaOut:
    """Dead letters and alerts through one aiokafka producer (acknowledged before returning).
    Every alert it sends (any message to the alerts topic, whoever built it) also goes to its
    route's webhook, when `webhooks` has one for it (queued; never blocks: feedback/webhooks.py).

    A message the broker refuses for good (too large, not authorized, invalid:
    banditgate.kafka_delivery.refusal) is dropped and counted
    (`banditgate_feedback_output_refusals_total{topic,reason}`), logged once per episode: sending
    it again could never succeed, and retrying it held every offset of the worker forever. A
    failure that breaks the producer (a refusal, a broken sequence, fenced, closed) replaces it
    when `producer` is a :class:`feedback.producer.ReplaceableProducer`."""

    def __init__(self, producer: ReplaceableProducer | AIOKafkaProducer, deadletter_topic: str, alerts_topic: str,
                 webhooks: WebhookNotifier | None = None,
                 metrics: FeedbackMetrics | None = None, cloudevents: bool = True) -> None:
        self._producer = producer
        self.cloudevents = cloudevents
        """Whether dead letters and alerts get CloudEvents headers (``kafka.cloudevents``)."""
        self.deadletter_topic = deadletter_topic
        self.alerts_topic = alerts_topic
        self.webhooks: WebhookNotifier | None = webhooks
        self.metrics = metrics
        self.refused = 0
        self._refusals_logged: set[tuple[str, str]] = set()

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        """Send (topic, key, value[, headers]) messages and wait until the broker acknowledged all of them
        (or refused some for good: dropped and counted). Raises the first retriable failure."""
        await self.deliver(list(messages))

    async def deliver(self, pending: list[Outgoing]) -> None:
        """As `send_all`, and leaves in `pending` only the messages to send again: a retry after
        a retriable failure sends neither the delivered nor the refused ones again. A dead letter
        or an alert without CloudEvents headers gets them here (once: a retry keeps them)."""
        self._stamp(pending)
        producer = self._producer
        used = getattr(producer, "current", producer)
        sent: list[Outgoing] = []
        futures = []
        retry: list[Outgoing] = []
        cause: BaseException | None = None
        broken = refused_any = False
        outcomes: list[tuple[Outgoing, BaseException]] = []
        for message in pending:
            topic, key, value = message[0], message[1], message[2]
            try:
                # a 4th item is the record's headers (the request's trace context)
                futures.append(await (producer.send(topic, key=key, value=value) if len(message) == 3
                                      else producer.send(topic, key=key, value=value, headers=message[3])))
            except Exception as exc:  # a record over max_request_size is refused here, before sending
                if not is_delivery_error(exc):
                    raise
                outcomes.append((message, exc))
                continue
            sent.append(message)
        delivered = []
        if futures:
            for message, result in zip(sent, await asyncio.gather(*futures, return_exceptions=True)):
                if isinstance(result, BaseException):
                    if not is_delivery_error(result):
                        raise result
                    outcomes.append((message, result))
                else:
                    delivered.append(message)
        for message, error in outcomes:
            broken = broken or needs_new_producer(error)
            found = refusal(error)
            if found is None:
                retry.append(message)
                cause = cause or error
                continue
            refused_any = True
            self._refuse(message[0], found.reason, found.error)
        if not refused_any and not retry:
            self._refusals_logged.clear()  # the episode is over: the next refusal is logged again
        pending[:] = retry
        webhooks = self.webhooks
        if webhooks is not None and webhooks.urls:
            for topic, key, value, *_headers in delivered:
                if topic == self.alerts_topic:
                    route = alert_route(key, value)
                    if route is not None:
                        webhooks.notify(route, value)
        replace = getattr(producer, "replace", None)
        if broken and replace is not None:
            try:
                await replace(used)
            except Exception as exc:
                if not is_delivery_error(exc):
                    raise
                cause = cause or exc  # the broker is away: retried (and replaced) on the next try
        if cause is not None:
            raise cause

    def _stamp(self, pending: list[Outgoing]) -> None:
        """Add the CloudEvents headers (banditgate.cloudevents) to the dead letters and alerts in
        `pending` that have none: id from the content (the same on a retry or a replay), source
        the worker (and the alert's route, its key). Nothing when the headers are off."""
        if not self.cloudevents:
            return
        at = b""
        for index, message in enumerate(pending):
            topic = message[0]
            name = ("dead-letter" if topic == self.deadletter_topic else "alert" if topic == self.alerts_topic
                    else None)
            carried = message[3] if len(message) == 4 else None
            if name is None or cloudevents.has_cloudevent(carried):
                continue
            key, value = message[1], message[2]
            at = at or cloudevents.ce_time()
            route = key.decode(errors="replace") if name == "alert" and key else None
            headers = cloudevents.headers_for(name, cloudevents.source("feedback", route))(
                cloudevents.content_id(topic, key, value), at, carried)
            pending[index] = (topic, key, value, headers)

    def _refuse(self, topic: str, reason: str, error: str) -> None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.output_refusals.labels(topic, reason).inc()
        if (topic, reason) not in self._refusals_logged:
            self._refusals_logged.add((topic, reason))
            log.error("the broker refused a message to %s for good (%s: %s); it is dropped and counted in "
                      "banditgate_feedback_output_refusals_total (logged once per episode)", topic, reason, error)

    def dead_letter(self, key: bytes | None, error: str, reason: str, topic: str, partition: int, offset: int,
                    payload: bytes, headers: list[tuple[str, bytes]] | None = None) -> Outgoing:
        """A dead letter to send; `headers`: the trace context of the request it concerns."""
        letter = DeadLetter(error=error, topic=topic, partition=partition, offset=offset,
                            payload=dead_letter_payload(payload), reason=reason)
        if headers:
            return self.deadletter_topic, key, encode(letter), headers
        return self.deadletter_topic, key, encode(letter)

    def alert(self, alert: Alert) -> tuple[str, bytes | None, bytes]:
        return self.alerts_topic, alert.route.encode(), encode(alert)


# ---------------------------------------------------------------------------------------------
# quality: gauges and promote / reject


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def parse_quality(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[tuple[str, str, str, str], QualityStats]:
    """A quality hash -> stats per (role, arm, model, version)."""
    grouped: dict[tuple[str, str, str, str], dict[str, float]] = defaultdict(dict)
    for name, value in raw.items():
        parts = _text(name).split("|")
        if len(parts) != 5:
            continue
        role, arm, model, version, stat = parts
        grouped[(role, arm, model, version)][stat] = float(_text(value))
    return {key: QualityStats.from_fields(values) for key, values in grouped.items()}


class QualityMonitor:
    """Reads the quality sums of every route from Redis (all workers' contributions), refreshes
    the gauges, and sends a promote or reject alert once per shadow version when the sequential
    test decides. An alert is sent before it is marked sent, so it may (rarely) repeat."""

    def __init__(self, client: aredis.Redis, keys: FeedbackKeys, routes: Sequence[Route], window_s: float,
                 confidence: float, margin: float, out: KafkaOut, metrics: FeedbackMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._keys = keys
        self._routes = list(routes)
        self._window_s = window_s
        self._confidence = confidence
        self._margin = margin
        self._out = out
        self._metrics = metrics
        self._clock = clock

    async def refresh(self) -> list[Alert]:
        """One refresh; returns the alerts sent. Raises RedisError / KafkaError on failure."""
        now = self._clock()
        buckets = list(window_buckets(now, self._window_s))
        pipe = self._client.pipeline(transaction=False)
        for route in self._routes:
            pipe.hgetall(self._keys.quality(route.name))
            for bucket in buckets:
                pipe.hgetall(self._keys.quality_bucket(route.name, bucket))
            pipe.hgetall(self._keys.alerted(route.name))
        replies = await pipe.execute()
        rows: list[tuple[tuple[str, ...], Mapping[str, float]]] = []
        alerts: list[Alert] = []
        step = len(buckets) + 2
        for position, route in enumerate(self._routes):
            chunk = replies[position * step:(position + 1) * step]
            total = parse_quality(chunk[0])
            window: dict[tuple[str, str, str, str], QualityStats] = defaultdict(QualityStats)
            for raw in chunk[1:-1]:
                for key, stats in parse_quality(raw).items():
                    window[key] = window[key] + stats
            alerted = {_text(k) for k in chunk[-1]}
            for key in sorted(set(total) | set(window)):
                role, arm, model, version = key
                values = dict(window[key].metrics(route.reward, self._confidence)) if key in window else {}
                if role == "shadow" and key in total:
                    verdict = shadow_verdict(total[key], self._confidence, self._margin)
                    values.update(advantage=verdict.advantage, advantage_low=verdict.lower,
                                  advantage_high=verdict.upper, pairs=verdict.n)
                    marker = f"{verdict.decision}|{arm}|{model}|{version}"
                    if (decision := verdict.decision) is not None and marker not in alerted:
                        alerts.append(self._alert(route.name, arm, model, version, decision, verdict, total[key],
                                                  total, now))
                rows.append(((route.name, arm, model, version, role), values))
        self._metrics.quality.update(rows)
        if alerts:
            await self._out.send_all([self._out.alert(a) for a in alerts])
            pipe = self._client.pipeline(transaction=False)
            for alert in alerts:
                details = alert.details
                pipe.hset(self._keys.alerted(alert.route),
                          f"{alert.kind}|{alert.arm}|{details['model']}|{alert.model_version}", orjson.dumps(alert.to_dict()))
                self._metrics.alerts.labels(alert.route, alert.kind).inc()
            await pipe.execute()
            for alert in alerts:
                log.warning("%s alert: route %s shadow %s (%s v%s): advantage %.4f, %.0f%% confidence sequence "
                            "[%.4f, %.4f] over %d paired labels", alert.kind, alert.route, alert.arm,
                            alert.details["model"], alert.model_version, alert.value, 100 * self._confidence,
                            alert.details["lower"], alert.details["upper"], alert.details["pairs"])
        return alerts

    def _alert(self, route: str, arm: str, model: str, version: str, decision: Literal["promote", "reject"],
               verdict: ShadowVerdict, shadow: QualityStats, total: Mapping[tuple[str, str, str, str], QualityStats],
               now: float) -> Alert:
        primaries = {f"{k[1]}:{k[2]}:v{k[3]}": _summary(s) for k, s in total.items() if k[0] == "primary"}
        return Alert(kind=decision, route=route, arm=arm, model_version=int(version),
                     metric="paired_loss_advantage", value=verdict.advantage,
                     threshold=self._margin if decision == "promote" else 0.0, ts=now,
                     details={"model": model, "pairs": int(verdict.n), "lower": verdict.lower, "upper": verdict.upper,
                              "confidence": verdict.confidence, "margin": verdict.margin,
                              "primary_loss": verdict.primary_loss, "shadow_loss": verdict.shadow_loss,
                              "loss": "brier score when both give a probability of a binary label, else 0/1 error",
                              "test": "normal-mixture confidence sequence (Robbins; Howard et al. 2021), "
                                      "Hoeffding sigma=1, valid under continuous monitoring",
                              "shadow": _summary(shadow), "primaries": primaries})


def _summary(stats: QualityStats) -> dict[str, float]:
    return {k: round(v, 6) for k, v in stats.metrics().items()}


__all__ = ["Applied", "KafkaOut", "Plan", "QualityMonitor", "RedisSink", "parse_quality"]
