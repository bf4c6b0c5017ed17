"""`banditgate bench client`: how many requests/s `KafkaClient.send` gets acknowledged by the
broker from one process (issue 22: >= 50 000 on this machine).

Each run sends a bounded count of requests (or stops at a time limit) to a fresh 4-partition topic
on the local stack and waits for every acknowledgement: `send_rps` is acknowledged requests over
the time from the first send to the last acknowledgement, counted by the client's delivery
callbacks (failures are counted apart) and checked against the topic's end offsets; a sample of
the records is validated against the published request schema. The same rows, route and checks
go through `send` as a service calls it (validation, request id, W3C traceparent, JSON).

Baseline in the same run: the per-record path `send` had before (the checked event, a uuid4
request id, a fresh traceparent, one `AIOKafkaProducer.send()` and delivery future per request).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from banditgate.client import KafkaClient
from banditgate.client.validation import request_event
from banditgate.events import json_schemas
from banditgate.stack import Stack
from banditgate.tracecontext import trace_context
from loadtests.kafka_harness import create_topics, delete_topics, progress

ROUTE = "churn"
N_FEATURES = 32
PARTITIONS = 4


def _rows(n: int) -> list[list[float]]:
    return [[(i * 31 + j) % 97 / 97.0 for j in range(N_FEATURES)] for i in range(n)]


async def _client_send(bootstrap: str, topic: str, count: int, limit_s: float) -> dict[str, Any]:
    rows = _rows(256)
    async with KafkaClient(bootstrap, requests_topic=topic) as client:
        await client.send(ROUTE, {"input": rows[0]})  # metadata and connections before the clock starts
        await client.flush()
        started = time.monotonic()
        deadline = started + limit_s
        sent = 1
        for i in range(1, count):
            await client.send(ROUTE, {"input": rows[i & 255]})
            sent += 1
            if not i & 4095 and time.monotonic() > deadline:
                break
        queued_s = time.monotonic() - started
        await client.flush()
        acked_s = time.monotonic() - started
        stats = client.send_stats()
    return {"sent": sent, "delivered": stats["delivered"] - 1, "failed": stats["failed"],
            "seconds": round(acked_s, 3), "send_loop_seconds": round(queued_s, 3),
            "rps": round((stats["delivered"] - 1) / acked_s, 1)}


async def _per_record_send(bootstrap: str, topic: str, count: int, limit_s: float) -> dict[str, Any]:
    """The path `send` had before batching (kept here as the baseline)."""
    rows = _rows(256)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", enable_idempotence=True,
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        warm = request_event(ROUTE, {"input": rows[0]}, unit=None, request_id=None, reply_to=None, items=None,
                             routes=None, metadata=None)
        await (await producer.send(topic, orjson.dumps(warm), key=b"warm"))
        futures = []
        started = time.monotonic()
        deadline = started + limit_s
        for i in range(count):
            event = request_event(ROUTE, {"input": rows[i & 255]}, unit=None, request_id=None, reply_to=None,
                                  items=None, routes=None, metadata=None)
            futures.append(await producer.send(topic, orjson.dumps(event), key=event["request_id"].encode(),
                                               headers=trace_context(None)))
            if not i & 4095 and time.monotonic() > deadline:
                break
        queued_s = time.monotonic() - started
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked_s = time.monotonic() - started
    finally:
        await producer.stop()
    failed = sum(isinstance(r, BaseException) for r in results)
    # the warm-up record is on the topic too (topic_records counts it), not in `delivered`
    return {"sent": len(futures), "delivered": len(futures) - failed, "failed": failed, "seconds": round(acked_s, 3),
            "send_loop_seconds": round(queued_s, 3), "rps": round((len(futures) - failed) / acked_s, 1)}


async def _topic_check(bootstrap: str, topic: str, sample: int = 200) -> tuple[int, int]:
    """(records on the topic by its end offsets, how many of the first `sample` are valid requests)."""
    schema = json_schemas()["request"]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        total = sum((await consumer.end_offsets(partitions)).values())
        valid = 0
        seen = 0
        deadline = time.monotonic() + 20
        while seen < sample and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=sample)).values():
                for record in records:
                    if seen >= sample:
                        break
                    seen += 1
                    try:
                        jsonschema.validate(orjson.loads(record.value), schema)
                        valid += 1
                    except jsonschema.ValidationError:
                        pass
    finally:
        await consumer.stop()
    return total, valid


async def _phase(name: str, bootstrap: str, run_id: str, created: list[str],
                 body: Callable[[str, str, int, float], Awaitable[dict[str, Any]]], count: int,
                 limit_s: float) -> dict[str, Any]:
    topic = f"bench-client-{run_id}-{name}"
    await create_topics(bootstrap, [topic], partitions=PARTITIONS)
    created.append(topic)
    progress(f"{name}: sending up to {count} requests (at most {limit_s:.0f}s)")
    cpu = time.process_time()
    load = os.getloadavg()[0]
    result = await body(bootstrap, topic, count, limit_s)
    # this process's CPU (client and producer, all threads) per acknowledged request: what the
    # machine's other load does not change much, unlike requests/s
    result["cpu_us_per_request"] = round((time.process_time() - cpu) / max(1, result["delivered"]) * 1e6, 2)
    result["loadavg_1m_before"] = round(load, 2)
    result["topic_records"], result["sample_valid"] = await _topic_check(bootstrap, topic)
    progress(f"{name}: {result['delivered']} acknowledged in {result['seconds']}s = {result['rps']:,.0f}/s "
             f"({result['topic_records']} records on the topic)")
    return result


async def _run(quick: bool) -> dict[str, Any]:
    addresses = Stack.default().up(progress)
    run_id = uuid.uuid4().hex[:6]
    count = 100_000 if quick else 400_000
    baseline_count = 20_000 if quick else 60_000
    limit_s = 20.0 if quick else 60.0
    created: list[str] = []
    try:
        batched = await _phase("send", addresses.kafka, run_id, created, _client_send, count, limit_s)
        before = await _phase("per_record", addresses.kafka, run_id, created, _per_record_send, baseline_count,
                              limit_s)
    finally:
        if created:
            await delete_topics(addresses.kafka, created)
    load = os.getloadavg()
    return {"send_rps": batched["rps"], "send": batched, "per_record_send": before,
            "ratio_vs_per_record": round(batched["rps"] / before["rps"], 2) if before["rps"] else None,
            "meta": {"quick": quick, "features": N_FEATURES, "partitions": PARTITIONS, "cpus": os.cpu_count(),
                     "loadavg_1m_at_end": round(load[0], 2), "event_loop": "asyncio (default)",
                     "note": "one process, one asyncio loop; rps = broker-acknowledged requests / (first send to "
                             "last acknowledgement); topic_records from the topic's end offsets; the first "
                             "(warm-up) send is not counted"}}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| path | requests acknowledged | seconds | requests/s | CPU us/request | failed | valid sample |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, label in (("send", "KafkaClient.send (batched)"), ("per_record_send", "per-record producer.send()")):
        r = results[key]
        lines.append(f"| {label} | {r['delivered']:,} | {r['seconds']:.2f} | {r['rps']:,.0f} | {r['cpu_us_per_request']:.1f} | "
                     f"{r['failed']} | "
                     f"{r['sample_valid']}/200 |")
    lines.append("")
    lines.append(f"send_rps = {results['send_rps']:,.0f} ({results['ratio_vs_per_record']}x the per-record path); "
                 f"load average at the end {results['meta']['loadavg_1m_at_end']} on {results['meta']['cpus']} CPUs")
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    results = asyncio.run(_run(quick))
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    table = markdown(results)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    progress(f"wrote {out}")
    return 0
