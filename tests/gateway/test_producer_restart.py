"""After a failed publication the at-least-once loop rewinds *and* replaces its producer. Found by
the fault suite's broker_restart scenario (20 s outage): a batch that expired while the partition
had no leader left the idempotent producer's sequence numbers ahead of the broker's, and every
later send failed with OutOfOrderSequenceNumber (aiokafka has no KIP-360 epoch bump) - the
gateway rewound forever and answered nothing more. A fresh producer starts a new sequence."""

from __future__ import annotations

import pytest

from tests.gateway.support import N_FEATURES
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack


async def test_rewind_replaces_the_producer_and_nothing_is_lost(stack, topics, running_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway = running_gateway.gateway
    loop = gateway.kafka
    row = [1.0] * N_FEATURES
    await produce(stack.kafka, topics.topics.requests,
                  [(f"a-{i}".encode(), request_event(f"a-{i}", "fixed-route", row)) for i in range(300)])
    first = await read_topic(stack.kafka, topics.topics.predictions, 300, timeout_s=60, settle_s=0.2)
    assert {p["request_id"] for p in first} >= {f"a-{i}" for i in range(300)}
    old = loop.producer
    loop._failed_producer = old  # what a failed publication records (a rewind without one keeps the producer)
    await loop._rewind()  # what a failed publication triggers
    assert loop.producer is not old
    assert gateway.publisher is not None and gateway.publisher.producer is loop.producer  # the sidecar follows
    await produce(stack.kafka, topics.topics.requests,
                  [(f"b-{i}".encode(), request_event(f"b-{i}", "fixed-route", row)) for i in range(300)])
    wanted = {f"a-{i}" for i in range(300)} | {f"b-{i}" for i in range(300)}
    answered = await read_topic(stack.kafka, topics.topics.predictions, 600, timeout_s=60, settle_s=0.5)
    assert wanted <= {p["request_id"] for p in answered}
