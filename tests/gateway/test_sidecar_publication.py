"""A gateway serving only REST: its predictions and outcomes reach Kafka after the shared producer
broke, and what it cannot publish is counted. The producer is broken for real: the broker
refuses one record as too large (the gateway was told the topics take 8 MiB), which leaves the
idempotent producer's sequence for that partition ahead of the broker's, so every later send
there fails with OutOfOrderSequenceNumber until the producer is replaced. Before, only the
Kafka loop replaced it (and only after its own failures): an HTTP-only gateway dropped every
later prediction of that partition and answered 500 on /v2/outcomes until restarted."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from banditgate.config import KafkaConfig
from gateway.metrics import GatewayMetrics
from gateway.transport.kafka_batches import partition_for
from gateway.transport.publisher import PredictionPublisher
from gateway.transport.shared_producer import SharedProducer
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.gateway.test_delivery_refusals import read_ids, set_max_message_bytes

LONG_ID = "\U0001d11e" * 250  # within the 256 characters an id may have (4 bytes each); its records exceed
# the topics' limits below, while after the refusal the gateway learns a limit (the refused size
# less the framing and the largest headers, record_limit) that the short ids' records still fit
PREDICTIONS_TOPIC_BYTES = 2400
OUTCOMES_TOPIC_BYTES = 2200


def ids_on_partition_of(key: str, count: int, partitions: int = 4) -> list[str]:
    """`count` short ids whose records go to the same partition as `key`'s."""
    target = partition_for(key.encode(), partitions)
    out, i = [], 0
    while len(out) < count:
        candidate = f"s-{i}"
        if partition_for(candidate.encode(), partitions) == target:
            out.append(candidate)
        i += 1
    return out


def infer_body(request_id: str) -> dict:
    return {"id": request_id, "inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                          "data": [1.0] * N_FEATURES}]}


@pytest.mark.stack
async def test_http_predictions_are_published_again_after_a_refusal_broke_the_producer(
        stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    await set_max_message_bytes(stack.kafka, topics.topics.predictions, PREDICTIONS_TOPIC_BYTES)
    config = gateway_config(stack, topics, repository, redis_prefix,
                            kafka={"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                                   "topics": topics.topics.model_dump(), "max_message_bytes": 8 * 1024 * 1024})
    running = await start_gateway(config)
    gateway = running.gateway
    short = ids_on_partition_of(LONG_ID, 10)
    try:
        assert gateway.publisher is not None and gateway.publisher.metrics is gateway.metrics
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as client:
            # one request per flush: one record per batch. One goes first: a partition the producer never wrote to accepts any first sequence number
            for request_id in [short[0], LONG_ID, *short[1:]]:
                response = await client.post("/v2/models/fixed-route/infer", json=infer_body(request_id))
                assert response.status_code == 200, response.text
                await asyncio.sleep(0.15)
        predictions = await read_ids(stack.kafka, topics.topics.predictions, set(short), timeout_s=30)
        dead = await read_ids(stack.kafka, topics.topics.deadletter, {LONG_ID}, timeout_s=30)
        assert not running.task.done()
    finally:
        assert await running.stop() == 0
    assert {p["request_id"] for p in predictions} == set(short)  # every later prediction, same partition
    assert [d["reason"] for d in dead] == ["output_too_large"]
    assert orjson.loads(dead[0]["payload"])["request_id"] == LONG_ID  # the event, kept for replay
    assert gateway.metrics.producer_replacements._value.get() >= 1


@pytest.mark.stack
async def test_outcomes_are_accepted_again_after_a_refusal_broke_the_producer(stack, topics, repository,
                                                                            redis_prefix) -> None:  # type: ignore[no-untyped-def]
    await set_max_message_bytes(stack.kafka, topics.topics.outcomes, OUTCOMES_TOPIC_BYTES)
    config = gateway_config(stack, topics, repository, redis_prefix,
                            kafka={"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                                   "topics": topics.topics.model_dump(), "max_message_bytes": 8 * 1024 * 1024})
    running = await start_gateway(config)
    short = ids_on_partition_of(LONG_ID, 5)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.gateway.http_port}", timeout=30) as client:
            # one goes first: a partition the producer never wrote to accepts any first sequence number
            first = await client.post("/v2/outcomes", json={"request_id": short[0], "reward": 1})
            refused = await client.post("/v2/outcomes", json={"request_id": LONG_ID, "reward": 1})
            statuses = [(await client.post("/v2/outcomes", json={"request_id": rid, "reward": 1})).status_code
                        for rid in short[1:]]
        outcomes = await read_ids(stack.kafka, topics.topics.outcomes, set(short), timeout_s=30)
    finally:
        assert await running.stop() == 0
    assert first.status_code == 200
    assert statuses == [200] * (len(short) - 1)  # the producer the refusal broke was replaced
    assert refused.status_code == 400 and "MessageSizeTooLarge" in refused.text, refused.text  # not a 500
    assert {o["request_id"] for o in outcomes} == set(short)


def test_sidecar_drops_are_counted_by_topic_and_reason() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    publisher = PredictionPublisher(SharedProducer(KafkaConfig()), {"p": 1}, metrics=metrics, max_queued=5)
    publisher.publish("p", [{"request_id": f"r{i}"} for i in range(5)])
    publisher.publish("p", [{"request_id": f"x{i}"} for i in range(3)])  # over the bound: dropped, not queued
    assert metrics.sidecar_dropped.labels("p", "queue_full")._value.get() == 3
    assert publisher.dropped == 3
