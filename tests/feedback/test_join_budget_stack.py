"""A real worker with a small join budget (`feedback.join_max_entries`) on the real Kafka and
Redis, with the in-memory store and with the RocksDB store (`feedback.join_store: rocksdb`, skipped
when rocksdict is not installed): it evicts the oldest entries of each partition beyond its
share, counts every eviction exactly, and a restarted worker recovers the same bounded table —
from the changelog, or from its own disk."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from gateway.transport.kafka_batches import partition_for
from tests.feedback.worker_helpers import WorkerProcess, counts, outcome, prediction, wait_until, write_config
from tests.kafka_helpers import produce

pytestmark = pytest.mark.stack

BUDGET = 400
PARTITIONS = 4
SHARE = BUDGET // PARTITIONS


async def metric(worker: WorkerProcess, name: str) -> float | None:
    """One sample of the worker's Prometheus endpoint (None if absent)."""
    port = int(worker.output().split("metrics on port ")[1].split()[0])
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


ROCKSDB = pytest.param("rocksdb", marks=pytest.mark.skipif(
    importlib.util.find_spec("rocksdict") is None,
    reason="rocksdict is not installed (pip install 'banditgate[rocksdb]'): the rocksdb join store is not tested"))


@pytest.mark.parametrize("store", ["memory", ROCKSDB])
async def test_a_small_budget_evicts_counts_and_survives_a_restart(stack, topics, redis, redis_prefix, unique,
                                                                   tmp_path, start_worker, store) -> None:
    """1 000 predictions that no outcome answers, a budget of 400 entries (100 per partition): each
    partition keeps its 100 newest and evicts the rest as unanswered, counted once each. After a
    SIGKILL a new worker recovers exactly those 400 — from the changelog into memory, or with the
    RocksDB store first from its own disk, then (as a worker on another machine would) from the
    changelog into an empty folder. Outcomes for them all join; outcomes for evicted ones find
    nothing (they wait as early outcomes) and push the oldest joined entries out instead."""
    now = time.time()
    ids = [f"bud-{i}" for i in range(1000)]
    partition_of = {r: partition_for(r.encode(), PARTITIONS) for r in ids}
    per_partition: dict[int, list[str]] = {p: [r for r in ids if partition_of[r] == p] for p in range(PARTITIONS)}
    assert all(len(members) > SHARE for members in per_partition.values())
    kept = {r for members in per_partition.values() for r in members[-SHARE:]}  # the newest of each partition
    evicted = [r for r in ids if r not in kept]
    settings: dict[str, Any] = {"join_ttl_s": 3600.0, "join_max_entries": BUDGET,
                                "kafka_settings": {"session_timeout_ms": 6000}}
    if store == "rocksdb":
        settings.update(join_store="rocksdb", join_store_dir=str(tmp_path / "disk-a"))
    worker = start_worker(**settings)
    await worker.wait_ready()
    # one second apart, oldest first: each in its own timer bucket, so the eviction order is exact
    await produce(stack.kafka, topics.topics.predictions, [
        (r.encode(), prediction(r, "churn", "a", "churn-gbm", 3, 0.4, now - 1200 + i)) for i, r in enumerate(ids)])

    async def evictions_counted() -> dict[str, float] | None:
        got = await counts(redis, redis_prefix, "churn")
        return got if got.get("evicted", 0) >= len(evicted) else None

    got = await wait_until(evictions_counted, 60, f"{len(evicted)} evictions", worker)

    async def table_bounded() -> bool:
        return await metric(worker, "banditgate_feedback_join_entries") == BUDGET

    await wait_until(table_bounded, 30, f"{BUDGET} entries in the table", worker)
    await asyncio.sleep(2.5)  # past the 1 s offset commit: nothing of this is replayed
    assert got.get("evicted") == len(evicted) and got.get("unanswered") == len(evicted)
    assert got.get("evicted|a") == len(evicted)
    assert await metric(worker, 'banditgate_feedback_join_evictions_total{reason="unanswered",route="churn"}') \
        == len(evicted)
    assert (await metric(worker, "banditgate_feedback_join_bytes") or 0) > 0
    worker.kill()

    if store == "rocksdb":  # restarted on the same disk: faust reads only the changelog's tail
        same_disk = start_worker()
        await same_disk.wait_ready()
        await wait_until(lambda: _entries_are(same_disk, BUDGET), 30, "the table read from disk", same_disk)
        assert "partitions [0, 1, 2, 3] assigned (400 entries" in same_disk.output()
        same_disk.kill()
        # another machine: an empty folder, everything recovered (and indexed) from the changelog
        settings["join_store_dir"] = str(tmp_path / "disk-b")
        second = WorkerProcess(write_config(tmp_path / "feedback-b.yaml", kafka=stack.kafka, redis=stack.redis,
                                            topics=topics.topics.model_dump(), redis_prefix=redis_prefix,
                                            app_id=f"fb-{unique}", **settings), tmp_path / "worker-b.log").start()
    else:
        second = start_worker()
    try:
        await _finish(stack, topics, redis, redis_prefix, second, partition_of, kept, evicted)
    finally:
        second.stop()


async def _finish(stack: Any, topics: Any, redis: Any, redis_prefix: str, second: WorkerProcess,
                  partition_of: dict[str, int], kept: set[str], evicted: list[str]) -> None:
    await second.wait_ready()
    await wait_until(lambda: _entries_are(second, BUDGET), 30, "the recovered table's size", second)
    late = evicted[-50:]  # their predictions are gone: these outcomes wait for one
    await produce(stack.kafka, topics.topics.outcomes, [
        (r.encode(), outcome(r, time.time(), reward=1.0, label=1)) for r in [*sorted(kept), *late]])

    async def all_joined() -> dict[str, float] | None:
        got = await counts(redis, redis_prefix, "churn")
        return got if got.get("joined", 0) >= len(kept) else None

    await wait_until(all_joined, 60, f"{len(kept)} joined", second)
    # each partition holds its joined entries plus the early outcomes; over its share it evicts
    # joined ones (settled: they only recognise duplicates) before any outcome still waiting
    over = Counter(partition_of[r] for r in late)

    async def settled_evicted() -> dict[str, float] | None:
        got = await counts(redis, redis_prefix, "churn")
        return got if got.get("evicted", 0) >= len(evicted) + sum(over.values()) else None

    await wait_until(settled_evicted, 30, "the oldest joined entries evicted", second)
    await asyncio.sleep(1.5)  # a double count would land now
    got = await counts(redis, redis_prefix, "churn")
    assert got["joined"] == len(kept)  # every kept prediction was recovered, no evicted one
    assert got["evicted"] == len(evicted) + sum(over.values())
    assert got["unanswered"] == len(evicted)
    assert "orphan" not in got and "default" not in got
    assert (await counts(redis, redis_prefix, "_none")).get("orphan", 0) == 0  # the late ones still wait
    assert await metric(second, 'banditgate_feedback_join_evictions_total{reason="settled",route="churn"}') \
        == sum(over.values())
    assert second.stop() == 0


async def _entries_are(worker: WorkerProcess, expected: int) -> Any:
    return await metric(worker, "banditgate_feedback_join_entries") == expected


async def test_a_second_worker_takes_partitions_and_both_keep_counting(stack, topics, redis, redis_prefix,
                                                                      start_worker) -> None:
    """A second worker joins the group: the first loses half of its partitions (their entries
    leave its memory; the second recovers them from the changelog) and keeps running — before,
    dropping a revoked partition's entries raised (`pop_due(inf)`: inf // 1.0 is nan) and the
    first worker stopped at its first rebalance. Predictions consumed by the first and their
    outcomes by the second still join exactly once."""
    now = time.time()
    ids = [f"reb-{i}" for i in range(400)]
    first = start_worker(kafka_settings={"session_timeout_ms": 6000})
    await first.wait_ready()
    await produce(stack.kafka, topics.topics.predictions, [
        (r.encode(), prediction(r, "churn", "a", "churn-gbm", 3, 0.4, now)) for r in ids])
    await wait_until(lambda: _entries_are(first, len(ids)), 30, "the first worker holding every prediction", first)
    second = start_worker()
    await second.wait_ready()
    await first.wait_for("revoked", timeout_s=60)
    await asyncio.sleep(2.0)  # the first worker's sweeps after the revocation
    assert first.process is not None and first.process.poll() is None, first.output()[-3000:]
    await produce(stack.kafka, topics.topics.outcomes, [(r.encode(), outcome(r, time.time(), reward=1.0)) for r in ids])

    async def all_joined() -> bool:
        return (await counts(redis, redis_prefix, "churn")).get("joined", 0) >= len(ids)

    await wait_until(all_joined, 60, "every outcome joined", first)
    await asyncio.sleep(1.0)
    assert (await counts(redis, redis_prefix, "churn"))["joined"] == len(ids)
    assert first.process.poll() is None and second.process is not None and second.process.poll() is None
