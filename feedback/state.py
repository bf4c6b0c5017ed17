"""The join table's storage: a faust table (in-memory store, changelog topic) written in batches.

faust writes a table's changelog one ``send_soon`` per key change and picks the changelog
partition from the *current* stream event; the worker processes events in batches from all
partitions at once, so it writes instead, per batch: one aiokafka record batch per changelog
partition (the entry's own source partition, keeping the table co-partitioned with its topics),
awaited until the broker acknowledged it, and only then the in-memory store. faust still owns
the table's lifecycle: it creates the changelog topic, and on start and on every rebalance it
recovers the assigned partitions from the changelog (its memory store reads them from the
beginning). The changelog is compacted and deleted entries are written as tombstones, so both
memory and the topic stay bounded by what is pending or recently joined.

For timers (default rewards, expiry) each assigned partition has a :class:`DueIndex`, rebuilt
from the store when a partition is (re)assigned; a revoked partition's entries are dropped from
memory (the new owner recovers them from the changelog).

The table is bounded by a :class:`JoinBudget` (estimated bytes and/or entries, for the whole
table; each partition holds at most its share, so a partition's state is bounded whichever worker
owns it and a worker that recovers partitions recovers bounded state). The same index orders the
entries for eviction (:data:`feedback.join.LANE_SETTLED`): the processor takes the victims from
:meth:`JoinTable.evictions` and writes their deletion to the changelog like any other change.
"""

from __future__ import annotations

import asyncio
import builtins  # JoinTable.bytes (a property) hides the type in its class body
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from feedback.join import LANES, DueIndex, Entry, JoinRules, decode_entry, encode_entry, schedule_of

if TYPE_CHECKING:
    from feedback.producer import ReplaceableProducer

log = logging.getLogger("banditgate.feedback.state")

# What one entry costs in the in-memory store, fitted to the growth of a process's RSS from
# 100 000 to 400 000 entries decoded from gateway-shaped events by the worker's own decoder
# (Python 3.11; measured per entry: 1 052 bytes for a prediction, 1 424 joined, 1 454 with a
# shadow, 777 for an outcome alone, 528 recovered as bytes): twice the stored bytes (key and
# encoded value: the strings and numbers they decode to), plus the store's and the timer
# index's slots, plus the objects of each part an entry holds decoded.
# tests/feedback/test_join_budget.py keeps the estimate above what tracemalloc counts.
MEMORY_DECODED_BASE = 260
MEMORY_PRIMARY = 540
MEMORY_OUTCOME = 320
MEMORY_SHADOW = 340
MEMORY_RAW_BASE = 260

Encoded = tuple[dict[int, list[tuple[bytes, bytes | None]]], list[int]]
"""Changelog records by partition, and each change's stored size (key + value; 0 for a delete)
in the order of the changes."""


def memory_bytes(entry: Entry | None, stored: int) -> int:
    """Estimated memory of an entry whose key and encoded value take `stored` bytes, held decoded
    (`entry`) or as the stored bytes (None)."""
    if entry is None:
        return MEMORY_RAW_BASE + 2 * stored
    size = MEMORY_DECODED_BASE + 2 * stored + MEMORY_SHADOW * len(entry.shadows)
    if entry.primary is not None:
        size += MEMORY_PRIMARY
    if entry.outcome is not None:
        size += MEMORY_OUTCOME
    return size


@dataclass(frozen=True, slots=True)
class JoinBudget:
    """How much join state the whole table may hold (None: no cap), and over how many partitions
    it is spread: each partition holds at most its share (rounded up)."""

    max_bytes: int | None = None
    max_entries: int | None = None
    partitions: int = 1

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_entries"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions!r}")

    def share(self) -> tuple[int | None, int | None]:
        """(entries, bytes) one partition may hold."""
        n = self.partitions
        return (None if self.max_entries is None else -(-self.max_entries // n),
                None if self.max_bytes is None else -(-self.max_bytes // n))


async def send_changelog(producer: ReplaceableProducer, topic: str, by_partition: Mapping[int, list[tuple[bytes, bytes | None]]]
                         ) -> dict[int, int]:
    """Write changelog records (one aiokafka record batch per partition, more when one is full)
    and wait for the broker's acknowledgement; returns each partition's last offset. Raises
    KafkaError on failure (nothing is known to be written then; sending again is safe: the
    records are the entries' latest state)."""
    futures = []
    counts = []
    for partition, records in by_partition.items():
        batch = producer.create_batch()
        appended = 0
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                counts.append((partition, appended))
                batch = producer.create_batch()
                appended = 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"join entry for {key!r} does not fit in one producer batch")
            appended += 1
        futures.append(await producer.send_batch(batch, topic, partition=partition))
        counts.append((partition, appended))
    last: dict[int, int] = {}
    if futures:
        for (partition, appended), metadata in zip(counts, await asyncio.gather(*futures)):
            offset = getattr(metadata, "offset", None)  # a RecordMetadata: the batch's first offset
            if isinstance(offset, int) and appended:
                last[partition] = max(last.get(partition, -1), offset + appended - 1)
    return last


class ChangelogRecord(Protocol):
    """What changelog recovery reads of a record (aiokafka's ConsumerRecord, untyped, has these)."""

    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def offset(self) -> int: ...


def apply_changelog_records(store: Any, partition: int, records: Sequence[ChangelogRecord]) -> None:  # Any: faust's StoreT declares neither the memory store's `data` nor our `apply_records`
    """Write recovered changelog records (key, value or None for a tombstone, offset; in offset
    order) into the table's store: faust's memory store's dict, or the disk store (which indexes
    them as it writes)."""
    apply = getattr(store, "apply_records", None)
    if apply is not None:
        apply(partition, records)
        return
    data = store.data
    pop = data.pop
    for record in records:
        value = record.value
        if value is None:
            pop(record.key, None)
        else:
            data[record.key] = value


class JoinTable:
    """Entries by request_id over a faust table's store, with batched changelog writes.

    The store maps the request_id (bytes) to the entry: bytes as recovered from the changelog,
    or the decoded :class:`Entry` for what this worker wrote (the changelog gets the bytes).
    faust's memory store never serializes values itself (only recovery writes to it), so
    keeping the object saves decoding each entry again on its next event."""

    def __init__(self, store: MutableMapping[bytes, bytes | Entry], producer: ReplaceableProducer, changelog_topic: str,
                 rules: JoinRules, index_resolution_s: float = 1.0, budget: JoinBudget | None = None) -> None:
        self._store = store
        self._data: MutableMapping[bytes, bytes | Entry] = getattr(store, "data", store)  # the memory store's own dict
        self._producer = producer
        self.changelog_topic = changelog_topic
        self._rules = rules
        self._resolution_s = index_resolution_s
        self._indexes: dict[int, DueIndex] = {}
        self._synced: set[int] = set()  # partitions whose recovered entries have been indexed
        self.budget = budget or JoinBudget()
        self._share_entries, self._share_bytes = self.budget.share()

    def __len__(self) -> int:
        return len(self._store)

    @property
    def bytes(self) -> int:
        """Estimated memory of the indexed entries (:func:`memory_bytes`)."""
        return sum(index.bytes for index in self._indexes.values())

    def over_budget(self) -> bool:
        """Whether some partition holds more than its share of the budget (O(partitions))."""
        entries, size = self._share_entries, self._share_bytes
        if entries is None and size is None:
            return False
        return any(index.over(entries, size) for index in self._indexes.values())

    def evictions(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (partition, request_id) to evict, in eviction order per partition, until
        every partition is within its share; removed from the index (the caller deletes them)."""
        out: list[tuple[int, str]] = []
        entries, size = self._share_entries, self._share_bytes
        for partition, index in self._indexes.items():
            if len(out) >= limit:
                break
            out.extend((partition, key) for key, _ in index.pop_evict(entries, size, limit - len(out)))
        return out

    @property
    def partitions(self) -> frozenset[int]:
        """Partitions whose entries are indexed (assigned and recovered)."""
        return frozenset(self._synced)

    def get(self, request_id: str, partition: int | None = None) -> Entry | None:
        """The entry for a request (entries this worker wrote are kept decoded in the store;
        those recovered from the changelog are bytes until first read). `partition` (the
        request's) is what a store kept per partition needs; this one ignores it."""
        raw = self._data.get(request_id.encode())
        if raw is None or type(raw) is Entry:
            return raw
        return decode_entry(request_id, raw)

    @staticmethod
    def encode(changes: Mapping[str, tuple[int, Entry | None]], values: Mapping[str, builtins.bytes] | None = None) -> Encoded:
        """The changelog records of `changes` (key, value or None for a tombstone) by partition,
        and their stored sizes: pure CPU, done while the batch's Redis writes are in flight.
        `values`: entries encoded already (by request_id; the processor encodes each change when
        it checks its size), used instead of encoding them again."""
        encoded: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        sizes: list[int] = []
        size = sizes.append
        for request_id, (partition, entry) in changes.items():
            key = request_id.encode()
            if entry is None:
                encoded[partition].append((key, None))
                size(0)
            elif values is not None and request_id in values:
                value = values[request_id]
                encoded[partition].append((key, value))
                size(len(key) + len(value))
            else:
                # orjson's output keeps a 4 KiB buffer whatever its length; the batch's records
                # wait for Redis and the broker, so a right-sized copy (0.1 us) holds 8 000 of
                # them in about 1 MB instead of 32 (measured: 58 MB less peak RSS)
                value = bytes(memoryview(encode_entry(entry)))
                encoded[partition].append((key, value))
                size(len(key) + len(value))
        return encoded, sizes

    async def persist(self, changes: Mapping[str, tuple[int, Entry | None]], encoded: Encoded | None = None) -> None:
        """Write changed entries (None: delete) to the changelog, wait for the broker's
        acknowledgement, then to memory, and reschedule their timers. `encoded` is
        `encode(changes)` when the caller made it already. Raises KafkaError on failure; nothing
        is changed in memory then, and the same call may be retried."""
        if encoded is None:
            encoded = self.encode(changes)
        by_partition, sizes = encoded
        await send_changelog(self._producer, self.changelog_topic, by_partition)
        data = self._data
        indexes = self._indexes
        rules = self._rules
        # `schedule` and `memory_bytes` inlined: this runs for every change of every batch
        for (request_id, (partition, entry)), stored in zip(changes.items(), sizes):
            index = indexes.get(partition)
            if entry is None:
                data.pop(request_id.encode(), None)
                if index is not None:
                    index.discard(request_id)
                continue
            data[request_id.encode()] = entry
            if index is None:  # written before the sweeper synced the assignment; the sync indexes the rest
                index = indexes[partition] = DueIndex(self._resolution_s, LANES)
            due, lane = schedule_of(entry, rules)
            size = MEMORY_DECODED_BASE + 2 * stored
            if entry.primary is not None:
                size += MEMORY_PRIMARY
            if entry.outcome is not None:
                size += MEMORY_OUTCOME
            if entry.shadows:
                size += MEMORY_SHADOW * len(entry.shadows)
            index.set(request_id, due, lane, size)

    def schedule(self, partition: int, request_id: str, entry: Entry | None, stored: int | None = None,
                 raw: bool = False) -> None:
        """(Re)schedule the entry's next timer check and its place in eviction order (`stored`:
        its key and encoded value's size, computed when not given; `raw`: the store holds it as
        bytes); forget it if deleted."""
        index = self._indexes.get(partition)
        if index is None:
            if entry is None:
                return
            # written before the sweeper synced the assignment; the sync indexes the rest
            index = self._indexes[partition] = DueIndex(self._resolution_s, LANES)
        if entry is None:
            index.discard(request_id)
        else:
            if stored is None:
                stored = len(request_id.encode()) + len(encode_entry(entry))
            due, lane = schedule_of(entry, self._rules)
            index.set(request_id, due, lane, memory_bytes(None if raw else entry, stored))

    def has_due(self, now: float) -> bool:
        """Whether `pop_due(now, ...)` may return anything (cheap; may say yes for nothing)."""
        return any(index.has_due(now) for index in self._indexes.values())

    def pop_due(self, now: float, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (partition, request_id) pairs due at `now`, removed from the index."""
        out: list[tuple[int, str]] = []
        for partition, index in self._indexes.items():
            out.extend((partition, key) for key in index.pop_due(now, limit - len(out)))
            if len(out) >= limit:
                break
        return out

    def sync_partitions(self, assigned: Iterable[int]) -> tuple[set[int], set[int]]:
        """Match the indexes to the assigned partitions (call when faust is not rebalancing or
        recovering). Returns (added, removed) partitions."""
        assigned = set(assigned)
        removed = (set(self._indexes) | self._synced) - assigned
        added = assigned - self._synced
        for partition in removed:
            self._synced.discard(partition)
            index = self._indexes.pop(partition, None)
            # (pop_due(inf) raised: inf // 1.0 is nan, so a revocation stopped the worker)
            for key in index.pop_all() if index is not None else ():
                self._store.pop(key.encode(), None)
        if added:
            for partition in added:
                self._indexes.setdefault(partition, DueIndex(self._resolution_s, LANES))
            self._synced |= added
            scanned = 0
            for raw_key, raw in list(self._store.items()):
                request_id = raw_key.decode() if isinstance(raw_key, (bytes, bytearray)) else str(raw_key)
                try:
                    if type(raw) is Entry:
                        entry, stored = raw, None
                    else:
                        entry, stored = decode_entry(request_id, raw), len(raw_key) + len(raw)
                except ValueError as exc:
                    log.error("dropping an unreadable join entry from the table: %s", exc)
                    continue
                if entry.partition in added:
                    self.schedule(entry.partition, request_id, entry, stored, raw=stored is not None)
                    scanned += 1
            log.info("join table: partitions %s assigned, %d entries indexed; %s revoked",
                     sorted(added), scanned, sorted(removed) or "none")
        elif removed:
            log.info("join table: partitions %s revoked", sorted(removed))
        return added, removed

    def pending_timers(self) -> int:
        return sum(len(index) for index in self._indexes.values())
