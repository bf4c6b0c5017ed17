"""`banditgate export` against the real Kafka: a window's rows equal its joined outcomes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from banditgate.config import parse_config
from feedback.export import read_export
from feedback.export_cli import parse_time, run_export

pytestmark = pytest.mark.stack
pytest.importorskip("pyarrow")


def test_parse_time() -> None:
    assert parse_time("1700000000") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000.0
    with pytest.raises(Exception, match="not a time"):
        parse_time("yesterday")


async def test_export_reads_the_topics_and_writes_the_window(stack, topics, tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer

    config = parse_config({"kafka": {"bootstrap_servers": stack.kafka, "topics": topics.topics.model_dump()},
                           "routes": [{"name": "churn", "arms": [{"name": "a", "model": "m", "version": 1}],
                                       "retrain": {"new_labels": 10, "export_path": str(tmp_path)}}]})
    base = time.time() - 600
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka)
    await producer.start()
    try:
        for i in range(60):
            rid, ts = f"q{i}", base + i
            t = topics.topics
            await producer.send(t.requests, orjson.dumps({"request_id": rid, "route": "churn", "inputs": {"x": [i]},
                                                          "ts": ts}), key=rid.encode(), timestamp_ms=int(ts * 1000))
            await producer.send(t.predictions, orjson.dumps({
                "request_id": rid, "route": "churn", "arm": "a", "model": "m", "model_version": 1, "policy": "thompson",
                "propensity": 1.0, "outputs": {"probability": [0.4]}, "ts_request": ts, "ts_predicted": ts,
                "latency_ms": 1.0}), key=rid.encode(), timestamp_ms=int(ts * 1000))
            outcome_ts = ts + 100
            await producer.send(t.outcomes, orjson.dumps({"request_id": rid, "reward": float(i % 2), "label": i % 2,
                                                          "ts": outcome_ts}), key=rid.encode(),
                                timestamp_ms=int(outcome_ts * 1000))
        await producer.send(topics.topics.outcomes, b"not json", timestamp_ms=int((base + 120) * 1000))
        await producer.flush()
    finally:
        await producer.stop()
    since, until = base + 120, base + 140  # outcomes of requests 20..39 (ts + 100 in [120, 140])
    code = await asyncio.to_thread(run_export, config, "churn", str(since), str(until), None)
    assert code == 0
    [manifest_path] = list(tmp_path.glob("churn/*/manifest.json"))
    manifest, table = read_export(str(manifest_path.parent))
    assert manifest["rows"] == 20 and table.num_rows == 20  # outcome ts in [since, until): requests 20..39
    assert sorted(table.column("request_id").to_pylist()) == sorted(f"q{i}" for i in range(20, 40))
    assert table.column("propensity").to_pylist() == [1.0] * 20
    assert manifest["ts_outcome_min"] == since and manifest["ts_outcome_max"] == base + 139
