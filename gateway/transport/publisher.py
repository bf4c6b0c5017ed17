"""Publishes prediction events of HTTP/gRPC requests to Kafka in small batches, off the request path.

The caller gets its answer without waiting for the broker; events are flushed every
`flush_interval_s` (or sooner when many are queued). A flush that fails (the broker away, a
sequence broken by an earlier failure) keeps its events queued and replaces the shared producer
exactly as the Kafka loop does (`SharedProducer.replace`), retrying with backoff, so a gateway
that serves only REST/gRPC recovers on its own. The queue is bounded: when Kafka is away for
long, new events are dropped and counted (`banditgate_sidecar_events_dropped_total`). An event
its topic refuses for good (too large, not authorized) is dead-lettered with its reason instead;
a dead letter refused in turn is dropped and counted. One log line when publishing stops
working, one when it works again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import orjson

from banditgate import cloudevents
from banditgate.config import Topics
from banditgate.jsontypes import JSONObject
from banditgate.tracecontext import TraceHeaders
from gateway.metrics import GatewayMetrics
from gateway.transport.delivery import RefusalMemo, is_delivery_error, refusal
from gateway.transport.kafka_batches import OutboundBatches, OutputRefused, delivered
from gateway.transport.kafka_codec import dead_letter_value
from gateway.transport.shared_producer import SharedProducer

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = logging.getLogger("banditgate.publisher")

BACKOFF_S = (0.5, 10.0)
"""First and longest wait between two attempts while publishing fails."""

# (topic, key, value, is a dead letter, send in a batch of its own, Kafka headers: the trace context
# and the CloudEvents attributes)
_Event = tuple[str, bytes, bytes, bool, bool, TraceHeaders | None]


def event_types(topics: Topics) -> dict[str, str]:
    """Topic -> the banditgate.events name of what the publisher sends there (its CloudEvents type)."""
    return {topics.predictions: "prediction", topics.shadow_predictions: "shadow-prediction",
            topics.alerts: "alert", topics.outcomes: "outcome"}


def _trace_only(headers: TraceHeaders | None) -> TraceHeaders | None:
    """The trace context among a record's headers (its CloudEvents attributes left out)."""
    if not headers:
        return None
    return [h for h in headers if not h[0].startswith("ce_")] or None


class PredictionPublisher:
    def __init__(self, shared: SharedProducer, partitions: dict[str, int], metrics: GatewayMetrics | None = None,
                 deadletter_topic: str | None = None, flush_interval_s: float = 0.02, max_queued: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, event_types: Mapping[str, str] | None = None,
                 cloudevents: bool = True) -> None:
        self.shared = shared
        self.cloudevents = cloudevents
        """Whether events get CloudEvents headers (``kafka.cloudevents``); the trace context always."""
        self.event_types = dict(event_types or {}) if cloudevents else {}
        """Topic -> event name (banditgate.events): events to these topics get CloudEvents headers."""
        self.partitions = partitions
        self.metrics = metrics
        self.deadletter_topic = deadletter_topic
        self.flush_interval_s = flush_interval_s
        self.max_queued = max_queued
        self.clock = clock
        self._queue: list[_Event] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._failing_since: float | None = None
        self._dropped_in_episode = 0
        self._backoff_s = BACKOFF_S[0]
        self._next_try_s = float("-inf")
        self._dead_letter_logged: set[str] = set()
        self._in_flight: list[_Event] = []
        self.memo = RefusalMemo()
        """Topics refused for everyone (authorization): not written to for a while."""
        self.dropped = 0
        self.errors = 0
        """Flushes that failed with an unexpected error (a defect): their events were dropped."""

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The shared producer the next flush uses."""
        return self.shared.producer

    @property
    def task(self) -> asyncio.Task | None:
        """The publishing task (the gateway exits non-zero if it ever dies)."""
        return self._task

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def publish(self, topic: str, events: list[JSONObject], key_field: str = "request_id",
                trace: TraceHeaders | None = None) -> None:
        """Queue events for `topic` (keyed by their `key_field`, with `trace` as their Kafka
        headers: the request's trace context); never blocks."""
        if len(self._queue) + len(events) > self.max_queued:
            self._drop(topic, "queue_full", len(events))
            return
        name = self.event_types.get(topic)
        at = cloudevents.ce_time() if name is not None else b""
        for event in events:
            key, value = str(event[key_field]).encode(), orjson.dumps(event)
            headers = trace
            if name is not None:
                # natural ids stable across retries: request_id (arm:request_id for a shadow), else
                # the content's digest; headers_for puts the event's name in front (cloudevents.event_id)
                ce_id = (key if name == "prediction" else b"%s:%s" % (str(event.get("arm")).encode(), key)
                         if name == "shadow-prediction" else cloudevents.content_id(topic, key, value))
                route = event.get("route")
                headers = cloudevents.headers_for(name, cloudevents.source("gateway", route if isinstance(route, str)
                                                                           else None))(ce_id, at, trace)
            self._queue.append((topic, key, value, False, False, headers))
        if len(self._queue) >= 512:
            self._wakeup.set()

    def _drop(self, topic: str, reason: str, count: int) -> None:
        self.dropped += count
        self._dropped_in_episode += count
        if self.metrics is not None:
            self.metrics.sidecar_dropped.labels(topic, reason).inc(count)
        if reason == "queue_full" and self._dropped_in_episode == count:
            log.error("sidecar prediction events are being dropped: %d queued while Kafka does not take them "
                      "(counted in banditgate_sidecar_events_dropped_total)", len(self._queue))

    async def _run(self) -> None:
        while not self._closing or self._queue:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.flush_interval_s)
            except TimeoutError:
                pass
            self._wakeup.clear()
            if self._queue and (self._closing or self.clock() >= self._next_try_s):
                try:
                    ok = await self._flush()
                except Exception:
                    # a defect (not the broker): the task must not die with it, or every later
                    # prediction would be queued and dropped while readiness stays true
                    ok = True
                    self.errors += 1
                    lost, self._in_flight = self._in_flight, []
                    for event in lost:
                        self._drop(event[0], "internal_error", 1)
                    log.exception("sidecar publisher: a flush failed with an unexpected error; its %d event(s) are "
                                  "dropped (banditgate_sidecar_events_dropped_total, reason internal_error) and "
                                  "publishing goes on", len(lost))
                if not ok and self._closing:
                    for event in self._queue:
                        self._drop(event[0], "shutdown", 1)
                    self._queue.clear()

    async def _flush(self) -> bool:
        """Publish what is queued; False if some of it must be tried again later."""
        holding = getattr(self.shared, "holding", None)
        if holding is None:
            return await self._flush_with(self.shared.producer)
        with holding() as producer:  # not closed under this flush by another user's replacement
            return await self._flush_with(producer)

    async def _flush_with(self, producer: AIOKafkaProducer | None) -> bool:
        batch, self._queue = self._queue, []
        self._in_flight = batch
        out: OutboundBatches[_Event] = OutboundBatches(producer, self.partitions, self.shared.limits)
        refused: list[tuple[_Event, str, str]] = []
        sent_events: list[_Event] = []
        now = self.clock()
        for event in batch:
            closed = self.memo.closed(event[0], now) if self.memo else None
            if closed is not None:
                # the topic refused us for good a moment ago: dead-letter without sending (and
                # without breaking and replacing the shared producer on every flush)
                refused.append((event, closed.reason, closed.error))
                continue
            try:
                out.add(event[0], event[1], event[2], source=event, alone=event[4], headers=event[5])
            except OutputRefused as exc:
                refused.append((event, exc.reason, str(exc)))
                continue
            sent_events.append(event)
        retry: list[_Event] = []
        cause: BaseException | None = None
        broken = False  # a refused batch leaves the producer's sequence for its partition broken
        try:
            failures = await delivered(await out.send())
        except Exception as exc:
            if not is_delivery_error(exc):
                raise
            failures, retry, cause = [], sent_events, exc
        self._in_flight = []  # from here on every event is queued again, dead-lettered or delivered
        for sent, error in failures:
            events = [event for event in sent.sources if event is not None]  # every record has its event
            found = refusal(error)
            if found is None:
                retry.extend(events)
                cause = error
                continue
            broken = True
            if found.scope == "topic":
                self.memo.learn(sent.topic, [], found, self.clock())
            if found.reason == "output_too_large":
                self.shared.learn_too_large(sent.topic, sent.size, len(sent.sources))
            if found.scope == "record" and len(events) > 1:
                # which one? each goes alone next time; the one refused then is dead-lettered
                self._queue.extend((t, k, v, dead, True, h) for t, k, v, dead, _alone, h in events)
            else:
                refused.extend((event, found.reason, found.error) for event in events)
        if refused:
            self._dead_letter(refused)
        if cause is None:
            self._recovered()
            if broken and not self._closing:
                await self._replace(producer)
            return True
        self._queue[:0] = retry  # oldest first, ahead of what arrived meanwhile
        excess = len(self._queue) - self.max_queued
        if excess > 0:
            for event in self._queue[self.max_queued:]:
                self._drop(event[0], "queue_full", 1)
            del self._queue[self.max_queued:]
        self._failed(cause)
        if not self._closing:
            await self._replace(producer)
        return False

    def _dead_letter(self, refused: list[tuple[_Event, str, str]]) -> None:
        """Queue a dead letter for each refused event; count (and log once) a refused dead letter."""
        for (topic, key, value, is_dead, _alone, trace), reason, message in refused:
            if self.metrics is not None and not is_dead:
                self.metrics.output_refusals.labels(topic, reason).inc()
            if is_dead or self.deadletter_topic is None:
                if self.metrics is not None:
                    self.metrics.deadletter_failures.labels(topic, reason).inc()
                if reason not in self._dead_letter_logged:
                    self._dead_letter_logged.add(reason)
                    log.error("a sidecar dead letter could not be written to %s (%s: %s); such dead letters are "
                              "dropped and counted in banditgate_deadletter_failures_total (logged once)",
                              topic, reason, message)
                continue
            # the event was answered over HTTP/gRPC already; its dead letter keeps it (position unknown: -1)
            letter = dead_letter_value(message, reason, topic, -1, -1, value, payload_chars=16_384)
            trace = _trace_only(trace)
            headers = cloudevents.headers("dead-letter", cloudevents.source("gateway"),
                                          cloudevents.content_id(self.deadletter_topic, key, letter), trace,
                                          self.cloudevents)
            self._queue.append((self.deadletter_topic, key, letter, True, False, headers))

    def _failed(self, cause: BaseException) -> None:
        """Publishing failed for a reason that may pass (the broker away): say so once per episode
        and wait before the next try (doubling up to BACKOFF_S[1])."""
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
            self._dropped_in_episode = 0
            log.error("sidecar prediction events cannot be published (%s: %s); holding up to %d and retrying",
                      type(cause).__name__, str(cause)[:200], self.max_queued)
        self._next_try_s = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, BACKOFF_S[1])

    async def _replace(self, failed: AIOKafkaProducer | None) -> None:
        """Replace the shared producer after a failed send (unless someone did already)."""
        try:
            await self.shared.replace(failed)
        except Exception as exc:
            if not is_delivery_error(exc):
                raise  # the broker is away otherwise: the next try comes after the backoff
            self._failed(exc)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info("sidecar prediction events are published again after %.1fs (%d dropped meanwhile)",
                     self.clock() - self._failing_since, self._dropped_in_episode)
            self._failing_since = None
        self._backoff_s = BACKOFF_S[0]
        self._next_try_s = float("-inf")

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
