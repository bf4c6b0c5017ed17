"""Test helpers over the real broker: produce events, read topics back (bounded in count and time)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from banditgate import cloudevents
from banditgate.events import CLOUDEVENT_TYPES, MAX_ID_CHARS, MAX_NAME_CHARS
from banditgate.tracecontext import MAX_TRACESTATE_CHARS, new_traceparent


def largest_headers() -> list[tuple[str, bytes]]:
    """The longest headers banditgate puts on a record: the longest event name, type and source
    (the feedback worker's, a route name of MAX_NAME_CHARS), a natural id of an arm and a request_id
    of 4-byte characters, a traceparent and a tracestate at their longest."""
    event = max(CLOUDEVENT_TYPES, key=lambda name: (len(name), len(CLOUDEVENT_TYPES[name])))
    trace = [("traceparent", new_traceparent().encode()), ("tracestate", b"k=" + b"v" * (MAX_TRACESTATE_CHARS - 2))]
    natural = b"a" * MAX_NAME_CHARS + b":" + ("\U0001d11e" * MAX_ID_CHARS).encode()
    return cloudevents.headers(event, cloudevents.source("feedback", "r" * MAX_NAME_CHARS), natural, trace)


async def produce(bootstrap: str, topic: str, values: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Produce (key, value) pairs with an idempotent producer; return how many."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    count = 0
    try:
        futures = []
        for key, value in values:
            futures.append(await producer.send(topic, key=key, value=value))
            count += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


async def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0,
                     settle_s: float = 1.0, read_committed: bool = True) -> list[dict]:
    """Read `topic` from the beginning until `expected` JSON values arrived (plus `settle_s` of quiet
    to catch extras) or `timeout_s` passed; return the decoded values."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"reader-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                                isolation_level="read_committed" if read_committed else "read_uncommitted")
    await consumer.start()
    out: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    quiet_until = None
    try:
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            got = [orjson.loads(r.value) for records in batch.values() for r in records]
            out.extend(got)
            if len(out) >= expected:
                if quiet_until is None:
                    quiet_until = loop.time() + settle_s
                elif got:
                    quiet_until = loop.time() + settle_s
                if loop.time() >= quiet_until:
                    break
    finally:
        await consumer.stop()
    return out


def request_event(request_id: str, route: str, row: list[float], **extra: object) -> bytes:
    return orjson.dumps({"request_id": request_id, "route": route, "inputs": {"input": row}, **extra})


async def read_records(bootstrap: str, topic: str, want: Any, timeout_s: float = 60.0) -> list[Any]:
    """The records of `topic` (from the beginning, with their headers) until `want(records)` holds
    or `timeout_s` passes."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"reader-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while loop.time() < deadline and not want(out):
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            out.extend(r for records in batch.values() for r in records)
    finally:
        await consumer.stop()
    return out
