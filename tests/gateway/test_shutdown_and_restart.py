"""A real `banditgate serve` process: SIGTERM under load exits 0 in time and loses nothing;
SIGKILL loses nothing either (at-least-once: the restarted process serves the rest)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.gateway.support import N_FEATURES
from tests.kafka_helpers import produce, read_topic, request_event
from tests.processes import start_serve

pytestmark = pytest.mark.stack


def serve_config(stack, topics, repository: Path, redis_prefix: str) -> dict:  # type: ignore[no-untyped-def]
    return {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"sd-{topics.prefix}",
                  "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "models": {"repository": str(repository), "poll_interval_s": 0},
        "batching": {"max_batch_size": 64, "max_delay_us": 1000},
        "shutdown_grace_s": 10,
        "routes": [{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "m-a", "version": 1}]}],
    }


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_stop_under_load_loses_nothing(stack, topics, repository, redis_prefix, tmp_path: Path, kill) -> None:  # type: ignore[no-untyped-def]
    config = serve_config(stack, topics, repository, redis_prefix)
    first = start_serve(dict(config), tmp_path)
    rows = [[1.0] * N_FEATURES] * 20_000
    sending = asyncio.create_task(produce(
        stack.kafka, topics.topics.requests,
        [(f"k-{i}".encode(), request_event(f"k-{i}", "r", rows[i])) for i in range(20_000)]))
    await asyncio.sleep(1.0)  # mid-stream
    started = time.monotonic()
    code = first.stop(kill)
    exit_s = time.monotonic() - started
    await sending
    if kill == signal.SIGTERM:
        assert code == 0, first.log()[-2000:]
        assert exit_s < 10
        assert "gateway stopped" in first.log()
    second = start_serve(dict(config), tmp_path)
    try:
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 20_000, timeout_s=120)
    finally:
        assert second.stop() == 0
    answered = {p["request_id"] for p in predictions}
    assert answered == {f"k-{i}" for i in range(20_000)}  # nothing lost; duplicates allowed (at-least-once)
