"""Publishes prediction events of HTTP/gRPC requests to Kafka in small batches, off the request path.

The caller gets its answer without waiting for the broker; events are flushed every
`flush_interval_s` (or sooner when many are queued). The queue is bounded: when Kafka is away
for long, new events are counted as dropped rather than growing memory without limit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from gateway.transport.kafka_batches import OutboundBatches

log = logging.getLogger("banditgate.publisher")


class PredictionPublisher:
    def __init__(self, producer: AIOKafkaProducer, partitions: dict[str, int], flush_interval_s: float = 0.02,
                 max_queued: int = 100_000, on_drop: Any = None) -> None:
        self.producer = producer
        self.partitions = partitions
        self.flush_interval_s = flush_interval_s
        self.max_queued = max_queued
        self.on_drop = on_drop
        self._queue: list[tuple[str, bytes, bytes]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def publish(self, topic: str, events: list[dict[str, Any]], key_field: str = "request_id") -> None:
        """Queue events for `topic` (keyed by their `key_field`); never blocks."""
        if len(self._queue) + len(events) > self.max_queued:
            self.dropped += len(events)
            if self.on_drop:
                self.on_drop(len(events))
            return
        for event in events:
            self._queue.append((topic, str(event[key_field]).encode(), orjson.dumps(event)))
        if len(self._queue) >= 512:
            self._wakeup.set()

    async def _run(self) -> None:
        while not self._closing or self._queue:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.flush_interval_s)
            except TimeoutError:
                pass
            self._wakeup.clear()
            if self._queue:
                await self._flush()

    async def _flush(self) -> None:
        batch, self._queue = self._queue, []
        out = OutboundBatches(self.producer, self.partitions)
        for topic, key, value in batch:
            out.add(topic, key, value)
        try:
            futures = await out.send()
            await asyncio.gather(*futures)
        except Exception as exc:  # noqa: BLE001 - the producer already retried; count and say so once per batch
            self.dropped += len(batch)
            if self.on_drop:
                self.on_drop(len(batch))
            log.error("could not publish %d sidecar prediction events: %s", len(batch), type(exc).__name__)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
