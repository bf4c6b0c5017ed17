"""`banditgate bench feedback`: joined outcomes per second through one feedback worker, with Redis.

Fresh topics get N predictions and their N outcomes (shuffled together: either order occurs, every
outcome carries a reward and a label, 10% of requests also have a shadow prediction); then one
`banditgate feedback` process starts on them and drains the backlog, writing the router's arm
statistics, the ledger and the join table's changelog as it goes. ``outcomes_per_s`` is N
divided by the time from the worker's readiness to the last outcome counted in Redis (polled
every 50 ms); ``steady_outcomes_per_s`` is the rate between 10% and 90% of them. As a ceiling,
a bare aiokafka consumer reads the same input topics (no decoding, no state).

Counts are checked: the run fails unless Redis holds exactly N joined outcomes.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from banditgate.stack import Stack
from loadtests.kafka_harness import cpu_seconds

TARGET_OUTCOMES_PER_S = 20_000
PARTITIONS = 4


def progress(message: str) -> None:
    print(f"bench feedback: {message}", file=sys.stderr, flush=True)


async def _admin(bootstrap: str, create: list[str] | None = None, delete: list[str] | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if create:
            await admin.create_topics([NewTopic(n, num_partitions=PARTITIONS, replication_factor=1) for n in create])
        if delete:
            try:
                await admin.delete_topics(delete)
            except Exception as exc:  # noqa: BLE001 - cleanup only; say so and go on
                progress(f"could not delete bench topics ({type(exc).__name__}: {exc})")
    finally:
        await admin.close()


def _events(n: int, now: float, seed: int = 0) -> list[tuple[str, bytes, bytes]]:
    rng = random.Random(seed)
    arms = (("a", "churn-gbm", 3), ("b", "churn-mlp", 1))
    out: list[tuple[str, bytes, bytes]] = []
    for i in range(n):
        request_id = f"bench-{i}"
        arm, model, version = arms[i % 2]
        probability = rng.random()
        prediction = {"request_id": request_id, "route": "churn", "arm": arm, "model": model,
                      "model_version": version, "policy": "thompson", "propensity": 0.5,
                      "outputs": {"probability": [probability], "label": int(probability >= 0.5)},
                      "ts_request": now - 0.01, "ts_predicted": now, "latency_ms": 2.5}
        key = request_id.encode()
        out.append(("predictions", key, orjson.dumps(prediction)))
        if i % 10 == 0:
            shadow = {**prediction, "arm": "c", "model_version": 4, "shadow": True, "primary_arm": arm}
            out.append(("shadow_predictions", key, orjson.dumps(shadow)))
        label = int(rng.random() < 0.4)
        out.append(("outcomes", key, orjson.dumps({"request_id": request_id, "reward": float(label), "label": label,
                                                   "ts": now + 1.0})))
    rng.shuffle(out)
    return out


async def _preload(bootstrap: str, topics: dict[str, str], events: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024,
                                enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topics[name], key=key, value=value) for name, key, value in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _bare_consume(bootstrap: str, topics: list[str], expected: int) -> float:
    """Events per second a bare aiokafka consumer reads from the same topics (the ceiling)."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"bench-bare-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    seen = 0
    started = None
    try:
        deadline = time.monotonic() + 60
        while seen < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            got = sum(len(records) for records in batch.values())
            if got and started is None:
                started = time.monotonic()
            seen += got
    finally:
        await consumer.stop()
    return seen / max(1e-9, time.monotonic() - (started or time.monotonic()))


async def _joined(client: Any, prefix: str) -> int:
    value = await client.hget(f"{prefix}:{{churn}}:fb:counts", "joined")
    return int(float(value)) if value else 0


async def _run(quick: bool) -> dict[str, Any]:
    import redis.asyncio as aredis

    addresses = Stack.default().up(progress)
    n = 20_000 if quick else 150_000
    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-fb-{run_id}"
    names = {"requests": "requests", "predictions": "predictions", "shadow_predictions": "shadow",
             "outcomes": "outcomes", "deadletter": "deadletter", "alerts": "alerts", "routing_changes": "routing"}
    topics = {field: f"{prefix}.{name}" for field, name in names.items()}
    app_id = f"{prefix}-worker"
    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    client = aredis.Redis.from_url(addresses.redis)
    process: subprocess.Popen[bytes] | None = None
    try:
        await _admin(addresses.kafka, create=list(topics.values()))
        now = time.time()
        events = _events(n, now)
        progress(f"preloading {n:,} predictions, {n // 10:,} shadow predictions and {n:,} outcomes")
        started = time.monotonic()
        await _preload(addresses.kafka, topics, events)
        preload_s = time.monotonic() - started
        progress(f"preloaded {len(events):,} events in {preload_s:.1f} s; measuring a bare consumer")
        source = [topics["predictions"], topics["shadow_predictions"], topics["outcomes"]]
        bare_events_per_s = await _bare_consume(addresses.kafka, source, len(events))
        config = {
            "kafka": {"bootstrap_servers": addresses.kafka, "topics": topics},
            "redis": {"url": addresses.redis, "key_prefix": prefix},
            "server": {"host": "127.0.0.1"},
            "feedback": {"app_id": app_id, "web_port": 0, "partitions": PARTITIONS},
            "logging": {"level": "info"},
            "routes": [{"name": "churn", "policy": "thompson",
                        "arms": [{"name": "a", "model": "churn-gbm", "version": 3},
                                 {"name": "b", "model": "churn-mlp", "version": 1}],
                        "shadows": [{"name": "c", "model": "churn-gbm", "version": 4}]}],
        }
        config_path = work / "feedback.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = work / "worker.log"
        progress("starting the worker")
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "banditgate.cli", "feedback", "-c", str(config_path)],
                                       stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        launched = time.monotonic()
        while "feedback worker ready" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() - launched > 90:
                raise RuntimeError(f"the worker did not become ready:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        ready = time.monotonic()
        progress(f"worker ready after {ready - launched:.1f} s; draining")
        marks: dict[float, float] = {}
        joined = 0
        last_report = ready
        while joined < n:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() - ready > 240:
                raise RuntimeError(f"only {joined:,} of {n:,} outcomes joined after 240 s")
            joined = await _joined(client, prefix)
            now_m = time.monotonic()
            for fraction in (0.1, 0.9):
                if fraction not in marks and joined >= fraction * n:
                    marks[fraction] = now_m
            if now_m - last_report > 3:
                last_report = now_m
                progress(f"{joined:,} / {n:,} joined ({joined / (now_m - ready):,.0f}/s)")
            await asyncio.sleep(0.05)
        done = time.monotonic()
        cpu_s = cpu_seconds(process.pid)
        await asyncio.sleep(1.0)
        final = await _joined(client, prefix)
        if final != n:
            raise RuntimeError(f"Redis holds {final:,} joined outcomes, expected exactly {n:,}")
        seconds = done - ready
        result = {
            "scenario": "feedback",
            "outcomes_per_s": round(n / seconds, 1),
            "steady_outcomes_per_s": round(0.8 * n / max(1e-9, marks[0.9] - marks[0.1]), 1),
            "events_per_s": round(len(events) / seconds, 1),
            "target_outcomes_per_s": TARGET_OUTCOMES_PER_S,
            "meets_target": n / seconds >= TARGET_OUTCOMES_PER_S,
            "outcomes": n, "predictions": n, "shadow_predictions": n // 10, "events": len(events),
            "seconds": round(seconds, 3),
            "worker_cpu_s": None if cpu_s is None else round(cpu_s, 2),
            "outcomes_per_cpu_s": None if not cpu_s else round(n / cpu_s, 1),
            "bare_consumer_events_per_s": round(bare_events_per_s, 1),
            "worker_start_s": round(ready - launched, 2),
            "preload_s": round(preload_s, 2),
            "exact": True,
            "meta": {"quick": quick, "partitions": PARTITIONS, "cpus": os.cpu_count(),
                     "load_average": os.getloadavg(), "python": sys.version.split()[0],
                     "note": "one worker process; time from readiness to the last outcome counted in Redis; "
                             "worker CPU includes its start-up; the machine may be shared"},
        }
        return result
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        await _admin(addresses.kafka, delete=list(topics.values()) + [f"{app_id}-join-changelog"])
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=5000)]
        for start in range(0, len(keys), 5000):
            await client.delete(*keys[start:start + 5000])
        await client.aclose()
        if not os.environ.get("BANDITGATE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def markdown(result: dict[str, Any]) -> str:
    rows = [
        ("joined outcomes/s (one worker, with Redis)", f"{result['outcomes_per_s']:,.0f}"),
        ("steady state, 10%-90% (outcomes/s)", f"{result['steady_outcomes_per_s']:,.0f}"),
        ("all events/s (predictions + shadows + outcomes)", f"{result['events_per_s']:,.0f}"),
        ("outcomes per worker CPU-second", "n/a" if result["outcomes_per_cpu_s"] is None
         else f"{result['outcomes_per_cpu_s']:,.0f}"),
        ("bare aiokafka consumer, same topics (events/s)", f"{result['bare_consumer_events_per_s']:,.0f}"),
        ("target (outcomes/s)", f"{result['target_outcomes_per_s']:,}"),
    ]
    lines = ["| measure | value |", "| --- | ---: |"] + [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    lines.append(f"{result['outcomes']:,} outcomes joined exactly in {result['seconds']:.1f} s "
                 f"({result['meta']['cpus']} CPUs, load average {result['meta']['load_average'][0]:.1f})")
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    """Run the benchmark, write JSON to `out`, print a markdown table; returns the exit code."""
    result = asyncio.run(_run(quick))
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(markdown(result))
    progress(f"wrote {out}")
    return 0
