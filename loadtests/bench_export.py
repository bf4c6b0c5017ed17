"""`banditgate bench export`: how much a retrain export disturbs the event loop that starts it.

Fills fresh topics with N joined requests (64 inputs each), then measures the loop's lag (a 10 ms
ticker: how late each wake-up is) in three phases of one process:

* ``idle``   - nothing else running (the floor on this machine);
* ``job``    - the export as the feedback worker runs it now: feedback.export_job in a process
               of its own, under a lease the loop extends (feedback.lifecycle);
* ``inloop`` - the same export awaited on the loop itself (what the worker did before: reads,
               join and files on its event loop; here with the streaming join, so the figure is
               if anything kinder than the old lists).

JSON keys: ``rows``, ``job_s``, ``inloop_s``, ``lag_ms`` (per phase: ``p50``, ``p99``, ``max``,
``ticks_per_s``), ``job_child_max_rss_mb`` (the export process's peak RSS).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from banditgate.config import Topics, parse_config
from banditgate.stack import Stack

T = TypeVar("T")
WIDTH = 64
TICK_S = 0.01


async def _lagged(work: Awaitable[T]) -> tuple[T, dict[str, float], float]:
    """(result of `work`, the loop's lag while it ran, seconds it took)."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            start = time.monotonic()
            await asyncio.sleep(TICK_S)
            lags.append(max(0.0, time.monotonic() - start - TICK_S))

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        result = await work
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        await task
    ordered = sorted(lags) or [0.0]
    return result, {"p50": round(1000 * statistics.median(ordered), 2),
                    "p99": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
                    "max": round(1000 * ordered[-1], 2), "ticks_per_s": round(len(lags) / max(elapsed, 1e-9), 1)}, elapsed


async def _fill(bootstrap: str, topics: Topics, rows: int, base: float) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        for i in range(rows):
            request_id, ts = f"q{i}", base + i * 0.001
            key, stamp = request_id.encode(), int(ts * 1000)
            await producer.send(topics.requests, orjson.dumps({"request_id": request_id, "route": "r",
                                                               "inputs": {"x": [i % 89 + 0.25] * WIDTH}, "ts": ts}),
                                key=key, timestamp_ms=stamp)
            await producer.send(topics.predictions, orjson.dumps({
                "request_id": request_id, "route": "r", "arm": "a", "model": "m", "model_version": 1,
                "policy": "thompson", "propensity": 0.5, "outputs": {"probability": [0.3]}, "ts_request": ts,
                "ts_predicted": ts, "latency_ms": 1.0}), key=key, timestamp_ms=stamp)
            await producer.send(topics.outcomes, orjson.dumps({"request_id": request_id, "reward": 1.0, "label": 1,
                                                               "ts": ts + 1}), key=key, timestamp_ms=stamp + 1000)
        await producer.flush()
    finally:
        await producer.stop()


async def _bench(out: Path, quick: bool) -> dict[str, Any]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from banditgate.connections import redis_client
    from feedback.export_cli import export_window
    from feedback.export_job import ExportLease, job_spec, run_export_job

    addresses = Stack.default().up()
    prefix = f"bench-export-{uuid.uuid4().hex[:8]}"
    topics = Topics(**{field: f"{prefix}.{default.split('.', 1)[1]}" for field, default in Topics().model_dump().items()})
    names = list(topics.model_dump().values())
    rows = 5_000 if quick else 30_000
    base = time.time() - 3600
    admin = AIOKafkaAdminClient(bootstrap_servers=addresses.kafka)
    await admin.start()
    await admin.create_topics([NewTopic(n, num_partitions=4, replication_factor=1) for n in names])
    config = parse_config({"kafka": {"bootstrap_servers": addresses.kafka, "topics": topics.model_dump()},
                           "redis": {"url": addresses.redis, "key_prefix": prefix},
                           "routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 1}]}]}, env={})
    redis = redis_client(config.redis)
    folder = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        await _fill(addresses.kafka, topics, rows, base)
        _, idle, _ = await _lagged(asyncio.sleep(3))
        lease = ExportLease(redis, f"{prefix}:lease", 60_000)
        if not await lease.acquire():
            raise RuntimeError("the bench's lease is taken")
        spec = job_spec(config, "r", (base, time.time()), str(folder / "job"), "bench")
        done, job, job_s = await _lagged(run_export_job(spec, lease))
        await lease.release()
        manifest, inloop, inloop_s = await _lagged(export_window(config.kafka, config.feedback.join_ttl_s, "r", base,
                                                                 time.time(), str(folder / "inloop")))
        if done["rows"] != rows or manifest.rows != rows:
            raise RuntimeError(f"exported {done['rows']} and {manifest.rows} rows of {rows}")
    finally:
        await redis.aclose()
        await admin.delete_topics(names)
        await admin.close()
        shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows, "width": WIDTH, "job_s": round(job_s, 2), "inloop_s": round(inloop_s, 2),
            "lag_ms": {"idle": idle, "job": job, "inloop": inloop},
            "job_child_max_rss_mb": done["max_rss_mb"]}


def run(out: Path, quick: bool = False) -> int:
    result = asyncio.run(_bench(out, quick))
    out.write_text(json.dumps(result, indent=2) + "\n")
    lag = result["lag_ms"]
    lines = ["| phase | loop lag p50 ms | p99 ms | max ms | ticks/s |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {phase} | {v['p50']} | {v['p99']} | {v['max']} | {v['ticks_per_s']} |" for phase, v in lag.items()]
    out.with_suffix(".md").write_text(
        f"{result['rows']} rows: job {result['job_s']} s, in-loop {result['inloop_s']} s, export process peak RSS "
        f"{result['job_child_max_rss_mb']} MB\n\n" + "\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0
