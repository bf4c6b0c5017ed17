"""The Kafka loop: batched consumption, bounded in-flight work, ordered manual commits.

At-least-once: the offsets of a fetched batch are committed only after every prediction,
shadow prediction and dead-letter it produced is acknowledged by the broker, and only once
every earlier batch is too. When producing fails (broker away past the producer's retries),
the loop rewinds to the last committed offsets and processes again: some predictions may
repeat, none go missing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

import orjson

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from banditgate.config import Config
from banditgate.connections import ConnectionCheckError, check_kafka, describe_kafka_failure, kafka_client_kwargs
from gateway.dataplane import Answer, Dataplane
from gateway.metrics import GatewayMetrics
from gateway.transport.kafka_batches import OutboundBatches
from gateway.transport.kafka_codec import dead_letter_value, decode_records

dumps = orjson.dumps

log = logging.getLogger("banditgate.kafka")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loop: "KafkaLoop") -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # finish what we hold for these partitions and commit it before another replica takes over
        await self.loop.finish_in_flight()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned partitions: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "none")


class KafkaLoop:
    """Consumes requests, serves them through the dataplane, produces predictions (at-least-once)."""

    def __init__(self, config: Config, dataplane: Dataplane, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.dataplane = dataplane
        self.metrics = metrics
        self.clock = clock
        self.topics = config.kafka.topics
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.partitions: dict[str, int] = {}
        self._in_flight: collections.deque[tuple[asyncio.Task, dict[TopicPartition, int]]] = collections.deque()
        self._commit_lock = asyncio.Lock()
        self._to_commit: dict[TopicPartition, int] = {}
        """Offsets whose batches are delivered, not yet committed (the committer takes them)."""
        self._committer: asyncio.Task | None = None
        self._last_handed_over: asyncio.Event | None = None
        self.on_new_producer: list[Callable[[AIOKafkaProducer], None]] = []
        """Called with the new producer after a restart (the sidecar publisher shares it)."""
        self._last_lag_s = 0.0
        self._last_commit_s = float("-inf")
        self._committer_waiting = False
        """True while the committer waits out the commit interval (it holds no offsets then)."""
        self.processed = 0

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
            for client in (self.consumer, self.producer):
                if client is not None:
                    await client.stop()
            raise ConnectionCheckError(describe_kafka_failure(kafka, kafka.bootstrap_servers, exc)) from None
        self.metrics.kafka_up.set(1)

    async def _start_clients(self) -> None:
        kafka = self.config.kafka
        common = kafka_client_kwargs(kafka)
        self.producer = self._new_producer()
        self.consumer = AIOKafkaConsumer(**common, group_id=kafka.group_id, enable_auto_commit=False,
                                         auto_offset_reset="earliest", isolation_level="read_committed",
                                         fetch_max_wait_ms=kafka.fetch_max_wait_ms, fetch_min_bytes=kafka.fetch_min_bytes,
                                         max_partition_fetch_bytes=4 * 1024 * 1024,
                                         fetch_max_bytes=32 * 1024 * 1024,
                                         session_timeout_ms=kafka.session_timeout_ms,
                                         heartbeat_interval_ms=max(1000, kafka.session_timeout_ms // 4))
        await self.producer.start()
        for topic in (self.topics.predictions, self.topics.shadow_predictions, self.topics.deadletter,
                      self.topics.requests, self.topics.alerts, self.topics.outcomes):
            self.partitions[topic] = len(await self.producer.partitions_for(topic))
        self.consumer.subscribe([self.topics.requests], listener=self._listener())
        await self.consumer.start()

    def _new_producer(self) -> AIOKafkaProducer:
        kafka = self.config.kafka
        return AIOKafkaProducer(**kafka_client_kwargs(kafka), enable_idempotence=True, acks="all",
                                linger_ms=kafka.linger_ms, max_batch_size=512 * 1024,
                                max_request_size=kafka.max_request_bytes, request_timeout_ms=kafka.request_timeout_ms)

    async def _restart_producer(self) -> None:
        """Replace the producer after a failed publication. A send that failed (e.g. the broker went
        away mid-request) can leave the idempotent producer's sequence numbers ahead of what the
        broker holds; aiokafka has no KIP-360 epoch bump, so every later send then fails with
        OutOfOrderSequenceNumber. A new producer gets a new producer id and starts its sequences
        afresh. Raises KafkaError when the broker cannot be reached (the caller tries again later)."""
        fresh = self._new_producer()
        try:
            await fresh.start()
        except BaseException:
            await fresh.stop()
            raise
        old, self.producer = self.producer, fresh
        for hook in self.on_new_producer:
            hook(fresh)
        if old is not None:
            try:
                await asyncio.wait_for(old.stop(), timeout=5.0)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("the replaced producer did not close cleanly (%s)", type(exc).__name__)
        log.info("producer replaced after a failed publication (new producer id)")

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
            except (KafkaError, OSError, asyncio.TimeoutError):
                continue
        return False

    async def stop(self) -> None:
        """Finish in-flight batches, commit, close (the graceful part of shutdown)."""
        try:
            await self.finish_in_flight()
        finally:
            if self.consumer is not None:
                await self.consumer.stop()
            if self.producer is not None:
                await self.producer.stop()
            self.metrics.kafka_up.set(0)

    # -- the loop --------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and process until `stopping` is set."""
        assert self.consumer is not None  # noqa: S101 - start() is the caller's contract
        batching = self.config.batching
        while not stopping.is_set():
            await self._respect_bounds(batching.max_in_flight_batches)
            fetched = await self.consumer.getmany(timeout_ms=100, max_records=self.config.kafka.max_poll_records)
            if fetched:
                offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
                task = asyncio.get_running_loop().create_task(self._process(fetched))
                self._in_flight.append((task, offsets))
            if self._commit_in_background():
                await self._settle_commits()
                await self._rewind()
            await self._update_lag()

    async def _respect_bounds(self, max_in_flight: int) -> None:
        """Backpressure: wait while too many batches are in flight or model queues are full."""
        paused = False
        while self._in_flight and (len(self._in_flight) >= max_in_flight or not self._queues_have_room()):
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
        ones to commit; True if a batch in that prefix failed (the caller rewinds)."""
        while self._in_flight and self._in_flight[0][0].done():
            task, offsets = self._in_flight[0]
            if task.cancelled() or task.exception() is not None:
                error = "cancelled" if task.cancelled() else repr(task.exception())
                log.error("a batch could not be published (%s); rewinding to the last committed offsets", error)
                return True
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
        tasks = [t for t, _ in self._in_flight]
        self._in_flight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # nothing after the failed batch may be committed before it is served again: keep trying to
        # seek back (and to get a working producer) for as long as the broker is away
        while True:
            try:
                await self._restart_producer()
                for tp in self.consumer.assignment():
                    committed = await self.consumer.committed(tp)
                    if committed is None:
                        await self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek(tp, committed)
                break
            except (KafkaError, OSError) as exc:
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
        """At-least-once: serve everything fetched, publish through the shared idempotent producer."""
        assert self.producer is not None  # noqa: S101
        # batches are served concurrently but handed to the producer in fetch order, so the
        # answers of one partition are appended in the order its requests were (the producer
        # keeps per-partition order from there on)
        previous, handed_over = self._last_handed_over, asyncio.Event()
        self._last_handed_over = handed_over
        try:
            records = [record for batch in fetched.values() for record in batch]
            out = OutboundBatches(self.producer, self.partitions)
            await self._serve_records(records, out)
            if previous is not None:
                await previous.wait()
            futures = await out.send()
        finally:
            handed_over.set()
        if futures:
            # wait for every delivery (so none is left with an unretrieved exception), then fail
            for delivered in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(delivered, BaseException):
                    raise delivered

    async def _serve_records(self, records: list, out: OutboundBatches) -> None:
        """Decode, serve and add every resulting prediction, shadow prediction and dead-letter to `out`."""
        routes = self.dataplane.routes
        decoded = decode_records(records, routes, self.config.max_event_bytes, clock=self.clock)
        self.processed += decoded.count
        dead_topic = self.topics.deadletter
        for record, reason, message in decoded.dead:
            self.metrics.deadletters.labels(record.topic, reason).inc()
            out.add(dead_topic, record.key, dead_letter_value(message, reason, record.topic, record.partition,
                                                                    record.offset, record.value))
        route_names = list(decoded.by_route)
        answers_per_route = await asyncio.gather(*(self.dataplane.serve(name, decoded.by_route[name])
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
        now = self.clock()
        for route_name, answers in zip(route_names, answers_per_route):
            pendings = decoded.by_route[route_name]
            counts: collections.Counter[tuple[str, str]] = collections.Counter()
            shadow_counts: collections.Counter[str] = collections.Counter()
            latencies = []
            for pending, answer in zip(pendings, answers):
                key = pending.request_id.encode()
                partition = pending.partition if same_partitioning and pending.key == key else None
                if answer.prediction is not None:
                    out.add(predictions_topic, key, dumps(answer.prediction), partition)
                    counts[(answer.prediction["arm"], "ok")] += 1
                    latencies.append(now - pending.received_s)
                    if answer.shadows:
                        for shadow in answer.shadows:
                            out.add(shadows_topic, key, dumps(shadow), partition)
                            shadow_counts[shadow["arm"]] += 1
                else:
                    reason, message = answer.error or ("inference_failed", "no answer")
                    counts[("-", "error")] += 1
                    self.metrics.errors.labels(route_name, reason, "kafka").inc()
                    self.metrics.deadletters.labels(pending.topic, reason).inc()
                    out.add(dead_topic, pending.key, dead_letter_value(message, reason, pending.topic,
                                                                             pending.partition, pending.offset,
                                                                             pending.raw))
            for arm, count in shadow_counts.items():
                self.metrics.shadow_predictions.labels(route_name, arm).inc(count)
            for (arm, status), count in counts.items():
                self.metrics.requests.labels(route_name, arm, status, "kafka").inc(count)
            self.metrics.end_to_end_seconds.observe_many(latencies, route_name, "kafka")
