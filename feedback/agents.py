"""The worker's loop bodies: decode a batch, step the pure join, apply effects, persist, ack.

Order per batch (and per timer sweep), under one lock so the agent and the sweeper never
interleave on an entry:

1. decode each event (malformed: dead letter) and step :mod:`feedback.join` against the table
   (plus the batch's own earlier changes);
2. apply the effects to Redis — arm statistics and the ledger, both idempotent per request —
   and send dead letters; retried until they succeed (nothing is acknowledged meanwhile, and
   the source is not read further: the batch is the back-pressure);
3. write the changed entries to the changelog and wait for the broker, then to memory;
4. only then the caller acks the events, so faust can commit their offsets.

When the table is over its budget, step 1 also evicts its oldest entries (`on_evict`): their
deletions and effects (default rewards, unanswered and orphan counts, orphan dead letters, the
``evicted`` count) join the batch's own and take the same path, so an eviction is exactly once and
a worker that recovers the changelog recovers the same bounded table.

Steps 2-4 of a batch run while the next batch does step 1 (``submit``), and batch N+1's step 2
while batch N's steps 3-4 run: each step stays in batch order (Redis applies batch N before N+1,
the changelog gets N before N+1), and step 1 joins against the changes of batches not yet
written. A timer sweep with something due first waits for every submitted batch to be written
(one with nothing due, the usual case, returns at once: it holds the lock, so batches would wait
too).

A crash at any point replays events from the last committed offset: before 3 the entries are
unchanged and the replayed effects are deduplicated by Redis; after 3 the entries recognise the
replayed events by offset and do nothing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from banditgate import redis_errors
from banditgate.config import Topics
from banditgate.events import (
    DEFAULT_MAX_EVENT_BYTES,
    KNOWN_SCHEMA_VERSIONS,
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    MAX_MAGNITUDE,
    EventError,
    decode_outcome,
    decode_prediction,
    is_name,
)
from banditgate.jsontypes import JSONObject
from banditgate.kafka_delivery import needs_new_producer
from banditgate.kafka_delivery import refusal as kafka_refusal
from banditgate.tracecontext import TRACEPARENT, from_kafka_headers, parse_traceparent, trace_headers
from banditgate.tracing import OFF, Tracing
from feedback.batch_trace import BatchTrace
from feedback.join import (
    Count,
    DropOutcome,
    Effect,
    Entry,
    JoinRules,
    Label,
    OutcomeIn,
    PredictionIn,
    Reward,
    Seen,
    Served,
    encode_entry,
    make_seen,
    make_served,
    on_due,
    on_evict,
    on_outcome,
    on_prediction,
)
from feedback.ledger import Refusal
from feedback.metrics import FeedbackMetrics
from feedback.outcome_metrics import outputs_view
from feedback.pairs import impression_from_outputs
from feedback.quality_drift_watch import QualityDriftWatch
from feedback.sinks import KafkaOut, Outgoing, RedisSink
from feedback.state import JoinTable

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord

    from feedback.disk_store import DiskJoinTable
    from feedback.producer import ReplaceableProducer

log = logging.getLogger("banditgate.feedback.agents")

T = TypeVar("T")

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError
_KNOWN_VERSIONS = KNOWN_SCHEMA_VERSIONS
_LOW, _HIGH = -MAX_MAGNITUDE, MAX_MAGNITUDE
"""The events contract's bounds on numbers: the fast decoder compares what it has already read."""
_KNOWN_NAMES_MAX = 4096
_YIELDS_FOR_REDIS = 4
"""Event-loop turns the Redis calls of a batch get to plan and send their pipelines before the
batch's changelog encoding takes the loop (fewer only means less overlap, never a wrong order)."""


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """One consumed record, as the join reads it (aiokafka's ConsumerRecord has the same fields)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int | None
    """Kafka record time, epoch milliseconds."""
    headers: Sequence[tuple[str, bytes]] = ()
    """The record's headers (a valid ``traceparent`` among them is kept with the prediction)."""


class JoinProcessor:
    """Runs batches and sweeps through the join and its sinks (see the module docstring)."""

    def __init__(self, *, table: JoinTable | DiskJoinTable, redis: RedisSink, out: KafkaOut, rules: JoinRules,
                 topics: Topics,
                 metrics: FeedbackMetrics, clock: Callable[[], float] = time.time,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, sweep_limit: int = 5000,
                 retry_max_s: float = 2.0, drift: QualityDriftWatch | None = None,
                 evict_limit: int = 16_000, producer: ReplaceableProducer | None = None, max_entry_bytes: int | None = None,
                 tracing: Tracing = OFF) -> None:
        self._table = table
        self.tracing = tracing
        """Spans (banditgate.tracing); every call behind one `enabled` test per batch."""
        if tracing.enabled:
            tracing.count_into(metrics.trace_spans_dropped)
        self._redis = redis
        self._out = out
        self._rules = rules
        self._topics = topics
        self._metrics = metrics
        self._clock = clock
        self._max_event_bytes = max_event_bytes
        self._sweep_limit = sweep_limit
        self._evict_limit = evict_limit
        """Most entries one batch or sweep evicts: twice what a batch adds, so eviction keeps up."""
        self._retry_max_s = retry_max_s
        self._producer = producer
        """The :class:`feedback.producer.ReplaceableProducer` behind `out` and the table: replaced
        after a changelog failure that breaks it."""
        self._max_entry_bytes = max_entry_bytes
        """The largest changelog record (key + encoded entry) the changelog topic takes: an event
        whose entry would be larger is dead-lettered (`oversize`) instead of joined."""
        self._drift = drift
        self._sources = {topics.predictions: "predictions", topics.shadow_predictions: "shadow_predictions",
                         topics.outcomes: "outcomes"}
        self._known_names: set[str] = set()
        """Arm and model names seen valid (see `_learn_name`)."""
        self.lock = asyncio.Lock()
        self._unwritten: dict[str, tuple[int, Entry | None]] = {}
        """Changes of submitted batches not yet persisted (newest per request)."""
        self._last_write: asyncio.Future[None] | None = None
        self._last_applied: asyncio.Future[None] | None = None
        """Done when the last submitted batch's effects are in Redis (its writes may still run)."""

    # -- events ------------------------------------------------------------------------------
    def _decode(self, message: SourceMessage | ConsumerRecord) -> PredictionIn | OutcomeIn:
        """The join's view of a record; raises EventError (reason and one line) when malformed.

        The events come from our own gateway, so the common shape is checked with a few type
        tests on the decoded object; anything else takes the full validator, which either accepts
        it or says why not (the dead letter's reason)."""
        value = message.value
        if value is None or len(value) > self._max_event_bytes:
            return self._decode_slow(message)
        try:
            obj = _loads(value)
        except _JSONDecodeError:
            return self._decode_slow(message)
        if type(obj) is not dict:
            return self._decode_slow(message)
        request_id = obj.get("request_id")
        if type(request_id) is not str or not 0 < len(request_id) <= MAX_ID_CHARS:
            return self._decode_slow(message)
        version = obj.get("schema_version")
        if version is not None and (type(version) is not int or version not in _KNOWN_VERSIONS):
            return self._decode_slow(message)  # which says unknown_version
        if message.topic == self._topics.outcomes:
            reward = obj.get("reward")
            label = obj.get("label")
            ts = obj.get("ts")
            # the contract's bounds (banditgate.events) as comparisons on values already read;
            # anything else takes the full validator, which says why (property-tested alike)
            if ((reward is None or ((type(reward) is float or type(reward) is int) and _LOW <= reward <= _HIGH))
                    and (label is None or (kind := type(label)) is bool
                         or ((kind is int or kind is float) and _LOW <= label <= _HIGH)
                         or (kind is str and len(label) <= MAX_LABEL_CHARS))
                    and (reward is not None or label is not None)
                    and (ts is None or ((type(ts) is float or type(ts) is int) and _LOW <= ts <= _HIGH))
                    and "clicks" not in obj):
                if ts is None:
                    ts = (message.timestamp or 0) / 1000.0
                return OutcomeIn(request_id, message.partition,
                                 make_seen(None if reward is None else float(reward), label, float(ts), message.offset,
                                           None))
            return self._decode_slow(message)
        route = obj.get("route")
        arm = obj.get("arm")
        model = obj.get("model")
        version = obj.get("model_version")
        ts_predicted = obj.get("ts_predicted")
        outputs = obj.get("outputs")
        names = self._known_names
        if (type(route) is str and type(arm) is str and type(model) is str and type(version) is int
                and (type(ts_predicted) is float or type(ts_predicted) is int) and _LOW <= ts_predicted <= _HIGH
                and type(outputs) is dict
                and (arm in names or self._learn_name(arm)) and (model in names or self._learn_name(model))
                and type(policy := obj.get("policy")) is str and 0 < len(policy) <= MAX_ID_CHARS
                and (type(number := obj.get("propensity")) is float or type(number) is int)
                and _LOW <= number <= _HIGH
                and (type(number := obj.get("ts_request")) is float or type(number) is int)
                and _LOW <= number <= _HIGH
                and (type(number := obj.get("latency_ms")) is float or type(number) is int)
                and _LOW <= number <= _HIGH):
            if route not in self._rules.routes:
                return self._decode_slow(message)
            served = make_served(arm, model, version, outputs_view(outputs), message.offset,
                                 message.topic == self._topics.shadow_predictions,
                                 impression_from_outputs(outputs) if policy == "interleave" else None)
            headers = getattr(message, "headers", None)  # test doubles may have none
            return PredictionIn(request_id, message.partition, route, served, float(ts_predicted),
                                _traceparent(headers) if headers else None)
        return self._decode_slow(message)

    def _decode_traced(self, message: SourceMessage | ConsumerRecord) -> PredictionIn | OutcomeIn:
        """`_decode`, plus an outcome's own trace context (validated here, where the event is
        decoded: an invalid traceparent is dropped, never an error): the decoder of a batch the
        worker traces (untraced, an outcome's context is only carried on, from its headers)."""
        event = self._decode(message)
        if isinstance(event, OutcomeIn):
            headers = getattr(message, "headers", None)  # test doubles may have none
            if headers:
                event.trace = _traceparent(headers)
        return event

    def _learn_name(self, name: str) -> bool:
        """Whether `name` is an arm or model name (banditgate.events.NAME_PATTERN); a valid one is
        remembered, so the regular expression runs once per name, not once per event."""
        if not is_name(name):
            return False
        if len(self._known_names) >= _KNOWN_NAMES_MAX:
            self._known_names.clear()  # bounded: a deployment has a handful of names
        self._known_names.add(name)
        return True

    def _decode_slow(self, message: SourceMessage | ConsumerRecord) -> PredictionIn | OutcomeIn:
        """The full validators (banditgate.events): the events' contract, every reason."""
        if message.value is None:
            raise EventError("not_json", "event has no value (a tombstone)")
        if message.topic == self._topics.outcomes:
            outcome = decode_outcome(message.value, self._max_event_bytes)
            ts = outcome.ts if outcome.ts is not None else (message.timestamp or 0) / 1000.0
            return OutcomeIn(outcome.request_id, message.partition,
                             Seen(outcome.reward, outcome.label, ts, message.offset, outcome.clicks))
        prediction = decode_prediction(message.value, self._max_event_bytes)
        if prediction.route not in self._rules.routes:
            raise EventError("unknown_route", f"prediction {prediction.request_id!r} names route {prediction.route!r}, "
                                              "which is not in this worker's configuration")
        served = Served(prediction.arm, prediction.model, prediction.model_version, outputs_view(prediction.outputs),
                        message.offset, shadow=message.topic == self._topics.shadow_predictions,
                        impression=impression_from_outputs(prediction.outputs)
                        if prediction.policy == "interleave" else None)
        headers = getattr(message, "headers", None)
        return PredictionIn(prediction.request_id, message.partition, prediction.route, served,
                            prediction.ts_predicted, _traceparent(headers) if headers else None)

    async def submit(self, messages: Sequence[SourceMessage | ConsumerRecord]) -> asyncio.Future[None]:
        """Join one batch of records (:class:`SourceMessage` or aiokafka ConsumerRecords) against
        the table and the batches still being written, and start writing it after them. Returns
        once the join is done, with a future that completes when the batch is applied and
        persisted (retrying Redis and Kafka for as long as it takes; then its offsets may be
        committed) and raises what a bug raised. Writes stay in submission order: batch N+1 is
        joined while batch N waits for Redis and the broker, which left the worker idle for about
        40% of a drain."""
        started = time.perf_counter()
        traced = BatchTrace(self.tracing) if self.tracing.enabled else None
        try:
            async with self.lock:
                now = self._clock()
                changes: dict[str, tuple[int, Entry | None]] = {}
                effects: list[Effect] = []
                letters: list[Outgoing] = []
                consumed: Counter[str] = Counter()
                dead: Counter[tuple[str, str]] = Counter()
                get = self._table.get
                unwritten = self._unwritten
                decode = self._decode if traced is None else self._decode_traced
                outcomes_topic = self._topics.outcomes
                rules = self._rules
                extend = effects.extend
                values: dict[str, bytes] = {}
                max_entry = self._max_entry_bytes
                for message in messages:
                    consumed[message.topic] += 1
                    try:
                        event = decode(message)
                    except EventError as exc:
                        source = self._sources.get(message.topic, message.topic)
                        dead[(source, exc.reason)] += 1
                        letters.append(self._out.dead_letter(message.key, str(exc), exc.reason, message.topic,
                                                             message.partition, message.offset, message.value or b"",
                                                             _carried(message)))
                        continue
                    request_id = event.request_id
                    change = changes.get(request_id)
                    if change is None and unwritten:
                        change = unwritten.get(request_id)
                    entry = change[1] if change is not None else get(request_id, event.partition)
                    if message.topic == outcomes_topic:
                        step = on_outcome(entry, event, now, rules)  # type: ignore[arg-type]
                        if traced is not None:
                            traced.outcome(event.trace, entry, message.key)
                    else:
                        step = on_prediction(entry, event, rules)  # type: ignore[arg-type]
                        if traced is not None:
                            traced.prediction(event)  # type: ignore[arg-type]
                    if step.changed:
                        if max_entry is not None and step.entry is not None:
                            # checked here, not when the changelog is written: a record the topic refuses
                            # would hold the batch (and every offset after it) forever
                            value = bytes(memoryview(encode_entry(step.entry)))
                            if len(value) + len(request_id.encode()) > max_entry:
                                self._oversize(message, len(value), dead, letters)
                                continue
                            values[request_id] = value
                        changes[request_id] = (event.partition, step.entry)
                    if step.effects:
                        extend(step.effects)
                if self._table.over_budget():
                    self._evict(changes, effects, now)
                for topic, count in consumed.items():
                    self._metrics.events.labels(self._sources.get(topic, topic)).inc(count)
                for (source, reason), count in dead.items():
                    self._metrics.dead_letters.labels(source, reason).inc(count)
                if traced is not None:
                    traced.joined(len(messages), len(effects), len(changes))
                written = self._write_after_previous(changes, effects, letters, values)
                if traced is not None:
                    written.add_done_callback(traced.applied)
        except BaseException as exc:
            # cancelled waiting for the lock (a rebalance, shutdown) or failed before the batch was
            # handed to its writer: its spans end here (BatchTrace.end runs once, never raises)
            if traced is not None:
                traced.end(exc)
            raise

        def observe(_: asyncio.Future[None]) -> None:
            self._metrics.batch_seconds.observe(time.perf_counter() - started)
            self._metrics.batch_events.observe(len(messages))

        written.add_done_callback(observe)
        return written

    def _oversize(self, message: SourceMessage | ConsumerRecord, size: int, dead: Counter[tuple[str, str]],
                  letters: list[Outgoing]) -> None:
        """Dead-letter an event whose join entry would not fit the changelog (`oversize`): the
        entry stays as it was, as if the event had not come."""
        source = self._sources.get(message.topic, message.topic)
        dead[(source, "oversize")] += 1
        letters.append(self._out.dead_letter(
            message.key, f"the join entry this event makes would take {size} bytes, over the changelog's limit of "
                         f"{self._max_entry_bytes} (kafka.max_message_bytes)", "oversize", message.topic,
            message.partition, message.offset, message.value or b"", _carried(message)))

    def _evict(self, changes: dict[str, tuple[int, Entry | None]], effects: list[Effect], now: float) -> None:
        """Evict the table's oldest entries (in its eviction order) until every partition is
        within its share of the budget, at most `evict_limit`: each victim's latest state (this
        batch's, a batch still being written, or the table's) gets `on_evict`, and its deletion
        and effects join `changes` and `effects`."""
        unwritten = self._unwritten
        get = self._table.get
        rules = self._rules
        for partition, request_id in self._table.evictions(self._evict_limit):
            change = changes.get(request_id)
            if change is None and unwritten:
                change = unwritten.get(request_id)
            entry = change[1] if change is not None else get(request_id, partition)
            if entry is None:
                continue  # deleted already by this batch or one being written
            changes[request_id] = (partition, None)
            effects.extend(on_evict(entry, now, rules).effects)

    def _write_after_previous(self, changes: dict[str, tuple[int, Entry | None]], effects: list[Effect],
                              letters: list[Outgoing],
                              values: dict[str, bytes] | None = None) -> asyncio.Future[None]:
        """Queue `_finish` behind the batches already writing (called under the lock). Until
        it has persisted them, `changes` are what later batches join against."""
        previous = self._last_write
        previous_applied = self._last_applied
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_applied = applied
        unwritten = self._unwritten
        unwritten.update(changes)

        async def write() -> None:
            try:
                await self._finish(changes, effects, letters, after_applied=previous_applied, applied=applied,
                                   after_written=previous, values=values)
            except BaseException as exc:
                if not applied.done():  # later batches' Redis stage fails with this one
                    applied.set_exception(exc)
                    applied.exception()  # retrieved here; the next batch (if any) raises it again
                raise
            finally:
                for request_id, change in changes.items():
                    if unwritten.get(request_id) is change:
                        del unwritten[request_id]

        written = asyncio.ensure_future(write())
        self._last_write = written
        return written

    async def drain(self) -> None:
        """Wait until every submitted batch is written (raises what a failed one raised)."""
        if self._last_write is not None:
            await self._last_write

    async def sweep(self, assigned: set[int]) -> int:
        """Sync the timer index with the assigned partitions, then apply due default rewards
        and expiries (at most `sweep_limit` entries per call). Returns how many were due."""
        async with self.lock:
            if set(assigned) != self._table.partitions or self._table.has_due(self._clock()):
                # the due entries' latest state must be in the table, not in flight; a sweep
                # with nothing due does not wait (it holds the lock: batches would wait with it)
                await self.drain()
            # batches evict while they flow; the sweep of an idle worker (nothing in flight, and
            # nothing can start while it holds the lock) evicts what is left: after a recovery
            # into a smaller budget, or entries that grew
            idle = self._last_write is None or self._last_write.done()
            self._table.sync_partitions(assigned)
            now = self._clock()
            due = self._table.pop_due(now, self._sweep_limit)
            changes: dict[str, tuple[int, Entry | None]] = {}
            effects: list[Effect] = []
            for partition, request_id in due:
                entry = self._table.get(request_id, partition)
                if entry is None:
                    continue
                step = on_due(entry, now, self._rules)
                if step.changed:
                    changes[request_id] = (partition, step.entry)
                else:
                    self._table.schedule(partition, request_id, entry)
                effects.extend(step.effects)
            if idle and self._table.over_budget():
                self._evict(changes, effects, now)
            if changes or effects:
                await self._finish(changes, effects, [])
            elif self._drift is not None and self._drift.waiting:
                # series whose threshold was still being calibrated run now, even if no batch comes
                letters = self._drift_alerts([])
                if letters:
                    await self._retrying("kafka", lambda: self._out.deliver(letters))
            self._metrics.join_entries.set(len(self._table))
            self._metrics.join_bytes.set(self._table.bytes)
            return len(due)

    async def _finish(self, changes: dict[str, tuple[int, Entry | None]], effects: list[Effect],
                      letters: list[Outgoing], *,
                      after_applied: asyncio.Future[None] | None = None, applied: asyncio.Future[None] | None = None,
                      after_written: asyncio.Future[None] | None = None, values: dict[str, bytes] | None = None
                      ) -> None:
        """Apply a batch's effects to Redis, then send its dead letters and alerts, then persist
        its entries. In a pipeline of batches, the Redis stage starts once `after_applied` (the
        batch before's Redis stage) is done, and completes `applied`; the sends start once
        `after_written` (the batch before, whole) is done. So batch N+1 plans and applies its
        effects while batch N's changelog records are on their way."""
        for effect in effects:
            if isinstance(effect, DropOutcome):
                self._metrics.dead_letters.labels("outcomes", effect.reason).inc()
                letters.append(self._out.dead_letter(
                    effect.request_id.encode(), effect.error, effect.reason, self._topics.outcomes,
                    effect.partition, effect.outcome.offset, orjson.dumps(effect.outcome.to_event(effect.request_id)),
                    trace_headers(effect.trace)))
        encoded = None
        chunks = self._redis.plan(effects) if effects else None  # CPU: while the batch before is in Redis
        if after_applied is not None:
            await after_applied  # Redis applies batches in order; a failure there is a bug: this batch fails too
        if chunks is not None:
            redis_call = asyncio.ensure_future(self._retrying("redis", lambda: self._redis.apply_planned(
                chunks, self._metrics)))
            if changes:
                # encode the changelog records while Redis runs the batch's scripts (nothing is
                # sent before Redis has applied the effects: see "Exactly once")
                for _ in range(_YIELDS_FOR_REDIS):
                    await asyncio.sleep(0)
                encoded = self._table.encode(changes, values)
            result = await redis_call
            if result.refused:
                letters.extend(self._refused(result.refused))
            self._metrics.count_all(result.counts)
            if self._drift is not None:
                # fed only what the ledger applied now: a replayed outcome is not seen twice
                letters.extend(self._drift_alerts(result.scored))
        if applied is not None:
            applied.set_result(None)  # the next batch's scripts may go to Redis now
        if after_written is not None:
            await after_written  # dead letters and changelog in batch order
        if letters:
            pending = list(letters)  # what is delivered or refused for good is not sent again
            await self._retrying("kafka", lambda: self._out.deliver(pending))
        if changes:
            if encoded is None:
                encoded = self._table.encode(changes, values)
            await self._retrying("changelog", lambda: self._table.persist(changes, encoded))

    def _drift_alerts(self, scored: list[Label | Reward]) -> list[Outgoing]:
        """Feed the quality-drift watch; the alerts of the episodes it opened, ready to send."""
        assert self._drift is not None  # noqa: S101 - callers check
        letters: list[Outgoing] = []
        for alert in self._drift.observe(scored):
            self._metrics.alerts.labels(alert.route, alert.kind).inc()
            letters.append(self._out.alert(alert))
        return letters

    def _refused(self, refused: Sequence[Refusal]) -> list[Outgoing]:
        """Dead letters for effects the ledger refused (one log line per batch: a broken key can
        refuse every item of a route, batch after batch)."""
        letters = []
        for refusal in refused:
            effect = refusal.effect
            topic = self._topics.predictions if _from_prediction(effect) else self._topics.outcomes
            source = self._sources[topic]
            self._metrics.dead_letters.labels(source, refusal.reason).inc()
            # the event was joined before: its offset is not at hand here (-1), the payload says
            # which effect of which request it was
            letters.append(self._out.dead_letter(effect.request_id.encode(), refusal.error, refusal.reason, topic, -1,
                                                 -1, orjson.dumps(_describe(effect))))
        log.warning("%d effect(s) refused and dead-lettered instead of applied (first: %s)", len(refused),
                    refused[0].error)
        return letters

    async def _retrying(self, sink: str, call: Callable[[], Awaitable[T]]) -> T:
        """Call until it succeeds. Redis errors are classified (banditgate.redis_errors):
        transient ones (connection, timeout, READONLY, OOM, LOADING, BUSY...) and operator ones
        (NOPERM, authentication: retried too, logged as errors, since no data is wrong) are
        retried with backoff, one log line per episode, `redis_up` 0 and a counter by kind
        meanwhile; a refusal that reaches here or anything else is a bug and propagates. Kafka
        and network errors are retried as before."""
        delay = 0.05
        failing_since: float | None = None
        kind = ""
        while True:
            used = getattr(self._producer, "current", None)
            try:
                result = await call()
            except (TimeoutError, RedisError, KafkaError, OSError) as exc:
                if isinstance(exc, RedisError):
                    kind = redis_errors.classify(exc)
                    if kind not in (redis_errors.TRANSIENT, redis_errors.OPERATOR):
                        raise  # a script or command error we caused: a bug, not an outage
                    self._metrics.redis_errors.labels(kind).inc()
                else:
                    kind = "transient"
                    found = kafka_refusal(exc)
                    if found is not None:
                        # only the changelog reaches here refused (dead letters and alerts are
                        # dropped by KafkaOut): its records are the join's state and cannot be dropped
                        kind = redis_errors.OPERATOR
                    if needs_new_producer(exc):
                        await self._replace_producer(used)
                if failing_since is None:
                    failing_since = time.monotonic()
                    gc.enable()  # paused for the batch (feedback/consumer.py BatchGc): not for an outage
                    if kind == redis_errors.OPERATOR:
                        log.error("%s write refused by the deployment (%s); retrying until an operator fixes it "
                                  "(credentials or ACL), nothing is acknowledged meanwhile", sink,
                                  redis_errors.one_line(exc))
                    else:
                        log.warning("%s write failed (%s); retrying, nothing is acknowledged until it succeeds",
                                    sink, redis_errors.one_line(exc))
                if sink == "redis":
                    self._metrics.redis_up.set(0)
                self._metrics.retries.labels(sink).inc()
                await asyncio.sleep(delay)
                delay = min(self._retry_max_s, delay * 2)
                continue
            if failing_since is not None:
                log.warning("%s writes succeed again after %.1f s", sink, time.monotonic() - failing_since)
            if sink == "redis":
                self._metrics.redis_up.set(1)
            return result


    async def _replace_producer(self, failed: AIOKafkaProducer | None) -> None:
        """Replace the worker's producer after a failure that breaks it; the broker being away
        only means the next try replaces it."""
        if self._producer is None or failed is None:
            return
        try:
            await self._producer.replace(failed)
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("could not replace the feedback producer yet (%s)", type(exc).__name__)


def _traceparent(headers: Iterable[tuple[str, bytes]]) -> str | None:
    """The valid traceparent among a record's headers, or None."""
    for name, value in headers:
        if name == TRACEPARENT:
            return parse_traceparent(value)
    return None


def _carried(message: SourceMessage | ConsumerRecord) -> list[tuple[str, bytes]] | None:
    """The trace context of a consumed record, to carry onto what the worker emits for it."""
    headers = getattr(message, "headers", None)
    return from_kafka_headers(headers) if headers else None


_FROM_PREDICTION = frozenset({"default", "unanswered", "prediction_duplicate"})


def _from_prediction(effect: Effect) -> bool:
    """Whether an effect stems from a prediction (or its timer) rather than an outcome."""
    return (isinstance(effect, Count) and effect.kind in _FROM_PREDICTION) or (
        isinstance(effect, Reward) and effect.default)


def _describe(effect: Effect) -> JSONObject:
    """A refused effect as a dead letter's payload: what it would have added, and for whom."""
    out: JSONObject = {"effect": type(effect).__name__.lower(), "request_id": effect.request_id}
    for name in ("route", "kind", "token", "reward", "label", "fields", "default"):
        value = getattr(effect, name, None)
        if value is not None:
            out[name] = value
    served = getattr(effect, "served", None)
    if served is not None:
        out.update(arm=served.arm, model=served.model, model_version=served.model_version, role=served.role)
    elif getattr(effect, "arm", None) is not None:
        out["arm"] = effect.arm  # type: ignore[union-attr]
    return out
