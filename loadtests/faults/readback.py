"""Reading the outputs back: a live tail of a topic, and what a scenario counts from it.

Every count a scenario reports comes from here (or from Redis): predictions are read with
`read_committed`, so an aborted or still-open transaction is never counted; a tail consumer has
no consumer group (it reads every partition from the start), so rebalances elsewhere do not
touch it, and it reconnects on its own across a broker restart.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer


@dataclass(slots=True)
class Rec:
    partition: int
    offset: int
    ts_ms: int  # broker append time (output topics use LogAppendTime)
    key: str
    value: bytes | None


@dataclass
class TopicTail:
    """Reads `topic` from the beginning for as long as it runs."""

    bootstrap: str
    topic: str
    keep_values: bool = False
    read_committed: bool = True
    records: list[Rec] = field(default_factory=list)
    keys: collections.Counter = field(default_factory=collections.Counter)
    on_records: Callable[[list[Rec]], None] | None = None
    _task: asyncio.Task | None = None
    _consumer: AIOKafkaConsumer | None = None

    async def start(self) -> "TopicTail":
        self._consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None,
                                          auto_offset_reset="earliest", enable_auto_commit=False,
                                          isolation_level="read_committed" if self.read_committed else "read_uncommitted",
                                          fetch_max_bytes=16 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024,
                                          request_timeout_ms=30_000)
        await self._consumer.start()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None  # noqa: S101
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=100, max_records=20_000)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - broker away: the consumer reconnects; keep reading
                await asyncio.sleep(0.2)
                continue
            got = []
            for records in batch.values():
                for r in records:
                    key = r.key.decode(errors="replace") if r.key is not None else ""
                    got.append(Rec(r.partition, r.offset, r.timestamp, key, r.value if self.keep_values else None))
            if got:
                self.records.extend(got)
                self.keys.update(rec.key for rec in got)
                if self.on_records is not None:
                    self.on_records(got)

    async def wait_for(self, done: Callable[[], bool], timeout_s: float, settle_s: float = 1.5,
                       progress: Callable[[], None] | None = None) -> bool:
        """Wait until `done()` (then `settle_s` more, so late extras are counted) or `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            if done():
                await asyncio.sleep(settle_s)
                return True
            if progress is not None and time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                progress()
            await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer is not None:
            await self._consumer.stop()


def dead_letters(tail: TopicTail, source_topic: str) -> list[dict]:
    """Decoded dead letters of `source_topic` (the tail must keep values)."""
    out = []
    for rec in tail.records:
        if rec.value is None:
            continue
        doc = orjson.loads(rec.value)
        if doc.get("topic") == source_topic:
            out.append(doc)
    return out


def delivery(order: dict[int, list[str]], predictions: Iterable[Rec], dead_keys: set[str] = frozenset()) -> dict:
    """Counts for requests sent in `order` (partition -> ids in produce order):

    answered (distinct ids with a prediction), lost (neither answered nor dead-lettered),
    duplicates (predictions beyond the first per id) and order violations: per partition, a
    request answered for the first time after a later request of the same partition was
    (a replayed duplicate is not a violation; its first answer is what counts).
    """
    position: dict[str, int] = {}
    for ids in order.values():
        for index, request_id in enumerate(ids):
            position[request_id] = index
    per_partition: dict[int, list[Rec]] = collections.defaultdict(list)
    counts: collections.Counter = collections.Counter()
    for rec in predictions:
        if rec.key in position:
            counts[rec.key] += 1
            per_partition[rec.partition].append(rec)
    violations = 0
    for recs in per_partition.values():
        recs.sort(key=lambda r: r.offset)
        seen: set[str] = set()
        high = -1
        for rec in recs:
            if rec.key in seen:
                continue
            seen.add(rec.key)
            pos = position[rec.key]
            if pos < high:
                violations += 1
            high = max(high, pos)
    sent = len(position)
    answered = len(counts)
    lost = sum(1 for request_id in position if request_id not in counts and request_id not in dead_keys)
    return {"sent": sent, "answered": answered, "lost": lost,
            "duplicates": sum(c - 1 for c in counts.values()), "order_violations": violations}


def longest_gaps_ms(records: Iterable[Rec], start_ms: int, end_ms: int) -> dict[int, int]:
    """Per partition, the longest gap between consecutive outputs appended in [start_ms, end_ms]."""
    stamps: dict[int, list[int]] = collections.defaultdict(list)
    for rec in records:
        if start_ms <= rec.ts_ms <= end_ms:
            stamps[rec.partition].append(rec.ts_ms)
    out = {}
    for partition, values in stamps.items():
        values.sort()
        out[partition] = max((b - a for a, b in zip(values, values[1:])), default=0)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return float(ordered[rank])
