"""The sidecar publisher survives a defect in one flush (pure logic: the flush is replaced by one
that raises once; no Kafka).

Before: any non-delivery exception in `_flush` ended the publishing task silently; every later
prediction was queued until the queue filled, then dropped, while readiness stayed true."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from gateway.transport.publisher import PredictionPublisher


class NoShared:
    producer = None
    limits: dict[str, int] = {}


async def test_a_flush_that_raises_a_defect_drops_its_events_counts_them_and_publishing_goes_on() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    publisher = PredictionPublisher(NoShared(), {"p": 1}, metrics=metrics, flush_interval_s=0.01)  # type: ignore[arg-type]
    flushed: list[list[Any]] = []

    async def flush() -> bool:
        batch, publisher._queue = publisher._queue, []
        publisher._in_flight = batch
        if not flushed:
            flushed.append([])
            raise RuntimeError("a defect")
        flushed.append(batch)
        publisher._in_flight = []
        return True

    publisher._flush = flush  # type: ignore[method-assign]
    publisher.start()
    publisher.publish("p", [{"request_id": "one"}])
    for _ in range(200):
        if flushed:
            break
        await asyncio.sleep(0.01)
    publisher.publish("p", [{"request_id": "two"}])
    for _ in range(200):
        if len(flushed) > 1:
            break
        await asyncio.sleep(0.01)
    assert publisher.task is not None and not publisher.task.done()
    assert [event[1] for event in flushed[1]] == [b"two"]
    assert publisher.errors == 1 and publisher.dropped == 1
    assert metrics.sidecar_dropped.labels("p", "internal_error")._value.get() == 1
    await publisher.close()
