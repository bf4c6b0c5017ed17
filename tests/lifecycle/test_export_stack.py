"""`banditgate export` against the real Kafka: a window's rows equal its joined outcomes; the
export's memory does not grow with the window; it reads committed records only and ends on
exactly-once partitions whose last offset is a transaction marker."""

from __future__ import annotations

import asyncio
import re
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from banditgate.config import Config, parse_config
from feedback.export import read_export
from feedback.export_cli import ExportOptions, export_window, parse_time, run_export

pytestmark = pytest.mark.stack
pytest.importorskip("pyarrow")


def test_parse_time() -> None:
    assert parse_time("1700000000") == 1_700_000_000.0
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000.0
    with pytest.raises(Exception, match="not a time"):
        parse_time("yesterday")


async def test_export_reads_the_topics_and_writes_the_window(stack, topics, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
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
    shown = capsys.readouterr()
    assert shown.out.strip() == str(manifest_path)
    progress = shown.err.splitlines()  # partitions done per topic, then rows, bytes and files written
    assert re.search(rf"^banditgate export: {re.escape(topics.topics.outcomes)}: 4/4 partitions done, \d+ records "
                     r"\(0\.\d MB\)(, 1 undecodable skipped)?$", "\n".join(progress), re.MULTILINE), progress
    assert any(line.startswith("banditgate export: written: 20/20 rows") and "1 file(s)" in line for line in progress)


def _config(stack: Any, topics: Any, tmp_path: Path) -> Config:
    return parse_config({"kafka": {"bootstrap_servers": stack.kafka, "topics": topics.topics.model_dump()},
                         "routes": [{"name": "churn", "arms": [{"name": "a", "model": "m", "version": 1}],
                                     "retrain": {"new_labels": 10, "export_path": str(tmp_path)}}]}, env={})


def _events(request_id: str, ts: float, width: int = 1) -> tuple[bytes, bytes, bytes]:
    """The request, prediction and outcome (1 s later) of one request."""
    return (orjson.dumps({"request_id": request_id, "route": "churn", "inputs": {"x": [ts % 97 + 0.5] * width},
                          "ts": ts}),
            orjson.dumps({"request_id": request_id, "route": "churn", "arm": "a", "model": "m", "model_version": 1,
                          "policy": "thompson", "propensity": 1.0, "outputs": {"probability": [0.4]},
                          "ts_request": ts, "ts_predicted": ts, "latency_ms": 1.0}),
            orjson.dumps({"request_id": request_id, "reward": 1.0, "label": 1, "ts": ts + 1}))


async def _send(producer: Any, config: Config, request_id: str, ts: float, width: int = 1,
                predictions: bool = True) -> None:
    topics = config.kafka.topics
    request, prediction, outcome = _events(request_id, ts, width)
    key, stamp = request_id.encode(), int(ts * 1000)
    await producer.send(topics.requests, request, key=key, timestamp_ms=stamp)
    if predictions:
        await producer.send(topics.predictions, prediction, key=key, timestamp_ms=stamp)
    await producer.send(topics.outcomes, outcome, key=key, timestamp_ms=stamp + 1000)


async def test_export_memory_does_not_grow_with_the_window(stack, topics, tmp_path: Path) -> None:
    """12 000 requests with 256 inputs each: 130 MB of Python objects at the peak of the export
    before (it held the topics in lists), against a bound of 16 MiB for row groups of 500 rows,
    fetches of 1 MiB and batches of 200 records (measured: 7.5 MB; 12 000 or 36 000 rows alike)."""
    import pyarrow.parquet  # noqa: F401 - imported before tracing: its import is not the export's memory
    from aiokafka import AIOKafkaProducer

    config = _config(stack, topics, tmp_path)
    count, width, base = 12_000, 256, time.time() - 3600
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        for i in range(count):
            await _send(producer, config, f"q{i}", base + i * 0.01, width)
        await producer.flush()
    finally:
        await producer.stop()
    options = ExportOptions(row_group_rows=500, batch_records=200, rows_per_file=4000, fetch_max_bytes=1 << 20,
                            max_partition_fetch_bytes=256 << 10)
    groups: list[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        manifest = await asyncio.wait_for(
            export_window(config.kafka, 3600.0, "churn", base, None, str(tmp_path), options=options,
                          progress=lambda event: groups.append(event["rows"]) if event["kind"] == "write" else None),
            300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest.rows == count and [f["rows"] for f in manifest.files] == [4000, 4000, 4000]
    _, table = read_export(manifest.path)
    assert table.column("request_id").to_pylist() == [f"q{i}" for i in range(count)]  # outcome-time order
    assert len(table.column("inputs")[0].as_py()["x"]) == width
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB of Python memory during the export"


async def test_aborted_transactions_are_not_exported(stack, topics, tmp_path: Path) -> None:
    """Exactly-once gateways write predictions in transactions; an aborted one's predictions (their
    outcomes did arrive) are not training rows."""
    from aiokafka import AIOKafkaProducer

    config = _config(stack, topics, tmp_path)
    base = time.time() - 600
    plain = AIOKafkaProducer(bootstrap_servers=stack.kafka)
    transactional = AIOKafkaProducer(bootstrap_servers=stack.kafka, transactional_id=f"export-{uuid.uuid4().hex}")
    await plain.start()
    await transactional.start()
    try:
        await transactional.begin_transaction()
        for i in range(20):
            await _send(transactional, config, f"committed{i}", base + i)
        await transactional.commit_transaction()
        await transactional.begin_transaction()
        for i in range(20):
            await _send(transactional, config, f"aborted{i}", base + 20 + i, predictions=True)
        await transactional.abort_transaction()
        for i in range(20):  # the requests and outcomes of the aborted predictions did arrive
            await _send(plain, config, f"aborted{i}", base + 20 + i, predictions=False)
        await plain.flush()
    finally:
        await transactional.stop()
        await plain.stop()
    manifest = await asyncio.wait_for(export_window(config.kafka, 3600.0, "churn", base, None, str(tmp_path)), 120)
    _, table = read_export(manifest.path)
    assert sorted(table.column("request_id").to_pylist()) == sorted(f"committed{i}" for i in range(20))


async def test_the_export_ends_on_partitions_whose_last_offset_is_a_commit_marker(stack, topics,
                                                                                   tmp_path: Path) -> None:
    """Every record in one committed transaction: each partition it touched ends with a commit
    marker, an offset no consumer ever receives as a record; the read ends at the last stable
    offset instead of waiting for a record at end - 1."""
    from aiokafka import AIOKafkaProducer

    config = _config(stack, topics, tmp_path)
    base = time.time() - 600
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, transactional_id=f"export-{uuid.uuid4().hex}")
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(40):
                await _send(producer, config, f"q{i}", base + i)
    finally:
        await producer.stop()
    progress: list[dict[str, Any]] = []
    manifest = await asyncio.wait_for(
        export_window(config.kafka, 3600.0, "churn", base, None, str(tmp_path), progress=progress.append), 120)
    assert manifest.rows == 40
    done = {e["topic"]: e for e in progress if e["kind"] == "read"}
    assert all(e["partitions_done"] == e["partitions"] == 4 for e in done.values()) and len(done) == 4
