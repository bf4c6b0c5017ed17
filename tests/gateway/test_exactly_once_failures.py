"""Exactly-once under failed transactions, against the real broker. An "intruder" starts a
producer with one of the gateway's transactional ids (what a zombie replica, or the transaction
coordinator timing a transaction out, does to the epoch): the gateway's open transaction is
aborted and its producer fenced while it still owns the partition. Before: the batch was
dropped with the partition's consumer left past it and the fenced producer kept, so every
later batch of that partition failed too (requests lost). Now the producer is re-acquired and
the partition sought back: read_committed sees every request exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack


async def fence(bootstrap: str, transactional_id: str) -> None:
    """Start and stop a producer with `transactional_id`: its InitProducerId bumps the epoch, which
    aborts the owner's open transaction and fences the owner's producer."""
    intruder = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id,
                                enable_idempotence=True)
    await intruder.start()
    await intruder.stop()


async def test_fenced_while_owning_the_partition_loses_and_repeats_nothing(stack, topics, repository,
                                                                         redis_prefix) -> None:  # type: ignore[no-untyped-def]
    config = gateway_config(stack, topics, repository, redis_prefix, delivery="exactly_once")
    running = await start_gateway(config)
    loop = running.gateway.kafka
    assert loop is not None
    rng = np.random.default_rng(7)
    n, bursts = 4000, 16
    try:
        for burst in range(bursts):
            await produce(stack.kafka, topics.topics.requests, [
                (f"e-{i}".encode(), request_event(f"e-{i}", "fixed-route", rng.uniform(0, 5, N_FEATURES).tolist()))
                for i in range(burst * n // bursts, (burst + 1) * n // bursts)])
            # fence two partitions mid-stream, while their batches are in transactions
            await asyncio.gather(*(fence(stack.kafka, f"{config.kafka.group_id}.{topics.topics.requests}.{p}")
                                   for p in (burst % 4, (burst + 1) % 4)))
        predictions = await read_topic(stack.kafka, topics.topics.predictions, n, timeout_s=120, settle_s=2.0)
        assert not running.task.done()
    finally:
        assert await running.stop() == 0
    answered = Counter(p["request_id"] for p in predictions)
    assert set(answered) == {f"e-{i}" for i in range(n)}  # nothing lost
    assert max(answered.values()) == 1  # nothing repeated
    assert loop.metrics.transaction_failures.labels("fenced")._value.get() > 0  # the fences did land mid-transaction
