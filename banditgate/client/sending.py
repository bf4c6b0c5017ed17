"""Fire-and-forget sending at volume: records appended to aiokafka batch builders, one delivery
future per batch instead of one per record.

Why: ``AIOKafkaProducer.send()`` per record costs a partitioner call (murmur2 in Python), a
future and an accumulator lookup per record - together more than the whole request event
costs to build (docs/client.md, "Send throughput"). Here a record is one ``append`` to the open
builder (aiokafka's C record builder); a full builder - or one open for `linger_s` - goes to the
producer with ``send_batch``.

Partitions: each batch goes to the next partition of the topic in turn (sticky, as Kafka's
partitioner does for keyless records, KIP-480), not by a hash of the record's key. The key is
still the request_id; nothing reads a meaning into a request's partition (the gateway routes by
the event, sticky routes by `unit_id`; the predictions, not the requests, are co-partitioned
with outcomes).

Bounded: at most `max_queued` records wait in builders or in flight; `add` waits for deliveries
beyond that. Delivery failures (after aiokafka's own retries) are counted; ``flush()`` raises
them once, so a fire-and-forget caller learns that requests were lost without awaiting each.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer

from banditgate.client.errors import ClientError


class BatchSender:
    """Per-topic batching for `KafkaClient.send` (one event loop; not thread-safe)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: list[int], *, linger_s: float,
                 max_queued: int) -> None:
        if not partitions:
            raise ValueError(f"topic {topic!r} has no partitions")
        if max_queued < 1 or linger_s < 0:
            raise ValueError("max_queued must be >= 1 and linger_s >= 0")
        self._producer = producer
        self.topic = topic
        self._partitions = list(partitions)
        self._next = 0
        self._linger_s = linger_s
        self.max_queued = max_queued
        self._builder: Any = None  # Any: aiokafka's BatchBuilder is untyped
        self._in_builder = 0
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()  # Any: aiokafka's delivery metadata
        self._tasks: set[asyncio.Task[None]] = set()
        self.queued = 0
        """Records appended and not yet acknowledged or failed (<= max_queued)."""
        self.delivered = 0
        """Records the broker acknowledged."""
        self.failed = 0
        """Records whose batch failed for good (aiokafka's retries exhausted)."""
        self._failed_unreported = 0
        self._last_error: BaseException | None = None

    def try_add(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
        """Queue one record without waiting, if that needs no wait: False when `add` must do it
        (`max_queued` reached, or the open builder is full). The hot path of `send`."""
        if self.queued >= self.max_queued:
            return False
        builder = self._builder
        if builder is None:
            builder = self._open()
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            return False
        self._in_builder += 1
        self.queued += 1
        return True

    async def add(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Queue one record; waits only when `max_queued` records are outstanding or a full
        builder is handed to the producer."""
        if self.queued >= self.max_queued:
            await self._wait_for_room()
        while (self._builder if self._builder is not None else self._open()).append(key=key, value=value, timestamp=None, headers=headers) is None:
            # full: hand it over; the loop appends to a fresh builder (or to one a concurrent add
            # opened while this one waited), which takes any one record - aiokafka lets the first
            # record of a batch exceed the batch size
            await self._submit()
        self._in_builder += 1
        self.queued += 1

    async def flush(self) -> None:
        """Hand the open builder over and wait for every outstanding delivery; raise ClientError
        (``send_failed``) when records failed since the last flush."""
        await self._submit()
        while self._tasks or self._in_flight:
            await asyncio.wait([*self._tasks, *self._in_flight])
        if self._failed_unreported:
            lost, self._failed_unreported = self._failed_unreported, 0
            raise ClientError("send_failed", f"{lost} sent requests were not delivered to {self.topic}: "
                                             f"{self._last_error!r}")

    def close(self) -> None:
        """Drop the open builder's records (a caller that wants them delivered flushes first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._builder = None
        self.queued -= self._in_builder
        self._in_builder = 0

    # -- internals -------------------------------------------------------------------------------

    def _open(self) -> Any:  # Any: aiokafka's BatchBuilder is untyped
        self._builder = self._producer.create_batch()
        self._timer = asyncio.get_running_loop().call_later(self._linger_s, self._lingered)
        return self._builder

    def _lingered(self) -> None:
        self._timer = None
        if self._builder is not None:
            task = asyncio.get_running_loop().create_task(self._submit())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _submit(self) -> None:
        builder, count = self._builder, self._in_builder
        if builder is None:
            return
        # taken before the await: a concurrent add opens a builder of its own
        self._builder, self._in_builder = None, 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if count == 0:
            return
        builder.close()
        partition = self._partitions[self._next % len(self._partitions)]
        self._next += 1
        try:
            future = await self._producer.send_batch(builder, self.topic, partition=partition)
        except Exception as exc:  # noqa: BLE001 - closed producer, accumulator timeout: the batch is lost, counted
            self._settle(count, exc)
            return
        self._in_flight.add(future)
        future.add_done_callback(partial(self._delivered, count))

    def _delivered(self, count: int, future: asyncio.Future[Any]) -> None:  # Any: aiokafka's delivery metadata
        self._in_flight.discard(future)
        error = None if not future.cancelled() and future.exception() is None else (
            future.exception() if not future.cancelled() else asyncio.CancelledError())
        self._settle(count, error)

    def _settle(self, count: int, error: BaseException | None) -> None:
        self.queued -= count
        if error is None:
            self.delivered += count
            return
        self.failed += count
        self._failed_unreported += count
        self._last_error = error

    async def _wait_for_room(self) -> None:
        while self.queued >= self.max_queued:
            if self._in_builder:
                await self._submit()
            if not self._in_flight and not self._tasks:
                return  # nothing outstanding to wait for (all settled meanwhile)
            await asyncio.wait([*self._tasks, *self._in_flight], return_when=asyncio.FIRST_COMPLETED)
