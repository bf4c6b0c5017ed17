"""The gateway's one idempotent producer, shared by the Kafka loop, the sidecar publisher and
`POST /v2/outcomes`, and replaced after a failed publication by whichever of them notices first.

Why replace it: a send that failed (the broker went away mid-request, a batch expired while its
partition had no leader, the broker refused a batch) leaves the idempotent producer's sequence
number for that partition ahead of what the broker holds; aiokafka has no KIP-360 epoch bump, so
every later send to that partition fails with OutOfOrderSequenceNumber. A new producer gets a new
producer id and starts its sequences afresh. Before this was shared, only the Kafka loop replaced
it, so a gateway serving only REST/gRPC lost every later prediction and answered 500 on
`/v2/outcomes` until restarted.

Also here: what each output topic accepts (`limits`, from the broker's `max.message.bytes` per
topic, or `kafka.max_message_bytes`), so that an output too large is refused before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from banditgate.config import KafkaConfig
from banditgate.connections import kafka_client_kwargs
from gateway.transport.delivery import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RECORD_OVERHEAD_BYTES,
    batch_bytes,
    record_limit,
)
from gateway.transport.kafka_batches import retrieve_exception

log = logging.getLogger("banditgate.kafka")

CLOSE_TIMEOUT_S = 5.0
"""How long a replaced producer may take to flush what it still holds before it is closed hard."""


def _retrieve_internal_errors(producer: AIOKafkaProducer) -> None:
    """A failed producer's own futures that nobody awaits (its batches' drain waiters, its
    transaction waiter) carry the error too; retrieve it, or asyncio logs "Future exception was
    never retrieved" with a traceback per failure. Private to aiokafka 0.12-0.14 (looked up with
    getattr: a later version without them only brings the log lines back)."""
    accumulator = getattr(producer, "_message_accumulator", None)
    batches = [batch for queue in getattr(accumulator, "_batches", {}).values() for batch in queue]
    batches += list(getattr(accumulator, "_pending_batches", ()))
    futures = [getattr(batch, "_drain_waiter", None) for batch in batches]
    manager = getattr(producer, "_txn_manager", None)
    if manager is not None and getattr(manager, "transactional_id", None):
        futures.append(manager.wait_for_transaction_end())
    for future in futures:
        if isinstance(future, asyncio.Future):
            future.add_done_callback(retrieve_exception)


async def close_producer(producer: AIOKafkaProducer, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Stop `producer`, giving its pending batches `timeout_s` to be delivered; past that (the
    broker is away) they are failed so that the producer's background sender and connections do
    not outlive it. Never raises for a broker problem."""
    _retrieve_internal_errors(producer)
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait([stopping], timeout=timeout_s)
    if not done:
        # stop() waits for the accumulator to flush, which never happens while the broker is away;
        # failing the pending batches lets it finish (aiokafka has no public "close now")
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None and hasattr(accumulator, "fail_all"):
            accumulator.fail_all(KafkaConnectionError("producer closed after a failed publication"))
            _retrieve_internal_errors(producer)
        done, _ = await asyncio.wait([stopping], timeout=timeout_s)
        if not done:
            stopping.cancel()
            log.warning("a replaced producer did not close within %.0fs; abandoned", 2 * timeout_s)
    if stopping.done() and not stopping.cancelled() and stopping.exception() is not None:
        log.warning("a replaced producer did not close cleanly (%s)", type(stopping.exception()).__name__)


async def topic_limits(kafka: KafkaConfig, topics: list[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Each topic's `max.message.bytes` as the broker reports it (DescribeConfigs); topics it does
    not report (no permission to describe, an old broker) are missing from the result."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(**kafka_client_kwargs(kafka), request_timeout_ms=int(timeout_s * 1000))
    found: dict[str, int] = {}
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        resources = [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
                     for topic in dict.fromkeys(topics)]
        for response in await asyncio.wait_for(admin.describe_configs(resources), timeout_s):
            for error_code, _message, _type, name, entries in response.resources:
                for entry in entries if error_code == 0 else ():
                    if entry[0] == "max.message.bytes" and str(entry[1]).isdigit():
                        found[name] = int(entry[1])
    finally:
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await admin.close()
    return found


class SharedProducer:
    """Holds the current producer; `replace(failed)` swaps it for a fresh one exactly once per failure."""

    def __init__(self, kafka: KafkaConfig, on_replaced: Callable[[], None] | None = None) -> None:
        self.kafka = kafka
        self.producer: AIOKafkaProducer | None = None
        self.limits: dict[str, int] = {}
        """Output topic -> the largest key + value (bytes) it accepts."""
        self.batch_bytes = batch_bytes({})
        self.on_replaced = on_replaced
        self._lock = asyncio.Lock()
        self._users: dict[int, int] = {}
        """id(producer) -> how many publications are using it now (see `holding`)."""
        self._retired: dict[int, AIOKafkaProducer] = {}
        """Replaced producers still in use: closed when their last user lets go."""
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def holding(self) -> Iterator[AIOKafkaProducer]:
        """The current producer, not closed by a replacement until the `with` block ends. A
        publication that captured the producer (the Kafka loop's batch, a sidecar flush) holds it
        until its records are acknowledged: before, another user's replacement closed it under
        them, their batch failed with ProducerClosed and the loop rewound and republished
        predictions already delivered (duplicates)."""
        producer = self.producer
        key = id(producer)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield producer
        finally:
            left = self._users[key] - 1
            if left:
                self._users[key] = left
            else:
                del self._users[key]
                retired = self._retired.pop(key, None)
                if retired is not None:
                    self._close_later(retired)

    def _close_later(self, producer: AIOKafkaProducer) -> None:
        task = asyncio.get_running_loop().create_task(close_producer(producer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def discover_limits(self, topics: list[str]) -> None:
        """Set `limits` for `topics`: `kafka.max_message_bytes` when configured, else what the broker
        says each topic accepts (Kafka's default where it does not say; one warning)."""
        configured = self.kafka.max_message_bytes
        if configured is not None:
            sizes = dict.fromkeys(topics, configured)
        else:
            try:
                sizes = await topic_limits(self.kafka, topics)
            except (KafkaError, OSError, TimeoutError) as exc:
                sizes = {}
                log.warning("could not ask the broker how large a record each output topic accepts (%s)",
                            type(exc).__name__)
            missing = [t for t in dict.fromkeys(topics) if t not in sizes]
            if missing:
                log.warning("the broker did not say how large a record %s accept(s); assuming Kafka's default of "
                            "%d bytes (set kafka.max_message_bytes to say)", ", ".join(missing),
                            DEFAULT_MAX_MESSAGE_BYTES)
            sizes = {t: sizes.get(t, DEFAULT_MAX_MESSAGE_BYTES) for t in topics}
        self.limits = {t: record_limit(size, self.kafka.max_request_bytes) for t, size in sizes.items()}
        self.batch_bytes = batch_bytes(self.limits)

    def learn_too_large(self, topic: str, refused_bytes: int, records: int) -> None:
        """The broker refused a `refused_bytes` batch of `records` records for `topic` as too large:
        its real limit is below what we believed (kafka.max_message_bytes too high, or the topic
        changed since start). Records that large are refused before sending from now on, and the
        next producer (every refusal replaces it) builds batches of at most half that size, so a
        topic that takes smaller batches than ours stops refusing after a few halvings."""
        limit = record_limit(refused_bytes - 1, self.kafka.max_request_bytes)  # room for the headers too
        if limit < self.limits.get(topic, limit + 1):
            self.limits[topic] = limit
            log.warning("the broker refused a %d-byte batch for %s as too large; outputs over %d bytes for it are "
                        "dead-lettered before sending from now on", refused_bytes, topic, limit)
        if records > 1 and refused_bytes // 2 < self.batch_bytes:
            self.batch_bytes = max(RECORD_OVERHEAD_BYTES, refused_bytes // 2)  # the first record always fits
            log.warning("producer batches are cut to %d bytes (the broker refused a batch of %d records)",
                        self.batch_bytes, records)

    def new_producer(self) -> AIOKafkaProducer:
        kafka = self.kafka
        return AIOKafkaProducer(**kafka_client_kwargs(kafka), enable_idempotence=True, acks="all",
                                linger_ms=kafka.linger_ms, max_batch_size=self.batch_bytes,
                                max_request_size=kafka.max_request_bytes, request_timeout_ms=kafka.request_timeout_ms)

    async def start(self) -> AIOKafkaProducer:
        producer = self.new_producer()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self.producer = producer
        return producer

    async def replace(self, failed: AIOKafkaProducer | None) -> AIOKafkaProducer:
        """The producer to use after `failed` failed a publication: a fresh one, unless someone
        replaced `failed` already (then theirs). Raises KafkaError or OSError when the broker cannot
        be reached (the caller tries again later)."""
        async with self._lock:
            current = self.producer
            if current is not None and current is not failed:
                return current
            fresh = self.new_producer()
            try:
                await asyncio.wait_for(fresh.start(), self.kafka.request_timeout_ms / 1000)
            except BaseException:
                await close_producer(fresh, 1.0)
                raise
            self.producer = fresh
        log.info("producer replaced after a failed publication (new producer id)")
        if self.on_replaced is not None:
            self.on_replaced()
        if current is not None:
            if self._users.get(id(current)):
                self._retired[id(current)] = current  # closed when its last user lets go
            else:
                await close_producer(current)
        return fresh

    async def stop(self) -> None:
        for retired in list(self._retired.values()):
            self._close_later(retired)
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()
