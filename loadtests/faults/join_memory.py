"""The join table under a flood of predictions no outcome ever answers: its memory stays bounded.

2 000 000 prediction events (the gateway's shape and partitioning) go straight to the predictions
topic as fast as the producer can batch them, while one feedback worker with a join budget
(`feedback.join_max_bytes`) consumes them. Its resident memory is sampled from /proc every
200 ms. Without a budget the worker would hold every prediction for `join_ttl_s` (7 days); with
one it evicts the oldest of each partition beyond its share, counting each as `unanswered` and
`evicted` in Redis. Every prediction must be consumed (the worker's committed offsets reach the
end of the topic) and accounted for: evicted (Redis, exact) plus still held (the worker's
`banditgate_feedback_join_entries`) equals what was sent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from gateway.transport.kafka_batches import OutboundBatches
from loadtests.faults.context import Context
from loadtests.faults.harness import ARMS, ROUTE, FeedbackProc, Processes, create_topics, feedback_config

PARTITIONS = 4
BUDGET_BYTES = 256 * 1024 * 1024
"""The whole table's budget (estimated bytes): about 250 000 gateway predictions."""
SEND_CHUNK = 20_000
PREDICTIONS = 2_000_000
"""Sent in the quick run too: the drain takes a few minutes on a 2-core machine."""


def prediction(request_id: str, index: int, now: float) -> bytes:
    arm = "a" if index % 2 else "b"
    model, version = ARMS[arm]
    probability = (index % 997) / 997.0
    return orjson.dumps({"request_id": request_id, "route": ROUTE, "arm": arm, "model": model,
                         "model_version": version, "policy": "thompson", "propensity": 0.5,
                         "outputs": {"probability": [probability], "label": int(probability >= 0.5)},
                         "ts_request": now - 0.002, "ts_predicted": now, "latency_ms": 1.5})


async def produce(bootstrap: str, topic: str, n: int) -> float:
    """Send `n` predictions (ids `jm-<i>`, partitioned by key as the gateway does, in aiokafka
    batches); returns the seconds it took until the broker acknowledged the last."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5,
                                max_batch_size=512 * 1024, request_timeout_ms=120_000)
    await producer.start()
    started = time.monotonic()
    try:
        batches = OutboundBatches(producer, {topic: PARTITIONS})
        pending: list[asyncio.Future] = []
        now = time.time()
        for start in range(0, n, SEND_CHUNK):
            for i in range(start, min(n, start + SEND_CHUNK)):
                request_id = f"jm-{i}"
                batches.add(topic, request_id.encode(), prediction(request_id, i, now + i / 100_000.0))
            pending.extend(sent.future for sent in await batches.send())
            if len(pending) > 64:  # bounded in flight: wait for the older half
                await asyncio.gather(*pending[:32])
                del pending[:32]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def _committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on `topic` (read by the admin API: it does not join the group)."""
    offsets = await admin.list_consumer_group_offsets(group)
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


async def _metric(port: int, name: str) -> float | None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        text = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    finally:
        writer.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def join_memory(ctx: Context) -> dict[str, Any]:
    n = PREDICTIONS
    prefix = ctx.prefix("join_memory")
    topics = await create_topics(ctx.kafka, prefix, PARTITIONS)
    app_id = f"{prefix}-fb"
    config = feedback_config(kafka=ctx.kafka, redis=ctx.redis, topics=topics, app_id=app_id, redis_prefix=prefix,
                             join_ttl_s=7 * 86400.0)
    config["feedback"]["join_max_bytes"] = BUDGET_BYTES
    config["feedback"]["partitions"] = PARTITIONS
    procs = Processes()
    worker = FeedbackProc("join_memory-worker", config, ctx.work)
    procs.add(worker)
    client = aredis.Redis.from_url(ctx.redis)
    admin = AIOKafkaAdminClient(bootstrap_servers=ctx.kafka)
    await admin.start()
    samples: list[float] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            rss = worker.rss_mb()
            if rss is not None:
                samples.append(rss)
            await asyncio.sleep(0.2)

    sampler = asyncio.get_running_loop().create_task(sample())
    result: dict[str, Any] = {}
    try:
        worker.spawn()
        await worker.wait_ready()
        port = int(worker.output().split("metrics on port ")[1].split()[0])
        idle_rss = worker.rss_mb()
        ctx.say(f"join_memory: worker ready ({idle_rss:.0f} MB); sending {n} predictions")
        started = time.monotonic()
        produce_s = await produce(ctx.kafka, topics["predictions"], n)
        ctx.say(f"join_memory: {n} predictions sent in {produce_s:.1f}s; waiting for the worker to commit them")
        ends = await _end_offsets(ctx.kafka, topics["predictions"])
        total = sum(ends.values())
        deadline = time.monotonic() + ctx.pick(420, 900)
        committed: dict[int, int] = {}
        last_report = time.monotonic()
        while time.monotonic() < deadline and worker.alive():
            committed = await _committed(admin, app_id, topics["predictions"])
            if all(committed.get(p, 0) >= end for p, end in ends.items()):
                break
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                ctx.say(f"join_memory: {sum(committed.values())}/{total} committed, "
                        f"RSS {samples[-1] if samples else 0:.0f} MB (max {max(samples, default=0):.0f})")
            await asyncio.sleep(0.5)
        drain_s = time.monotonic() - started
        # the evictions of the last batches, then the sweep's gauges (every 0.5 s)
        await asyncio.sleep(3.0)
        counts = {k.decode(): float(v) for k, v in (await client.hgetall(f"{prefix}:{{{ROUTE}}}:fb:counts")).items()}
        held = await _metric(port, "banditgate_feedback_join_entries") if worker.alive() else None
        table_bytes = await _metric(port, "banditgate_feedback_join_bytes") if worker.alive() else None
        evicted = int(counts.get("evicted", 0))
        uncommitted = sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())
        unaccounted = total - evicted - int(held or 0)
        result = {
            "sent": total, "produce_s": round(produce_s, 1), "drain_s": round(drain_s, 1),
            "events_per_s": round(total / drain_s) if drain_s > 0 else None,
            "evicted": evicted, "unanswered": int(counts.get("unanswered", 0)),
            "held": None if held is None else int(held),
            "table_mb": None if table_bytes is None else round(table_bytes / 2**20, 1),
            "uncommitted": uncommitted, "unaccounted": unaccounted,
            "lost": max(uncommitted, abs(unaccounted)),
            "budget_mb": BUDGET_BYTES / 2**20, "idle_rss_mb": round(idle_rss or 0, 1),
            "max_rss_mb": round(max(samples, default=0.0), 1),
            "rss_limit_mb": BUDGET_BYTES / 2**20 * 1.5 + 200,
        }
    finally:
        stop_sampling.set()
        await sampler
        await asyncio.to_thread(procs.stop_all)
        await admin.close()
        await client.aclose()
    result["crashes"] = procs.crashes()
    return result
