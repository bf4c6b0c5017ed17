"""The worker's one idempotent producer (dead letters, alerts, join changelog), replaceable.

aiokafka has no KIP-360 epoch bump: once a send of an idempotent producer failed in a way that
broke its sequence (OutOfOrderSequenceNumber, a batch the broker refused for good), or the
producer was fenced or closed, every later send of that producer fails the same way. Retrying on
it looped forever; `replace(failed)` swaps in a fresh producer (a new producer id, sequences
afresh) exactly once per failure, whoever of the worker's writers notices first.

Every writer holds this object and calls `send`, `create_batch`, `send_batch` on it; they go to
the current producer. A replaced producer is stopped in the background (given `CLOSE_TIMEOUT_S`
to deliver what it still holds): a writer whose send was still on it gets that send's result,
or ProducerClosed, which is retriable (it sends again, on the new producer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.producer.message_accumulator import BatchBuilder
    from aiokafka.structs import RecordMetadata

log = logging.getLogger("banditgate.feedback.producer")

CLOSE_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0


class ReplaceableProducer:
    """The current producer (see the module docstring). `factory` makes an unstarted AIOKafkaProducer."""

    def __init__(self, factory: Callable[[], AIOKafkaProducer], start_timeout_s: float = START_TIMEOUT_S,
                 on_replaced: Callable[[], None] | None = None) -> None:
        self._factory = factory
        self._on_replaced = on_replaced
        self._start_timeout_s = start_timeout_s
        self.current: AIOKafkaProducer | None = None
        self.replacements = 0
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        producer = self._factory()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self.current = producer

    def _started(self) -> AIOKafkaProducer:
        current = self.current
        if current is None:
            raise RuntimeError("the feedback producer is used before start()")
        return current

    async def send(self, topic: str, **kwargs: Any) -> asyncio.Future[RecordMetadata]:  # Any: forwarded to aiokafka's AIOKafkaProducer.send (untyped)
        return await self._started().send(topic, **kwargs)

    def create_batch(self) -> BatchBuilder:
        return self._started().create_batch()

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future[RecordMetadata]:
        return await self._started().send_batch(batch, topic, partition=partition)

    async def replace(self, failed: AIOKafkaProducer | None) -> None:
        """Swap `failed` for a fresh producer, unless it was replaced already. Raises KafkaError or
        OSError when the broker cannot be reached (the caller retries, and calls this again)."""
        async with self._lock:
            if failed is None or self.current is not failed:
                return
            fresh = self._factory()
            try:
                await asyncio.wait_for(fresh.start(), self._start_timeout_s)
            except BaseException:
                await _stop(fresh, 1.0)
                raise
            self.current = fresh
            self.replacements += 1
        log.warning("feedback producer replaced after a failure that breaks it (new producer id)")
        if self._on_replaced is not None:
            self._on_replaced()
        task = asyncio.ensure_future(_stop(failed, CLOSE_TIMEOUT_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self.current is not None:
            await self.current.stop()


async def _stop(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop a producer; past `timeout_s` (the broker away) it is abandoned. Never raises for a broker problem."""
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait([stopping], timeout=timeout_s)
    if not done:
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None and hasattr(accumulator, "fail_all"):
            from aiokafka.errors import ProducerClosed

            accumulator.fail_all(ProducerClosed())
        done, _ = await asyncio.wait([stopping], timeout=timeout_s)
        if not done:
            stopping.cancel()
            log.warning("a replaced feedback producer did not close within %.0fs; abandoned", 2 * timeout_s)
            return
    if not stopping.cancelled() and stopping.exception() is not None:
        log.warning("a replaced feedback producer did not close cleanly (%s)", type(stopping.exception()).__name__)
