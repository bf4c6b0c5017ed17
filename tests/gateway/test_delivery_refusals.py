"""Outputs the broker refuses for good, against the real broker: a prediction larger than its
topic accepts, a topic that refuses batches the gateway thought would fit, a dead-letter topic
that refuses dead letters. Before: the loop rewound forever and republished every other
prediction of the batch on each cycle (issue 19, item 4); now the refused requests are
dead-lettered (or the refused dead letters counted) and the loop goes on."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from banditgate.cloudevents import MAX_HEADER_BYTES, header_bytes
from banditgate.events import MAX_ID_CHARS
from banditgate.kafka_delivery import record_limit
from gateway.transport.kafka_batches import OutboundBatches, OutputRefused, delivered
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import largest_headers, produce, read_records, read_topic, request_event

pytestmark = pytest.mark.stack

TOPIC_LIMIT = 20_000
"""max.message.bytes of the predictions topic in these tests (the broker's own is 8 MiB)."""


async def set_max_message_bytes(bootstrap: str, topic: str, value: int) -> None:
    """Set a topic's max.message.bytes and wait until the broker reports it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(value)})])
        for _ in range(100):
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                                       {"max.message.bytes": None})])
            if any(entry[1] == str(value) for entry in response.resources[0][4]):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{topic}: max.message.bytes never became {value}")
    finally:
        await admin.close()


async def test_a_record_at_the_limit_with_the_largest_headers_is_accepted(stack, topics) -> None:  # type: ignore[no-untyped-def]
    """record_limit leaves room for the headers every record carries (CloudEvents + trace
    context): key + value at the limit with the largest headers is taken by the broker, sent as
    the gateway sends (a batch builder, a batch of its own). Before, the limit was the topic's
    size less the record framing only, and such a record was refused (MessageSizeTooLarge)."""
    topic = topics.topics.predictions
    await set_max_message_bytes(stack.kafka, topic, TOPIC_LIMIT)
    limit = record_limit(TOPIC_LIMIT, 8 * 1024 * 1024)
    headers = largest_headers()
    assert header_bytes(headers) == MAX_HEADER_BYTES
    key = ("\U0001d11e" * MAX_ID_CHARS).encode()  # the longest request_id, in 4-byte characters
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, enable_idempotence=True, acks="all",
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        out: OutboundBatches[None] = OutboundBatches(producer, {topic: 4}, {topic: limit})
        out.add(topic, key, b"v" * (limit - len(key)), alone=True, headers=headers)
        with pytest.raises(OutputRefused):  # one byte more is refused before sending
            out.add(topic, key, b"v" * (limit - len(key) + 1), alone=True, headers=headers)
        failures = await delivered(await out.send())
        assert not failures, failures
    finally:
        await producer.stop()
    (record,) = await read_records(stack.kafka, topic, lambda rs: len(rs) >= 1)
    assert record.key == key and len(record.value) == limit - len(key) and list(record.headers) == headers


def search_route(k: int = 50) -> dict:
    return {"name": "search", "policy": "interleave", "method": "team_draft", "k": k,
            "arms": [{"name": "x", "model": "m-b", "version": 1}, {"name": "y", "model": "m-c", "version": 1}]}


def traffic(oversize: int, small: int, normal: int, seed: int = 0) -> tuple[list[tuple[bytes, bytes]], set[str], set[str]]:
    """Requests: `oversize` ranking requests whose prediction (the shown list, each arm's ranking:
    about 3x the item ids) is ~45 kB, over TOPIC_LIMIT; `small` ranking requests with short ids;
    `normal` fixed-route requests. Returns (events, ids expected answered, ids expected refused)."""
    rng = np.random.default_rng(seed)
    events, good, big = [], set(), set()
    for i in range(oversize):
        items = [f"{i}-{j}-" + "i" * 300 for j in range(60)]
        rows = rng.uniform(0, 3, (60, N_FEATURES)).round(3).tolist()
        rid = f"big-{i}"
        events.append((rid.encode(), orjson.dumps({"request_id": rid, "route": "search", "items": items,
                                                   "inputs": {"input": rows}})))
        big.add(rid)
    for i in range(small):
        items = [f"s{i}-{j}" for j in range(8)]
        rows = rng.uniform(0, 3, (8, N_FEATURES)).round(3).tolist()
        rid = f"small-{i}"
        events.append((rid.encode(), orjson.dumps({"request_id": rid, "route": "search", "items": items,
                                                   "inputs": {"input": rows}})))
        good.add(rid)
    for i in range(normal):
        rid = f"n-{i}"
        events.append((rid.encode(), request_event(rid, "fixed-route", rng.uniform(0, 5, N_FEATURES).round(3).tolist())))
        good.add(rid)
    order = rng.permutation(len(events))
    return [events[i] for i in order], good, big


def config_for(stack, topics, repository, redis_prefix, delivery: str = "at_least_once", **kafka):  # type: ignore[no-untyped-def]
    routes = [{"name": "fixed-route", "policy": "fixed",
               "arms": [{"name": "a", "model": "m-a", "version": 1, "weight": 3},
                        {"name": "b", "model": "m-b", "version": 1, "weight": 1}]},
              search_route()]
    return gateway_config(stack, topics, repository, redis_prefix, routes=routes, delivery=delivery,
                          kafka={"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                                 "topics": topics.topics.model_dump(), **kafka})


async def read_ids(bootstrap: str, topic: str, ids: set[str], timeout_s: float = 90.0) -> list[dict]:
    """Read `topic` (read_committed) until a record keyed by each of `ids` arrived or `timeout_s`
    passed; return every record read."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    out: list[dict] = []
    seen: set[str] = set()
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while not ids <= seen and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                for record in records:
                    seen.add(record.key.decode())
                    out.append(orjson.loads(record.value))
    finally:
        await consumer.stop()
    return out


async def committed_to_the_end(bootstrap: str, group: str, topic: str, timeout_s: float = 60.0) -> None:
    """Wait until `group` has committed every partition of `topic` up to its end (all served)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(4)]  # the topics fixture makes 4
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            ends = await consumer.end_offsets(partitions)
            committed = [await consumer.committed(tp) or 0 for tp in partitions]
            if all(done >= ends[tp] for tp, done in zip(partitions, committed)):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{group} did not commit {topic} to its end within {timeout_s}s")
    finally:
        await consumer.stop()


async def quiet(bootstrap: str, topic: str, seconds: float = 3.0) -> tuple[int, int]:
    """How many records `topic` holds, and how many `seconds` later (equal: nothing is republished)."""
    first = len(await read_topic(bootstrap, topic, 0, timeout_s=10, settle_s=1.0))
    await asyncio.sleep(seconds)
    return first, len(await read_topic(bootstrap, topic, 0, timeout_s=10, settle_s=1.0))


async def test_a_prediction_over_the_topic_limit_is_dead_lettered_before_sending(
        stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    """The limit is asked from the broker at start; the oversize ones never reach it, so nothing
    is refused and nothing rewinds: every other prediction exactly once."""
    await set_max_message_bytes(stack.kafka, topics.topics.predictions, TOPIC_LIMIT)
    running = await start_gateway(config_for(stack, topics, repository, redis_prefix))
    try:
        events, good, big = traffic(oversize=20, small=20, normal=300)
        await produce(stack.kafka, topics.topics.requests, events)
        predictions = await read_ids(stack.kafka, topics.topics.predictions, good)
        dead = await read_ids(stack.kafka, topics.topics.deadletter, big)
        assert not running.task.done()
    finally:
        assert await running.stop() == 0
    answered = Counter(p["request_id"] for p in predictions)
    assert set(answered) == good and max(answered.values()) == 1  # no duplicate of any other prediction
    assert {orjson.loads(d["payload"])["request_id"] for d in dead} == big  # the request itself, for replay
    assert {d["reason"] for d in dead} == {"output_too_large"} and len(dead) == len(big)
    assert all("over the" in d["error"] and d["topic"] == topics.topics.requests for d in dead)
    metrics = running.gateway.metrics
    assert metrics.output_refusals.labels(topics.topics.predictions, "output_too_large")._value.get() == len(big)


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_batches_the_broker_refuses_are_split_and_the_culprits_dead_lettered(
        stack, topics, repository, redis_prefix, delivery: str) -> None:  # type: ignore[no-untyped-def]
    """kafka.max_message_bytes says 8 MiB while the topic takes 20 kB: the broker refuses (whole
    batches of small predictions too). The loop remembers, splits, dead-letters the oversize
    ones and answers the others; exactly-once without a duplicate."""
    await set_max_message_bytes(stack.kafka, topics.topics.predictions, TOPIC_LIMIT)
    running = await start_gateway(config_for(stack, topics, repository, redis_prefix, delivery,
                                             max_message_bytes=8 * 1024 * 1024))
    try:
        events, good, big = traffic(oversize=5, small=10, normal=200, seed=1)
        await produce(stack.kafka, topics.topics.requests, events)
        await read_ids(stack.kafka, topics.topics.predictions, good)
        dead = await read_ids(stack.kafka, topics.topics.deadletter, big)
        await committed_to_the_end(stack.kafka, f"gw-{topics.prefix}", topics.topics.requests)
        before, after = await quiet(stack.kafka, topics.topics.predictions)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 0, timeout_s=10, settle_s=1.0)
        assert not running.task.done()
    finally:
        assert await running.stop() == 0
    answered = Counter(p["request_id"] for p in predictions)
    assert set(answered) == good
    assert {orjson.loads(d["payload"])["request_id"] for d in dead} == big
    assert {d["reason"] for d in dead} == {"output_too_large"}
    assert before == after  # settled: no endless republishing
    if delivery == "exactly_once":
        assert max(answered.values()) == 1 and len(dead) == len(big)


async def test_refused_dead_letters_are_counted_and_never_looped(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    """The dead-letter topic refuses everything (max.message.bytes 100, below any dead letter;
    the gateway believes 8 MiB): bad requests' dead letters are dropped and counted, good
    requests keep being answered."""
    await set_max_message_bytes(stack.kafka, topics.topics.deadletter, 100)
    running = await start_gateway(config_for(stack, topics, repository, redis_prefix, max_message_bytes=8 * 1024 * 1024))
    rng = np.random.default_rng(4)
    try:
        for burst in range(2):  # the second burst after the refusals: the loop went on
            good = [(f"g{burst}-{i}".encode(), request_event(f"g{burst}-{i}", "fixed-route",
                                                             rng.uniform(0, 5, N_FEATURES).tolist())) for i in range(150)]
            bad = [(f"b{burst}-{i}".encode(), b"{not json " + b"x" * 200) for i in range(10)]
            await produce(stack.kafka, topics.topics.requests, good[:75] + bad + good[75:])
            await read_ids(stack.kafka, topics.topics.predictions, {f"g{burst}-{i}" for i in range(150)})
        await committed_to_the_end(stack.kafka, f"gw-{topics.prefix}", topics.topics.requests)
        before, after = await quiet(stack.kafka, topics.topics.predictions)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 0, timeout_s=10, settle_s=1.0)
        assert not running.task.done()
    finally:
        assert await running.stop() == 0
    assert {p["request_id"] for p in predictions} == {f"g{b}-{i}" for b in range(2) for i in range(150)}
    assert before == after  # settled: no endless republishing
    failures = running.gateway.metrics.deadletter_failures.labels(topics.topics.deadletter, "output_too_large")
    assert failures._value.get() >= 20
    assert await read_topic(stack.kafka, topics.topics.deadletter, 0, timeout_s=2, settle_s=0.5) == []
