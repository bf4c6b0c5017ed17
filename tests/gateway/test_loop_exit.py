"""How the gateway ends when its Kafka loop cannot: a crashed loop exits non-zero (it exited 0,
so an orchestrator saw a clean stop and restarted nothing), and a shutdown whose grace period
expires still leaves the consumer group (LeaveGroup; before, the partitions waited for the
session timeout before another replica got them)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, request_event

pytestmark = pytest.mark.stack


async def group_members(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_consumer_groups([group])
        return len(described.groups[0][5])  # (error, group, state, protocol type, protocol, members, ...)
    finally:
        await admin.close()


async def test_a_crashed_kafka_loop_exits_non_zero_with_one_line(stack, topics, running_gateway, caplog) -> None:  # type: ignore[no-untyped-def]
    loop = running_gateway.gateway.kafka

    async def defect() -> None:
        raise RuntimeError("a defect in the loop")

    loop._update_lag = defect  # our own code failing, as a bug would
    with caplog.at_level(logging.ERROR, logger="banditgate.gateway"):
        code = await asyncio.wait_for(running_gateway.task, timeout=30)
    assert code == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "banditgate.gateway" and r.levelno >= logging.ERROR]
    assert [line for line in lines if "Kafka loop crashed" in line] == [
        "the Kafka loop crashed (RuntimeError: a defect in the loop); shutting down with exit code 1"]


async def test_grace_period_expiry_still_leaves_the_group(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    config = gateway_config(stack, topics, repository, redis_prefix, shutdown_grace_s=1.0,
                            batching={"max_batch_size": 64, "max_delay_us": 1000, "max_in_flight_batches": 1,
                                      "inference_threads": 1, "inline_max_us": 0})
    running = await start_gateway(config)
    release = threading.Event()
    gateway = running.gateway
    try:
        # the only inference thread is busy: the next batch stays in flight past the grace period
        gateway.executor.submit(release.wait, 60)
        await produce(stack.kafka, topics.topics.requests,
                      [(f"h-{i}".encode(), request_event(f"h-{i}", "fixed-route", [1.0] * N_FEATURES)) for i in range(50)])
        for _ in range(100):
            if gateway.kafka is not None and gateway.kafka.processed >= 1:
                break
            await asyncio.sleep(0.1)
        assert await group_members(stack.kafka, config.kafka.group_id) == 1
        code = await running.stop()
        members = await group_members(stack.kafka, config.kafka.group_id)
    finally:
        release.set()
    assert code == 1  # the grace period expired with work in flight
    assert members == 0  # left at once, not after the 10 s session timeout


async def test_a_dead_background_task_exits_non_zero(stack, topics, repository, redis_prefix, caplog) -> None:  # type: ignore[no-untyped-def]
    """Before: only the Kafka loop was watched; a drift, guardrail, rollout or publisher task that
    died left the gateway running (and ready) without it."""
    running = await start_gateway(gateway_config(stack, topics, repository, redis_prefix))

    async def defect(stopping: asyncio.Event) -> None:
        raise RuntimeError("a defect in the drift watch")

    assert running.gateway.drift is not None
    running.gateway.drift.run = defect  # type: ignore[method-assign]  # before run() starts its tasks
    with caplog.at_level(logging.ERROR, logger="banditgate.gateway"):
        code = await asyncio.wait_for(running.task, timeout=60)
    assert code == 1
    assert any("the drift crashed (RuntimeError: a defect in the drift watch)" in r.getMessage()
               for r in caplog.records)
