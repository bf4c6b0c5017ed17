"""Smoke test: the real broker produces and consumes through aiokafka; the real Redis answers."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from banditgate import jars
from banditgate.stack import KAFKA_VERSION, Stack, ensure_kafka_jars, kafka_answers, redis_answers

pytestmark = pytest.mark.stack


async def test_produce_and_consume_through_real_broker(stack, topics) -> None:
    topic = topics.topics.requests
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, enable_idempotence=True)
    await producer.start()
    try:
        for i in range(100):
            await producer.send(topic, key=str(i).encode(), value=f"v{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=stack.kafka, auto_offset_reset="earliest",
                                group_id=f"smoke-{topics.prefix}", enable_auto_commit=False)
    await consumer.start()
    got: set[bytes] = set()
    try:
        async with asyncio.timeout(30):
            while len(got) < 100:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    got.update(r.value for r in records)
    finally:
        await consumer.stop()
    assert got == {f"v{i}".encode() for i in range(100)}


async def test_redis_answers_and_runs_lua(stack, redis_prefix) -> None:
    client = aredis.Redis.from_url(stack.redis)
    try:
        assert await client.ping()
        key = f"{redis_prefix}:{{route}}:h"
        value = await client.eval("return redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])", 1, key, 5)
        assert value == 5
        await client.delete(key)
    finally:
        await client.aclose()


def test_stack_status_reports_both_up(stack) -> None:
    status = Stack.default().status()
    assert status["kafka"]["up"] and status["redis"]["up"]
    host, port = stack.kafka_host_port
    assert kafka_answers(host, port)
    assert redis_answers(stack.redis)


def test_up_is_idempotent(stack) -> None:
    again = Stack.default().up()
    assert again == stack


def test_cached_kafka_jars_verify_against_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path: the jars the broker runs on are the lock's, byte for byte (the default lock
    mode re-hashes the cache and downloads from Maven Central whatever is missing)."""
    monkeypatch.delenv("BANDITGATE_KAFKA_FETCH", raising=False)
    lock = jars.load_lock(KAFKA_VERSION)
    assert lock is not None
    lines: list[str] = []
    libs = ensure_kafka_jars(lines.append)
    check = jars.check_cache(libs, lock)
    assert check.complete and len(check.verified) == len(lock.jars)
    assert lines[-1].startswith(f"kafka jars: {len(lock.jars)} in {libs} match")
