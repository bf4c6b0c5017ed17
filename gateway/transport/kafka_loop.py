"""The Kafka loop: batched consumption, bounded in-flight work, ordered manual commits.

At-least-once: the offsets of a fetched batch are committed only after every prediction,
shadow prediction and dead-letter it produced is acknowledged by the broker, and only once
every earlier batch is too. When producing fails (broker away past the producer's retries),
the loop rewinds to the last committed offsets and processes again: some predictions may
repeat, none go missing.

Outputs the broker refuses for good (gateway/transport/delivery.py) are not retried forever:
one too large for its topic is found before sending and its request dead-lettered
(`output_too_large`); a batch the broker refuses is remembered by its requests' positions
(`RefusalMemo`), the loop rewinds once, and the replay dead-letters what was refused (a batch of
several records is first split, one record per batch, to find which). A dead letter that is
itself refused is dropped, counted and logged once per topic and reason.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import sys
import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from banditgate import cloudevents
from banditgate.config import Config
from banditgate.connections import ConnectionCheckError, check_kafka, describe_kafka_failure, kafka_client_kwargs
from banditgate.tracecontext import TraceHeaders, from_kafka_headers
from banditgate.tracing import Tracing
from gateway.dataplane import Dataplane
from gateway.metrics import GatewayMetrics
from gateway.serving import Answer
from gateway.transport.delivery import Position, RefusalMemo, is_delivery_error, refusal
from gateway.transport.kafka_batches import OutboundBatches, OutputRefused, Sent, delivered, partition_for
from gateway.transport.kafka_codec import SourcedPending, dead_letter_value, decode_records
from gateway.transport.kafka_trace import BatchTrace
from gateway.transport.shared_producer import SharedProducer, close_producer

dumps = orjson.dumps

log = logging.getLogger("banditgate.kafka")

CLOSE_NOW_TIMEOUT_S = 5.0
REPLY_TOPICS_MAX = 1024
"""Most reply topics whose partition counts (or absence) are remembered; a deployment has one per
client service, so the memory is cleared whole when a misbehaving one exceeds it."""
REPLY_METADATA_TIMEOUT_S = 5.0
"""How long a batch waits for the broker to describe a reply topic it has not seen."""
REPLY_RETRY_S = 30.0
"""How long a reply topic the broker did not know is skipped before it is looked up again."""
"""How long leaving the group and closing may take once the grace period is over."""


class PublicationFailed(Exception):
    """A batch's outputs were not all delivered (the loop rewinds); `producer` is the one that failed."""

    def __init__(self, producer: AIOKafkaProducer | None, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.producer = producer
        self.cause = cause


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loop: KafkaLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # finish what we hold for these partitions and commit it before another replica takes over
        await self.loop.finish_in_flight()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned partitions: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "none")


LoopSource = SourcedPending | Position
"""What a record the loop sends stands for: the request it answers, or a dead letter's position."""


def _position(source: LoopSource) -> Position:
    """The input position an output's source stands for (a request or the position itself)."""
    return source if isinstance(source, tuple) else (source.topic, source.partition, source.offset)


class KafkaLoop:
    """Consumes requests, serves them through the dataplane, produces predictions (at-least-once)."""

    def __init__(self, config: Config, dataplane: Dataplane, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic, tracing: Tracing | None = None) -> None:
        self.config = config
        self.tracing = tracing if tracing is not None else Tracing.from_config(config.tracing, "banditgate-gateway")
        """Spans (banditgate.tracing); OFF unless tracing.enabled: every tracing call below is behind
        one `self.tracing.enabled` test per batch, or a None test on what that test made."""
        if self.tracing.enabled:
            self.tracing.count_into(metrics.trace_spans_dropped)
        self.dataplane = dataplane
        self.metrics = metrics
        self.clock = clock
        self.topics = config.kafka.topics
        self.consumer: AIOKafkaConsumer | None = None
        self.shared = SharedProducer(config.kafka, on_replaced=metrics.producer_replacements.inc)
        """The idempotent producer (shared with the sidecar publisher and `/v2/outcomes`)."""
        self.memo = RefusalMemo()
        self.partitions: dict[str, int] = {}
        self._in_flight: collections.deque[tuple[asyncio.Task, dict[TopicPartition, int]]] = collections.deque()
        self._commit_lock = asyncio.Lock()
        self._to_commit: dict[TopicPartition, int] = {}
        """Offsets whose batches are delivered, not yet committed (the committer takes them)."""
        self._committer: asyncio.Task | None = None
        self._last_handed_over: asyncio.Event | None = None
        self._last_lag_s = 0.0
        self._last_commit_s = float("-inf")
        self._committer_waiting = False
        """True while the committer waits out the commit interval (it holds no offsets then)."""
        self._failed_producer: AIOKafkaProducer | None = None
        self._fatal: BaseException | None = None
        """A defect in our own code met while serving a batch: run() raises it (the process exits)."""
        self._stopping: asyncio.Event | None = None
        self._dead_letter_logged: set[tuple[str, str]] = set()
        self.processed = 0
        patterns = tuple(config.kafka.reply_topics)
        self._reply_allowed: Callable[[str], bool] = (
            (lambda topic: any(fnmatch.fnmatchcase(topic, p) for p in patterns)) if patterns else (lambda _: False))
        self._reply_partitions: dict[str, int | float] = {}
        """Reply topic -> its partition count, or the monotonic time until which it is skipped."""

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The current shared producer (a new one after each failed publication)."""
        return self.shared.producer

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the producer and consumer. Raises ConnectionCheckError (one line, no secret) when
        the broker cannot be reached or refuses our credentials or certificates."""
        kafka = self.config.kafka
        # log in once as the clients will, before building them: a wrong password or an untrusted
        # certificate is then one line naming the broker and the setting, not a client's retry loop
        await check_kafka(kafka)
        try:
            await self._start_clients()
        except KafkaError as exc:
            if self.consumer is not None:
                await self.consumer.stop()
            await self.shared.stop()
            raise ConnectionCheckError(describe_kafka_failure(kafka, kafka.bootstrap_servers, exc)) from None
        self.metrics.kafka_up.set(1)

    def output_topics(self) -> list[str]:
        topics = self.topics
        return [topics.predictions, topics.shadow_predictions, topics.deadletter, topics.alerts, topics.outcomes]

    async def _start_clients(self) -> None:
        kafka = self.config.kafka
        common = kafka_client_kwargs(kafka)
        await self.shared.discover_limits(self.output_topics())
        self.consumer = AIOKafkaConsumer(**common, group_id=kafka.group_id, enable_auto_commit=False,
                                         auto_offset_reset="earliest", isolation_level="read_committed",
                                         fetch_max_wait_ms=kafka.fetch_max_wait_ms, fetch_min_bytes=kafka.fetch_min_bytes,
                                         max_partition_fetch_bytes=4 * 1024 * 1024,
                                         fetch_max_bytes=32 * 1024 * 1024,
                                         session_timeout_ms=kafka.session_timeout_ms,
                                         heartbeat_interval_ms=max(1000, kafka.session_timeout_ms // 4))
        producer = await self.shared.start()
        for topic in (*self.output_topics(), self.topics.requests):
            self.partitions[topic] = len(await producer.partitions_for(topic))
        self.consumer.subscribe([self.topics.requests], listener=self._listener())
        await self.consumer.start()

    def _listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    async def broker_reachable(self, timeout_s: float = 2.0) -> bool:
        """True if the producer holds, or can open within `timeout_s`, a connection to a broker
        (readiness: without one nothing can be consumed, published or committed)."""
        if self.producer is None:
            return False
        client = self.producer.client
        for broker in client.cluster.brokers():
            try:
                if await asyncio.wait_for(client.ready(broker.nodeId), timeout_s):
                    return True
            except (TimeoutError, KafkaError, OSError):
                continue
        return False

    def _should_stop(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def stop(self) -> None:
        """Finish in-flight batches, commit, close (the graceful part of shutdown)."""
        try:
            await self.finish_in_flight()
        finally:
            if self.consumer is not None:
                await self.consumer.stop()
            await self.shared.stop()
            self.metrics.kafka_up.set(0)

    async def close_now(self, timeout_s: float = CLOSE_NOW_TIMEOUT_S) -> None:
        """The grace period is over: drop what is in flight (it is served again from the committed
        offsets), leave the consumer group (so the partitions move to other replicas at once, not
        after the session timeout) and close. Never raises for a broker problem."""
        await self._cancel_in_flight()
        if self.consumer is not None:
            try:
                await asyncio.wait_for(self.consumer.stop(), timeout_s)  # sends LeaveGroup
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("could not leave the consumer group cleanly (%s)", type(exc).__name__)
        if self.producer is not None:
            await close_producer(self.producer, min(timeout_s, 2.0))
        self.metrics.kafka_up.set(0)

    async def _cancel_in_flight(self) -> None:
        tasks = [t for t, _ in self._in_flight]
        self._in_flight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the loop --------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and process until `stopping` is set. Raises what a batch met that is a defect in
        our own code (not the broker's or the network's doing): retrying it cannot help."""
        assert self.consumer is not None  # noqa: S101 - start() is the caller's contract
        self._stopping = stopping
        batching = self.config.batching
        while not stopping.is_set():
            await self._respect_bounds(batching.max_in_flight_batches)
            self._raise_fatal()
            if stopping.is_set():
                break
            fetched = await self.consumer.getmany(timeout_ms=100, max_records=self.config.kafka.max_poll_records)
            if fetched:
                offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
                task = asyncio.get_running_loop().create_task(self._process(fetched))
                self._in_flight.append((task, offsets))
            if self._commit_in_background():
                await self._settle_commits()
                await self._rewind()
            self._raise_fatal()
            await self._update_lag()

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _respect_bounds(self, max_in_flight: int) -> None:
        """Backpressure: wait while too many batches are in flight or model queues are full (but not
        once stopping: shutdown waits for them within its grace period)."""
        paused = False
        while self._in_flight and (len(self._in_flight) >= max_in_flight or not self._queues_have_room()):
            if self._should_stop() or self._fatal is not None:
                return
            if not paused:
                self.metrics.paused.inc()
                paused = True
            await asyncio.wait([self._in_flight[0][0]], timeout=0.05)
            # committing is not waited for here either: the next fetch should not queue behind it
            if self._commit_in_background():
                await self._settle_commits()
                await self._rewind()

    def _queues_have_room(self) -> bool:
        return all(b.admits(1) for b in self.dataplane.batchers.values())

    def _take_completed(self) -> bool:
        """Move the offsets of the completed prefix of in-flight batches (order preserved) to the
        ones to commit; True if a batch in that prefix failed to publish (the caller rewinds). A
        batch that failed for another reason (a defect) stops the taking and is kept in `_fatal`."""
        while self._in_flight and self._in_flight[0][0].done():
            task, offsets = self._in_flight[0]
            if task.cancelled():
                log.error("a batch was cancelled before it was published; rewinding to the last committed offsets")
                return True
            exc = task.exception()
            if isinstance(exc, PublicationFailed):
                log.error("a batch could not be published (%s); rewinding to the last committed offsets", exc)
                self._failed_producer = exc.producer
                return True
            if exc is not None:
                if self._fatal is None:
                    self._fatal = exc
                return False
            self._in_flight.popleft()
            self._to_commit.update(offsets)
        return False

    def _commit_in_background(self) -> bool:
        """Start committing what completed without holding up the next fetch (a commit is a broker
        round trip; awaiting it in the fetch loop added it to every request's latency). Commits
        stay in order: one committer at a time, each taking the newest offsets. True if a batch
        failed (the caller settles the commits and rewinds)."""
        failed = self._take_completed()
        if self._to_commit and (self._committer is None or self._committer.done()):
            self._committer = asyncio.get_running_loop().create_task(self._commit_pending())
        return failed

    async def _commit_pending(self, hurry: bool = False) -> None:
        """Commit what is pending, at most once per `kafka.commit_interval_ms` unless hurried
        (each commit is a broker round trip and a write to __consumer_offsets; at thousands of
        small batches a second they cost the gateway and the broker more than the serving)."""
        while self._to_commit:
            if not hurry:
                wait_s = self._last_commit_s + self.config.kafka.commit_interval_ms / 1000 - self.clock()
                if wait_s > 0:
                    self._committer_waiting = True
                    try:
                        await asyncio.sleep(wait_s)
                    finally:
                        self._committer_waiting = False
            offsets, self._to_commit = self._to_commit, {}
            self._last_commit_s = self.clock()
            await self._commit(offsets)

    async def _settle_commits(self) -> None:
        """Wait until everything taken so far is committed (or its commit failed and was logged)."""
        if self._committer is not None and not self._committer.done():
            if self._committer_waiting:
                self._committer.cancel()  # commit now instead of after the interval (nothing taken yet)
            await asyncio.gather(self._committer, return_exceptions=True)
        await self._commit_pending(hurry=True)

    async def _commit_completed(self) -> None:
        """Commit the offsets of the completed prefix of in-flight batches and wait for it (before a
        rebalance hands partitions over, at shutdown, and while fetching is paused)."""
        failed = self._take_completed()
        await self._settle_commits()
        if failed:
            await self._rewind()

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None  # noqa: S101
        assigned = self.consumer.assignment()
        mine = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not mine:
            return
        async with self._commit_lock:
            try:
                await self.consumer.commit(mine)
            except KafkaError as exc:
                # e.g. a rebalance took the partitions: another replica re-processes (at-least-once)
                log.warning("offset commit failed (%s); those requests will be served again", type(exc).__name__)

    async def _rewind(self) -> None:
        """After a failed batch: drop later batches' results and re-read from the committed offsets."""
        assert self.consumer is not None  # noqa: S101
        await self._cancel_in_flight()
        failed, self._failed_producer = self._failed_producer, None
        # nothing after the failed batch may be committed before it is served again: keep trying to
        # seek back (and to get a working producer) for as long as the broker is away
        while True:
            try:
                # the failed producer's sequence numbers may be ahead of the broker's (see shared_producer);
                # a rewind without a failed producer (a cancelled batch) keeps the healthy one
                if failed is not None:
                    await self.shared.replace(failed)
                failed = None
                for tp in self.consumer.assignment():
                    committed = await self.consumer.committed(tp)
                    if committed is None:
                        await self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek(tp, committed)
                break
            except (KafkaError, OSError, TimeoutError) as exc:
                if self._should_stop():
                    return  # shutting down: the next owner starts at the committed offsets
                log.warning("cannot rewind yet (%s); retrying in 1s", type(exc).__name__)
                await asyncio.sleep(1.0)
        await asyncio.sleep(0.5)  # let the broker recover before trying again

    async def finish_in_flight(self) -> None:
        """Wait for every in-flight batch and commit what completed."""
        if self._in_flight:
            await asyncio.wait([t for t, _ in self._in_flight])
        await self._commit_completed()

    async def _update_lag(self) -> None:
        """Once a second: high watermark minus our position, per assigned partition."""
        now = self.clock()
        if now - self._last_lag_s < 1.0 or self.consumer is None:
            return
        self._last_lag_s = now
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self.consumer.position(tp)
            except KafkaError:
                continue  # being reassigned; the next tick reports it
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))

    # -- one fetched batch -----------------------------------------------------------------------

    async def _process(self, fetched: dict[TopicPartition, list]) -> None:
        """At-least-once: serve everything fetched, publish through the shared idempotent producer.
        Raises PublicationFailed when any output was not delivered (after remembering refusals)."""
        with self.shared.holding() as producer:  # not closed by a replacement before its records are acknowledged
            await self._process_with(fetched, producer)

    async def _process_with(self, fetched: dict[TopicPartition, list], producer: AIOKafkaProducer) -> None:
        # batches are served concurrently but handed to the producer in fetch order, so the
        # answers of one partition are appended in the order its requests were (the producer
        # keeps per-partition order from there on)
        previous, handed_over = self._last_handed_over, asyncio.Event()
        self._last_handed_over = handed_over
        traced: BatchTrace | None = None
        try:
            records = [record for batch in fetched.values() for record in batch]
            if self.tracing.enabled:
                traced = BatchTrace(self.tracing, len(records), self.clock)
            out: OutboundBatches[LoopSource] = OutboundBatches(producer, self.partitions, self.shared.limits)
            await self._serve_records(records, out, traced)
            if previous is not None:
                await previous.wait()
            if traced is not None:
                traced.producing(out.count)
            try:
                sent = await out.send()
            except Exception as exc:
                if is_delivery_error(exc):
                    raise PublicationFailed(producer, exc) from exc
                raise
        except BaseException as exc:
            if traced is not None:
                traced.end(exc)  # never raises, so `exc` is what propagates
            raise
        finally:
            handed_over.set()
        try:
            failures = await delivered(sent)
        except BaseException as exc:
            # the spans end even when this task is cancelled waiting (shutdown, a rebalance)
            if traced is not None:
                traced.end(exc)
            raise
        if traced is not None:
            traced.end(failed_batches=len(failures))
        if failures:
            self._learn_refusals(failures)
            raise PublicationFailed(producer, failures[0][1])

    def _learn_refusals(self, failures: list[tuple[Sent[LoopSource], BaseException]]) -> None:
        """Remember the batches the broker refused for good, by their requests' positions (the
        replay after the rewind dead-letters them, or splits a batch of several to find which)."""
        now = self.clock()
        for sent, exc in failures:
            found = refusal(exc)
            if found is None:
                continue
            positions = [_position(s) for s in sent.sources if s is not None]
            self.memo.learn(sent.topic, positions, found, now)
            if found.reason == "output_too_large":
                self.shared.learn_too_large(sent.topic, sent.size, len(sent.sources))
            log.warning("the broker refused a batch of %d records for %s[%d] for good (%s); %s", len(sent.sources),
                        sent.topic, sent.partition, found.error,
                        "the topic is skipped for a while" if found.scope == "topic"
                        else "its requests are dead-lettered" if len(set(positions)) == 1
                        else "its records are sent one per batch to find the refused one")

    async def _serve_records(self, records: list, out: OutboundBatches[LoopSource], traced: BatchTrace | None = None) -> None:
        """Decode, serve and add every resulting prediction, shadow prediction and dead-letter to
        `out`. `traced`: the batch's spans when tracing (kafka_trace.BatchTrace)."""
        routes = self.dataplane.routes
        decoded = decode_records(records, routes, self.config.max_event_bytes, clock=self.clock,
                                 reply_allowed=self._reply_allowed)
        if traced is not None:
            traced.consumed(decoded.count, len(decoded.dead))
        if decoded.reply_topics:
            await self._learn_reply_topics(decoded.reply_topics, out.producer)
        self.processed += decoded.count
        guarded = bool(self.memo)  # refusals remembered: check each request against them (slow path)
        for record, reason, message in decoded.dead:
            self.metrics.deadletters.labels(record.topic, reason).inc()
            self._dead_letter(out, (record.topic, record.partition, record.offset), record.key, message, reason,
                              record.value, guarded, from_kafka_headers(record.headers) if record.headers else None)
        route_names = list(decoded.by_route)
        serve = self.dataplane.serve if traced is None else traced.serve(self.dataplane.serve)
        answers_per_route = await asyncio.gather(*(serve(name, decoded.by_route[name])
                                                   for name in route_names), return_exceptions=True)
        for position, (route_name, answers) in enumerate(zip(route_names, answers_per_route)):
            if isinstance(answers, BaseException):
                # a bug, not bad input: re-reading would fail again forever, so dead-letter these
                # requests with the reason (nothing is lost: they can be replayed from there)
                log.error("internal error while serving route %s; its %d requests go to the dead-letter topic",
                          route_name, len(decoded.by_route[route_name]), exc_info=answers)
                message = f"internal error while serving route {route_name!r}: {type(answers).__name__}: {answers}"
                answers_per_route[position] = [Answer(error=("internal_error", message[:500]))
                                               for _ in decoded.by_route[route_name]]
        same_partitioning = self.partitions[self.topics.requests] == self.partitions[self.topics.predictions]
        predictions_topic = self.topics.predictions
        shadows_topic = self.topics.shadow_predictions
        limits = out.limits or {}
        prediction_limit = limits.get(predictions_topic, sys.maxsize)
        shadow_limit = limits.get(shadows_topic, sys.maxsize)
        now = self.clock()
        at = cloudevents.ce_time()  # the CloudEvents time of the batch's outputs (formatted once)
        for route_name, answers in zip(route_names, answers_per_route):
            assert not isinstance(answers, BaseException)  # noqa: S101 - replaced by error answers above
            pendings = decoded.by_route[route_name]
            ce_source = cloudevents.source("gateway", route_name)
            enabled = self.config.kafka.cloudevents  # off: the trace context only (cloudevents.OFF)
            ce_prediction = cloudevents.headers_for("prediction", ce_source, enabled)
            ce_shadow = cloudevents.headers_for("shadow-prediction", ce_source, enabled)
            counts: collections.Counter[tuple[str, str]] = collections.Counter()
            shadow_counts: collections.Counter[str] = collections.Counter()
            latencies = []
            for pending, answer in zip(pendings, answers):
                key = pending.request_id.encode()
                partition = pending.partition if same_partitioning and pending.key == key else None
                prediction = answer.prediction
                # the request's trace context goes on with everything it causes (one truth test
                # when, as usually, the request has no headers)
                trace = from_kafka_headers(pending.headers) if pending.headers else None
                if trace is not None and traced is not None:
                    trace = traced.request(trace, pending, route_name, prediction)
                if prediction is not None:
                    value = dumps(prediction)
                    shadows = answer.shadows
                    shadow_values = [dumps(shadow) for shadow in shadows] if shadows else None
                    error = None
                    alone = False
                    # one length test per output on the hot path; the rest only when something is off
                    if (guarded or len(value) + len(key) > prediction_limit
                            or (shadow_values and max(map(len, shadow_values)) + len(key) > shadow_limit)):
                        error = self._refused_output(pending, len(key), value, shadow_values, out)
                        alone = guarded and _position(pending) in self.memo.isolated
                    if error is None:
                        # CloudEvents headers (+ the trace context): the reply is the same event
                        headers = ce_prediction(key, at, trace)
                        out.add(predictions_topic, key, value, partition, pending, alone, headers)
                        counts[(prediction["arm"], "ok")] += 1
                        latencies.append(now - pending.received_s)
                        if pending.reply_to is not None:
                            self._reply(out, pending.reply_to, pending, key, value, alone, headers)
                        if shadows and shadow_values:
                            for shadow, shadow_value in zip(shadows, shadow_values):
                                arm = shadow["arm"]
                                out.add(shadows_topic, key, shadow_value, partition, pending, alone,
                                        ce_shadow(b"%s:%s" % (arm.encode(), key), at, trace))
                                shadow_counts[arm] += 1
                        continue
                else:
                    error = answer.error or ("inference_failed", "no answer")
                reason, message = error
                counts[("-", "error")] += 1
                self.metrics.errors.labels(route_name, reason, "kafka").inc()
                self.metrics.deadletters.labels(pending.topic, reason).inc()
                self._dead_letter(out, _position(pending), pending.key, message, reason, pending.raw, guarded, trace,
                                  route_name)
            for arm, count in shadow_counts.items():
                self.metrics.shadow_predictions.labels(route_name, arm).inc(count)
            for (arm, status), count in counts.items():
                self.metrics.requests.labels(route_name, arm, status, "kafka").inc(count)
            self.metrics.end_to_end_seconds.observe_many(latencies, route_name, "kafka")

    async def _learn_reply_topics(self, topics: set[str], producer: AIOKafkaProducer) -> None:
        """Look up the partition counts of reply topics not seen before (one metadata request each,
        bounded in time; a topic the broker does not know is skipped for REPLY_RETRY_S)."""
        known = self._reply_partitions
        now = self.clock()
        todo = [t for t in topics if not isinstance(known.get(t), int) and known.get(t, 0.0) <= now]
        if not todo:
            return
        if len(known) + len(todo) > REPLY_TOPICS_MAX:
            known.clear()
        for topic in todo:
            try:
                partitions = await asyncio.wait_for(producer.partitions_for(topic), REPLY_METADATA_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                partitions = None
                log.warning("reply topic %s is unknown to the broker (%s); its replies are skipped for %.0fs "
                            "(the predictions topic has them)", topic, type(exc).__name__, REPLY_RETRY_S)
            known[topic] = len(partitions) if partitions else now + REPLY_RETRY_S

    def _reply(self, out: OutboundBatches[LoopSource], topic: str, pending: SourcedPending, key: bytes, value: bytes, alone: bool,
               trace: TraceHeaders | None = None) -> None:
        """Add the prediction for the request's reply topic `topic` too (the same bytes, keyed by request_id)."""
        partitions = self._reply_partitions.get(topic)
        if not isinstance(partitions, int):
            self.metrics.replies_skipped.labels("unknown_topic").inc()
            return
        if self.memo and self.memo.closed(topic, self.clock()) is not None:
            self.metrics.replies_skipped.labels("refused").inc()
            return
        try:
            out.add(topic, key, value, partition_for(key, partitions), pending, alone, trace)
        except OutputRefused:
            self.metrics.replies_skipped.labels("refused").inc()

    def _refused_output(self, pending: SourcedPending, key_bytes: int, value: bytes, shadow_values: list[bytes] | None,
                        out: OutboundBatches[LoopSource]) -> tuple[str, str] | None:
        """(reason, message) when this request's outputs must not be sent (too large for their
        topic, refused before, or their topic closed to us); None when they may go. All or nothing:
        a request whose prediction or any shadow cannot be published is dead-lettered whole."""
        predictions_topic, shadows_topic = self.topics.predictions, self.topics.shadow_predictions
        outputs = [(predictions_topic, value)] + [(shadows_topic, v) for v in shadow_values or ()]
        memo = self.memo
        found = None
        if memo:
            known = memo.refused.get(_position(pending))
            if known is not None and known[0] != self.topics.deadletter:
                why = f"the broker refused this request's output for {known[0]}: {known[1].error}"
                found = (known[0], known[1].reason, why)
            for topic in dict.fromkeys(topic for topic, _ in outputs):
                closed = memo.closed(topic, self.clock()) if found is None else None
                if closed is not None:
                    found = (topic, closed.reason, f"{topic} refuses us for now: {closed.error}")
        if found is None:
            for topic, output in outputs:
                too_large = out.too_large(topic, len(output) + key_bytes)
                if too_large is not None:
                    kind = "prediction" if topic == predictions_topic else "shadow prediction"
                    found = (topic, "output_too_large", f"the {kind} is too large to publish: {too_large}")
                    break
        if found is None:
            return None
        self.metrics.output_refusals.labels(found[0], found[1]).inc()
        return found[1], found[2]

    def _dead_letter(self, out: OutboundBatches[LoopSource], position: Position, key: bytes | None, message: str, reason: str,
                     raw: bytes | None, guarded: bool, trace: TraceHeaders | None = None,
                     route: str | None = None) -> None:
        """Add a dead letter for the request at `position` - unless its dead letter was refused for
        good before or the dead-letter topic refuses us: then it is dropped and counted (a dead
        letter is never retried in a loop). Its CloudEvents id is the position (the same on a
        replay); its source names `route` when the request had a known one."""
        dead_topic = self.topics.deadletter
        alone = False
        if guarded:
            memo = self.memo
            known = memo.refused.get(position)
            closed = memo.closed(dead_topic, self.clock())
            if closed is not None or (known is not None and known[0] == dead_topic):
                found = closed if closed is not None else known[1]  # type: ignore[index]
                self._dead_letter_failed(found.reason, found.error)
                return
            alone = position in memo.isolated
        value = dead_letter_value(message, reason, position[0], position[1], position[2], raw)
        if out.too_large(dead_topic, len(value) + len(key or b"")) is not None:
            # the position says where the whole request is; keep what fits of its bytes
            limit = (out.limits or {}).get(dead_topic, 0)
            value = dead_letter_value(message[:1000], reason, position[0], position[1], position[2], raw,
                                      payload_chars=max(0, (limit - 4096) // 6))
        headers = cloudevents.headers("dead-letter", cloudevents.source("gateway", route),
                                      f"{position[0]}/{position[1]}/{position[2]}".encode(), trace,
                                      self.config.kafka.cloudevents)
        try:
            out.add(dead_topic, key, value, None, position, alone, headers)
        except OutputRefused as exc:
            self._dead_letter_failed(exc.reason, str(exc))

    def _dead_letter_failed(self, reason: str, detail: str) -> None:
        topic = self.topics.deadletter
        self.metrics.deadletter_failures.labels(topic, reason).inc()
        if (topic, reason) not in self._dead_letter_logged:
            self._dead_letter_logged.add((topic, reason))
            log.error("a dead letter could not be written to %s (%s: %s); such dead letters are dropped and counted "
                      "in banditgate_deadletter_failures_total (logged once)", topic, reason, detail)
