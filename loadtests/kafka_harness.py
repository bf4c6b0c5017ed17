"""Shared pieces of the Kafka benchmarks: topics, preloading, open-loop load, reading outputs back.

Latency is measured open-loop: requests are scheduled at a fixed rate and each carries its
*intended* send time, so a stalled system is charged for every request it delayed (no
coordinated omission). Latencies go into an HDR histogram (microseconds).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hdrh.histogram import HdrHistogram


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def create_topics(bootstrap: str, names: list[str], partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    except Exception as exc:  # noqa: BLE001 - cleanup of benchmark topics is best-effort
        progress(f"could not delete the benchmark topics ({type(exc).__name__})")
    finally:
        await admin.close()


def request_payloads(n: int, n_features: int, route: str, seed: int = 0, prefix: str = "r") -> list[tuple[bytes, bytes]]:
    """n (key, value) request events with random feature rows (same sizes for every system)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, n_features)).round(5).tolist()
    out = []
    for i, row in enumerate(rows):
        request_id = f"{prefix}-{i}"
        out.append((request_id.encode(), orjson.dumps({"request_id": request_id, "route": route,
                                                        "inputs": {"input": row}})))
    return out


async def preload(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024,
                                enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in payloads]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def output_timestamps(bootstrap: str, topic: str, expected: int, timeout_s: float,
                            on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Read `topic` from the start until `expected` records; return their broker-side CreateTimes (ms)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"bench-reader-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                                fetch_max_bytes=32 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    stamps: list[int] = []
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    try:
        while len(stamps) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for records in batch.values():
                stamps.extend(r.timestamp for r in records)
            if on_progress and time.monotonic() - last_report > 2:
                last_report = time.monotonic()
                on_progress(len(stamps))
    finally:
        await consumer.stop()
    return np.array(stamps, dtype=np.int64)


def throughput_from_stamps(stamps: np.ndarray) -> float:
    """Records per second between the first and last output (ms timestamps)."""
    if len(stamps) < 2:
        return 0.0
    span_s = max(1e-3, (stamps.max() - stamps.min()) / 1000.0)
    return float(len(stamps) / span_s)


@dataclass
class LatencyResult:
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    rate_rps: float


async def open_loop(bootstrap: str, in_topic: str, out_topic: str, route: str, n_features: int, rate_rps: float,
                    duration_s: float, seed: int = 7, quiet_s: float = 10.0) -> LatencyResult:
    """Send at `rate_rps` for `duration_s`; measure output arrival minus intended send time.

    Payloads and their partitions are prepared before the clock starts and sent with the batch
    API each millisecond, so the generator itself stays far below the rates it offers; outputs
    are matched by record key (the request id), without decoding them. Once everything is sent,
    the reader waits at most `quiet_s` for the rest of the answers.
    """
    from gateway.transport.kafka_batches import partition_for

    total = int(rate_rps * duration_s)
    run = uuid.uuid4().hex[:6]
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((min(total, 5000), n_features)).round(5).tolist()
    keys = [f"lat-{run}-{i}".encode() for i in range(total)]
    values = [orjson.dumps({"request_id": keys[i].decode(), "route": route, "inputs": {"input": rows[i % len(rows)]}})
              for i in range(total)]
    histogram = HdrHistogram(1, 60_000_000, 3)  # microseconds
    consumer = AIOKafkaConsumer(out_topic, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                group_id=f"bench-lat-{run}", enable_auto_commit=False)
    await consumer.start()
    # make sure the reader holds its partitions (and their end offsets) before the first send
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    await consumer.seek_to_end()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, enable_idempotence=True)
    await producer.start()
    partitions = len(await producer.partitions_for(in_topic))
    targets = [partition_for(key, partitions) for key in keys]
    intended: dict[bytes, float] = {}
    received = 0
    done_sending = asyncio.Event()

    async def reader() -> None:
        nonlocal received
        quiet_deadline = None
        while True:
            batch = await consumer.getmany(timeout_ms=20, max_records=20_000)
            now = time.time()
            for records in batch.values():
                for record in records:
                    sent_at = intended.pop(record.key, None)
                    if sent_at is not None:
                        histogram.record_value(max(1, int((now - sent_at) * 1e6)))
                        received += 1
            if done_sending.is_set():
                if received >= total or (quiet_deadline is not None and time.monotonic() > quiet_deadline):
                    return
                if quiet_deadline is None:
                    quiet_deadline = time.monotonic() + quiet_s

    reader_task = asyncio.get_running_loop().create_task(reader())
    start = time.time() + 0.05
    sent = 0
    pending: list[asyncio.Future] = []
    while sent < total:
        due = min(total, int((time.time() - start) * rate_rps) + 1)
        builders: dict[int, object] = {}
        while sent < due:
            # the intended time: whatever delays the send counts against the system (no omission)
            intended[keys[sent]] = start + sent / rate_rps
            part = targets[sent]
            builder = builders.get(part)
            if builder is None:
                builder = builders[part] = producer.create_batch()
            if builder.append(key=keys[sent], value=values[sent], timestamp=None) is None:  # type: ignore[attr-defined]
                builder.close()  # type: ignore[attr-defined]
                pending.append(await producer.send_batch(builder, in_topic, partition=part))
                builder = builders[part] = producer.create_batch()
                builder.append(key=keys[sent], value=values[sent], timestamp=None)  # type: ignore[attr-defined]
            sent += 1
        for part, builder in builders.items():
            builder.close()  # type: ignore[attr-defined]
            pending.append(await producer.send_batch(builder, in_topic, partition=part))
        if len(pending) > 500:
            await asyncio.gather(*pending)
            pending.clear()
        await asyncio.sleep(0.001)
    await asyncio.gather(*pending)
    done_sending.set()
    await reader_task
    await producer.stop()
    await consumer.stop()
    # requests never answered are reported as unanswered, not folded into the percentiles
    return LatencyResult(sent=sent, received=received, p50_ms=histogram.get_value_at_percentile(50) / 1000,
                         p99_ms=histogram.get_value_at_percentile(99) / 1000,
                         p999_ms=histogram.get_value_at_percentile(99.9) / 1000, rate_rps=rate_rps)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process `pid` has used so far (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def topic_names(prefix: str) -> dict[str, str]:
    """A gateway's topic set (config `kafka.topics`) named `<prefix>.<role>`, one per bench run."""
    return {"requests": f"{prefix}.requests", "predictions": f"{prefix}.predictions",
            "shadow_predictions": f"{prefix}.shadow", "outcomes": f"{prefix}.outcomes",
            "deadletter": f"{prefix}.deadletter", "alerts": f"{prefix}.alerts",
            "routing_changes": f"{prefix}.routing"}
