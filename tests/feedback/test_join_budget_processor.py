"""The join processor keeps the table within its budget (feedback/agents.py): batches evict the
oldest entries of a partition over its share, even while earlier batches are still being written
(joined ahead), through the same Redis-then-changelog path as any change; an idle worker's sweep
evicts what a smaller budget leaves over. Redis and the changelog are fakes with the real ones'
semantics (a token applies once; the changelog is a list); the real stack is in
test_join_budget_stack.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from banditgate.config import Topics
from feedback.agents import JoinProcessor, SourceMessage
from feedback.join import Count, JoinRules, RouteRules
from feedback.metrics import FeedbackMetrics
from feedback.sinks import Applied
from feedback.state import JoinBudget, JoinTable

TOPICS = Topics()
RULES = JoinRules(ttl_s=3600.0, routes={"churn": RouteRules()})
NOW = 1.7e9


class Ledger:
    """RedisSink's plan/apply_planned: each (route, request_id, token) applies once."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str, str]] = set()
        self.counts: Counter[str] = Counter()

    def plan(self, effects: list[Any]) -> list[Any]:
        return [list(effects)]

    async def apply_planned(self, chunks: list[Any], metrics: Any = None) -> Applied:
        await asyncio.sleep(0)
        applied = []
        for effect in chunks[0]:
            if isinstance(effect, Count) and (effect.route, effect.request_id, effect.token) not in self.seen:
                self.seen.add((effect.route, effect.request_id, effect.token))
                self.counts[effect.kind] += 1
                applied.append(effect)
        return Applied(applied, 0, 0, [])


class Out:
    def dead_letter(self, key: bytes | None, error: str, reason: str, topic: str, partition: int, offset: int,
                    payload: bytes) -> tuple[str, bytes | None, bytes]:
        return "deadletter", key, payload

    async def send_all(self, messages: Any) -> None:
        await asyncio.sleep(0)


class _Batch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None]] = []

    def append(self, key: bytes, value: bytes | None, timestamp: None) -> int:
        self.records.append((key, value))
        return 1


class Changelog:
    """A producer whose acknowledgements wait a few loop turns (so batches overlap)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes, bytes | None]] = []

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[None]:
        self.records.extend((partition, key, value) for key, value in batch.records)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def acknowledge() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
            future.set_result(None)

        asyncio.ensure_future(acknowledge())
        return future


def predictions(start: int, count: int) -> list[SourceMessage]:
    """Predictions `p-<i>`, one second apart (their own timer buckets), partition i % 4."""
    out = []
    for i in range(start, start + count):
        value = orjson.dumps({"request_id": f"p-{i:05d}", "route": "churn", "arm": "a", "model": "m",
                              "model_version": 1, "policy": "thompson", "propensity": 0.5,
                              "outputs": {"probability": [0.7], "label": 1}, "ts_request": NOW + i,
                              "ts_predicted": NOW + i, "latency_ms": 1.0})
        out.append(SourceMessage(TOPICS.predictions, i % 4, i, f"p-{i:05d}".encode(), value, 0))
    return out


def processor(budget: JoinBudget, store: dict[bytes, Any] | None = None, synced: bool = True
              ) -> tuple[JoinProcessor, JoinTable, Ledger, Changelog]:
    changelog = Changelog()
    table = JoinTable({} if store is None else store, changelog, "changelog", RULES, budget=budget)
    if synced:
        table.sync_partitions(range(4))
    ledger = Ledger()
    proc = JoinProcessor(table=table, redis=ledger, out=Out(), rules=RULES, topics=TOPICS,  # type: ignore[arg-type]
                         metrics=FeedbackMetrics(CollectorRegistry()), clock=lambda: NOW + 2000)
    return proc, table, ledger, changelog


def test_batches_joined_ahead_evict_each_victim_once_and_keep_the_newest() -> None:
    async def run() -> None:
        proc, table, ledger, changelog = processor(JoinBudget(max_entries=40, partitions=4))
        written = [await proc.submit(predictions(start, 30)) for start in range(0, 300, 30)]  # 2 in flight at most
        await asyncio.gather(*written)
        await proc.drain()
        while table.over_budget():  # the last batches' surplus: the next batch's job, or an idle sweep
            await proc.sweep({0, 1, 2, 3})
        tombstones = Counter(partition for partition, _key, value in changelog.records if value is None)
        assert len(table) == 40 and ledger.counts["evicted"] == 260 == ledger.counts["unanswered"]
        assert tombstones == {p: 65 for p in range(4)}  # each victim's tombstone once
        assert all(table.get(f"p-{i:05d}") is not None for i in range(260, 300))  # the newest 10 of each
        assert all(table.get(f"p-{i:05d}") is None for i in range(260))

    asyncio.run(run())


def test_an_idle_sweep_evicts_what_a_smaller_budget_leaves_over() -> None:
    async def run() -> None:
        store: dict[bytes, Any] = {}
        proc, table, ledger, _ = processor(JoinBudget(partitions=4), store)
        await (await proc.submit(predictions(0, 100)))
        assert len(table) == 100 and ledger.counts["evicted"] == 0
        # a restart with a smaller budget: the same store (as recovered), a new table and processor
        proc, table, ledger, _ = processor(JoinBudget(max_entries=20, partitions=4), store, synced=False)
        await proc.sweep({0, 1, 2, 3})  # indexes the recovered entries, then evicts
        assert len(table) == 20 and ledger.counts["evicted"] == 80 and not table.over_budget()

    asyncio.run(run())
