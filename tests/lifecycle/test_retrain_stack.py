"""Retraining triggers in the real feedback worker: `new_labels` fires once per threshold, with a
Parquet export whose rows are exactly the joined outcomes of its window, and a `retrain` alert."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis

from feedback.export import read_export
from tests.feedback.worker_helpers import WorkerProcess, prediction, wait_until, write_config
from tests.lifecycle.stack_helpers import read_topic

pytestmark = pytest.mark.stack
pytest.importorskip("pyarrow")

ROUTE = {"name": "r", "policy": "thompson", "arms": [{"name": "a", "model": "m", "version": 7}],
         "retrain": {"new_labels": 50, "cooldown_s": 0}}


async def send_joined(producer: Any, topics: Any, count: int) -> list[str]:
    """`count` requests with their prediction and outcome (so `count` joined outcomes)."""
    ids = []
    for _ in range(count):
        request_id, now = uuid.uuid4().hex, time.time()
        await producer.send(topics.requests, orjson.dumps({"request_id": request_id, "route": "r",
                                                           "inputs": {"x": [1.0, 2.0]}, "ts": now}),
                            key=request_id.encode())
        await producer.send(topics.predictions, prediction(request_id, "r", "a", "m", 7, 0.7, now),
                            key=request_id.encode())
        await producer.send(topics.outcomes, orjson.dumps({"request_id": request_id, "reward": 1.0, "label": 1,
                                                           "ts": now + 0.001}), key=request_id.encode())
        ids.append(request_id)
    await producer.flush()
    return ids


async def test_new_labels_fires_once_per_threshold_with_its_export(stack, topics, redis_prefix, unique,
                                                                   tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer

    exports = tmp_path / "exports"
    route = {**ROUTE, "retrain": {**ROUTE["retrain"], "export_path": str(exports)}}
    config = write_config(tmp_path / "feedback.yaml", kafka=stack.kafka, redis=stack.redis,
                          topics=topics.topics.model_dump(), redis_prefix=redis_prefix, app_id=f"fb-{unique}",
                          routes=[route])
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    client = aredis.Redis.from_url(stack.redis)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka)
    await producer.start()
    key = f"{redis_prefix}:{{r}}:retrain"

    async def fired(total: int) -> dict[str, Any] | None:
        state = {k.decode(): v.decode() for k, v in (await client.hgetall(key)).items()}
        return state if int(state.get("fired_total", 0)) >= total and not state.get("pending") else None

    async def retrain_alerts(count: int) -> list[dict[str, Any]] | None:
        alerts = [a for a in await read_topic(stack, topics.topics.alerts) if a["kind"] == "retrain"]
        return alerts if len(alerts) >= count else None

    try:
        await worker.wait_ready()
        await wait_until(lambda: client.exists(key), 20, "the triggers' state", worker)
        first = await send_joined(producer, topics.topics, 50)
        await wait_until(lambda: fired(1), 60, "the first trigger", worker)
        second = await send_joined(producer, topics.topics, 30)
        await asyncio.sleep(3)  # 30 < 50: nothing fires
        assert int((await client.hget(key, "fired_total")).decode()) == 1
        second += await send_joined(producer, topics.topics, 20)
        await wait_until(lambda: fired(2), 60, "the second trigger", worker)
        alerts = await wait_until(lambda: retrain_alerts(2), 30, "two retrain alerts", worker)
    finally:
        await producer.stop()
        worker.stop(timeout_s=20)
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    assert len(alerts) == 2
    for alert, ids in zip(sorted(alerts, key=lambda a: a["ts"]), (first, second)):
        details = alert["details"]
        assert alert["route"] == "r" and alert["model_version"] == 7 and details["model"] == "m"
        assert details["reason"] == "new_labels" and details["labels"] == 50 and alert["threshold"] == 50
        manifest, table = read_export(str(Path(details["export_manifest"]).parent))
        assert manifest["rows"] == 50 and sorted(table.column("request_id").to_pylist()) == sorted(ids)
        assert (details["window_start"], details["window_end"]) == (manifest["window_start"], manifest["window_end"])
