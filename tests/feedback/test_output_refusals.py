"""KafkaOut and the processor's retry loop against a broker that refuses for good (pure logic: a
fake producer; the real broker's refusal is in test_output_refusals_stack.py).

Before: any KafkaError of a dead letter or alert was retried forever with the same producer, so a
dead letter the broker refused (too large, topic not authorized) held the batch, and every offset
after it, forever; a broken idempotent sequence was retried on the broken producer forever."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    TopicAuthorizationFailedError,
)
from prometheus_client import CollectorRegistry

from feedback.metrics import FeedbackMetrics
from feedback.producer import ReplaceableProducer
from feedback.sinks import KafkaOut


class FakeProducer:
    """Fails each send whose value is in `fail` with the error given there (once, when `once`)."""

    def __init__(self, fail: dict[bytes, BaseException], once: bool = False) -> None:
        self.fail, self.once = fail, once
        self.delivered: list[tuple[str, bytes]] = []
        self.headers: list[list[tuple[str, bytes]] | None] = []
        self.stopped = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        error = self.fail.pop(value, None) if self.once else self.fail.get(value)
        if error is not None:
            future.set_exception(error)
        else:
            self.delivered.append((topic, value))
            self.headers.append(headers)
            future.set_result(None)
        return future


def _metrics() -> FeedbackMetrics:
    return FeedbackMetrics(CollectorRegistry())


async def test_a_refused_dead_letter_is_dropped_counted_and_the_producer_replaced() -> None:
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        made.append(FakeProducer({b"huge": MessageSizeTooLargeError(), b"secret": TopicAuthorizationFailedError()}))
        return made[-1]

    producer = ReplaceableProducer(factory)
    await producer.start()
    metrics = _metrics()
    out = KafkaOut(producer, "dead", "alerts", metrics=metrics)
    pending = [("dead", b"k", b"ok-1"), ("dead", b"k", b"huge"), ("alerts", b"k", b"secret"), ("dead", b"k", b"ok-2")]
    await asyncio.wait_for(out.deliver(pending), 5)  # returns: nothing to send again
    assert pending == []
    assert made[0].delivered == [("dead", b"ok-1"), ("dead", b"ok-2")]
    assert out.refused == 2
    assert metrics.output_refusals.labels("dead", "output_too_large")._value.get() == 1
    assert metrics.output_refusals.labels("alerts", "not_authorized")._value.get() == 1
    assert producer.current is made[1] and producer.replacements == 1  # a refused batch breaks the sequence
    await producer.stop()
    assert made[0].stopped


async def test_a_broken_sequence_replaces_the_producer_and_only_the_failed_message_is_sent_again() -> None:
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        made.append(FakeProducer({b"two": OutOfOrderSequenceNumber()} if not made else {}))
        return made[-1]

    producer = ReplaceableProducer(factory)
    await producer.start()
    out = KafkaOut(producer, "dead", "alerts", metrics=_metrics())
    pending = [("dead", b"k", b"one"), ("dead", b"k", b"two")]
    with pytest.raises(OutOfOrderSequenceNumber):
        await out.deliver(pending)
    assert [message[:3] for message in pending] == [("dead", b"k", b"two")]
    stamped = pending[0][3]  # type: ignore[misc]  # its CloudEvents headers, kept for the retry
    assert producer.current is made[1]
    await out.deliver(pending)
    assert made[1].headers == [stamped]
    assert pending == [] and made[1].delivered == [("dead", b"two")]


async def test_a_retriable_failure_keeps_the_producer() -> None:
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        made.append(FakeProducer({b"one": KafkaConnectionError()}, once=True))
        return made[-1]

    producer = ReplaceableProducer(factory)
    await producer.start()
    out = KafkaOut(producer, "dead", "alerts", metrics=_metrics())
    pending = [("dead", b"k", b"one")]
    with pytest.raises(KafkaConnectionError):
        await out.deliver(pending)
    await out.deliver(pending)
    assert len(made) == 1 and made[0].delivered == [("dead", b"one")]
