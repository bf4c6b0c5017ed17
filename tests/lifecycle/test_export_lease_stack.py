"""The retrain export's lease on the real Redis and Kafka: an export slower than its lease's time to
live is not run twice (the lease is extended while it runs), and an export whose lease is lost
mid-way stops without a manifest, with one log line, and leaves the new holder's lease alone."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis

from banditgate.config import Config, parse_config
from feedback.export import read_export
from feedback.lifecycle import LifecycleDriver

pytestmark = pytest.mark.stack
pytest.importorskip("pyarrow")

LEASE_MS = 1500
"""Short, so that the tests wait several times longer than an unextended lease would live."""


def _config(stack: Any, topics: Any, redis_prefix: str, exports: Path) -> Config:
    return parse_config({
        "kafka": {"bootstrap_servers": stack.kafka, "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 7}],
                    "retrain": {"new_labels": 10, "cooldown_s": 0, "export_path": str(exports)}}]}, env={})


async def _open_window_and_join(driver: LifecycleDriver, client: Any, config: Config, count: int = 10) -> list[str]:
    """The triggers' first look opens the window; then `count` joined requests arrive (on the
    topics, and in the ledger's `joined` counter the worker would have raised)."""
    from aiokafka import AIOKafkaProducer

    route = config.route("r")
    assert await driver.step_retrain(route) is None
    await asyncio.sleep(0.05)
    topics, ids = config.kafka.topics, []
    producer = AIOKafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers)
    await producer.start()
    try:
        for _ in range(count):
            request_id, now = uuid.uuid4().hex, time.time()
            key = request_id.encode()
            await producer.send(topics.requests, orjson.dumps({"request_id": request_id, "route": "r",
                                                               "inputs": {"x": [1.0]}, "ts": now}), key=key)
            await producer.send(topics.predictions, orjson.dumps({
                "request_id": request_id, "route": "r", "arm": "a", "model": "m", "model_version": 7,
                "policy": "thompson", "propensity": 1.0, "outputs": {"label": 1}, "ts_request": now,
                "ts_predicted": now, "latency_ms": 1.0}), key=key)
            await producer.send(topics.outcomes, orjson.dumps({"request_id": request_id, "reward": 1.0, "label": 1,
                                                               "ts": now + 0.001}), key=key)
            ids.append(request_id)
        await producer.flush()
    finally:
        await producer.stop()
    await client.hset(driver.keys.counts("r"), "joined", count)
    await asyncio.sleep(0.05)  # the fire's window ends after the last outcome
    return ids


async def _retrain_alerts(client: Any, driver: LifecycleDriver) -> list[dict[str, Any]]:
    items = [orjson.loads(item) for item in await client.lrange(driver.rollouts.key("r", "outbox"), 0, -1)]
    return [item["value"] for item in items if item["value"].get("kind") == "retrain"]


@pytest.fixture
async def client(stack: Any, redis_prefix: str) -> Any:
    client = aredis.Redis.from_url(stack.redis)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_a_slow_export_is_not_run_twice(stack, topics, redis_prefix, client, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    config = _config(stack, topics, redis_prefix, exports)
    at_commit, go = asyncio.Event(), asyncio.Event()
    second_worker_events: list[dict[str, Any]] = []

    async def hold_at_commit(message: dict[str, Any]) -> None:
        if message["kind"] == "commit?":
            at_commit.set()
            await go.wait()

    async def record(message: dict[str, Any]) -> None:
        second_worker_events.append(message)

    first = LifecycleDriver(config, client, out=None, export_lease_ms=LEASE_MS,  # type: ignore[arg-type]
                            export_observer=hold_at_commit)
    second = LifecycleDriver(config, client, out=None, export_lease_ms=LEASE_MS,  # type: ignore[arg-type]
                             export_observer=record)
    ids = await _open_window_and_join(first, client, config)
    lease_key = first.retrain_key("r") + ":lease"
    running = asyncio.create_task(first.step_retrain(config.route("r")))
    try:
        await asyncio.wait_for(at_commit.wait(), 120)
        await asyncio.sleep(3 * LEASE_MS / 1000)  # an unextended lease would have expired twice over
        assert await client.pttl(lease_key) > 0
        assert await second.step_retrain(config.route("r")) is None  # the fire is pending: it tries to finish it
        assert second_worker_events == []  # ... and finds the lease held: no second export
    finally:
        go.set()
        decision = await asyncio.wait_for(running, 120)
    assert decision is not None and decision.fired
    manifests = list(exports.glob("r/*/manifest.json"))
    assert len(manifests) == 1 and len(list(exports.glob("r/*"))) == 1
    manifest, table = read_export(str(manifests[0].parent))
    assert manifest["rows"] == 10 and sorted(table.column("request_id").to_pylist()) == sorted(ids)
    [alert] = await _retrain_alerts(client, first)
    assert alert["details"]["export_manifest"] == str(manifests[0])
    assert not await client.exists(lease_key)  # released by its holder


async def test_a_lease_lost_mid_export_stops_it_cleanly(stack, topics, redis_prefix, client, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    exports = tmp_path / "exports"
    config = _config(stack, topics, redis_prefix, exports)
    lease_key = f"{redis_prefix}:{{r}}:retrain:lease"

    async def lose_lease(message: dict[str, Any]) -> None:
        # another worker took the lease over (say, it expired during a Redis failover)
        if message["kind"] == "read":
            await client.set(lease_key, "another-worker")

    first = LifecycleDriver(config, client, out=None, export_lease_ms=LEASE_MS,  # type: ignore[arg-type]
                            export_observer=lose_lease)
    ids = await _open_window_and_join(first, client, config)
    with caplog.at_level(logging.INFO, logger="banditgate.lifecycle"):
        decision = await asyncio.wait_for(first.step_retrain(config.route("r")), 120)
    assert decision is not None and decision.fired
    assert list(exports.glob("r/*")) == []  # the stopped export deleted what it had written
    assert await _retrain_alerts(client, first) == []
    assert (await client.hget(first.retrain_key("r"), "pending")) is not None  # still to be done
    assert (await client.get(lease_key)) == b"another-worker"  # compare-and-delete: not its lease any more
    lines = [r.getMessage() for r in caplog.records if "export" in r.getMessage()]
    assert len(lines) == 1 and "lease" in lines[0] and "stopped" in lines[0], lines

    # the worker that holds the lease now finishes the fire: one export, one alert
    await client.delete(lease_key)
    second = LifecycleDriver(config, client, out=None, export_lease_ms=LEASE_MS)  # type: ignore[arg-type]
    assert await asyncio.wait_for(second.step_retrain(config.route("r")), 120) is None
    [manifest_path] = list(exports.glob("r/*/manifest.json"))
    _, table = read_export(str(manifest_path.parent))
    assert sorted(table.column("request_id").to_pylist()) == sorted(ids)
    assert len(await _retrain_alerts(client, second)) == 1


async def test_the_export_process_stops_when_its_worker_is_gone(stack, topics, redis_prefix, client,
                                                                tmp_path: Path) -> None:
    """A worker killed mid-export: the export process sees its input close and stops, deleting
    what it wrote (it would otherwise finish a manifest nobody queues an alert for)."""
    import sys

    from feedback.export_job import job_spec

    exports = tmp_path / "exports"
    config = _config(stack, topics, redis_prefix, exports)
    driver = LifecycleDriver(config, client, out=None)  # type: ignore[arg-type]
    await _open_window_and_join(driver, client, config)
    spec = job_spec(config, "r", (time.time() - 60, time.time()), str(exports), "test")
    child = await asyncio.create_subprocess_exec(sys.executable, "-m", "feedback.export_job",
                                                 stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(orjson.dumps(spec) + b"\n")
    await child.stdin.drain()
    first = orjson.loads(await asyncio.wait_for(child.stdout.readline(), 60))
    assert first["kind"] == "read"
    child.stdin.close()  # what the worker's death looks like from here
    messages = [orjson.loads(line) for line in (await asyncio.wait_for(child.stdout.read(), 60)).splitlines()]
    assert await asyncio.wait_for(child.wait(), 60) == 3
    assert messages[-1]["kind"] == "aborted" and not any(m["kind"] == "done" for m in messages)
    assert list(exports.glob("r/*")) == []
