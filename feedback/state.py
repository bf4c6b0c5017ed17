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
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from feedback.join import DueIndex, Entry, JoinRules, decode_entry, due_at, encode_entry

log = logging.getLogger("banditgate.feedback.state")


class JoinTable:
    """Entries by request_id over a faust table's store, with batched changelog writes.

    The store maps the request_id (bytes) to the entry: bytes as recovered from the changelog,
    or the decoded :class:`Entry` for what this worker wrote (the changelog gets the bytes).
    faust's memory store never serializes values itself (only recovery writes to it), so
    keeping the object saves decoding each entry again on its next event."""

    def __init__(self, store: MutableMapping[bytes, bytes], producer: Any, changelog_topic: str,
                 rules: JoinRules, index_resolution_s: float = 1.0) -> None:
        self._store = store
        self._data: MutableMapping[bytes, Any] = getattr(store, "data", store)  # the memory store's own dict
        self._producer = producer
        self.changelog_topic = changelog_topic
        self._rules = rules
        self._resolution_s = index_resolution_s
        self._indexes: dict[int, DueIndex] = {}
        self._synced: set[int] = set()  # partitions whose recovered entries have been indexed

    def __len__(self) -> int:
        return len(self._store)

    @property
    def partitions(self) -> frozenset[int]:
        """Partitions whose entries are indexed (assigned and recovered)."""
        return frozenset(self._synced)

    def get(self, request_id: str) -> Entry | None:
        """The entry for a request (entries this worker wrote are kept decoded in the store;
        those recovered from the changelog are bytes until first read)."""
        raw = self._data.get(request_id.encode())
        if raw is None or raw.__class__ is Entry:
            return raw
        return decode_entry(request_id, raw)

    @staticmethod
    def encode(changes: Mapping[str, tuple[int, Entry | None]]) -> dict[int, list[tuple[bytes, bytes | None]]]:
        """The changelog records of `changes` (key, value or None for a tombstone) by partition:
        pure CPU, done while the batch's Redis writes are in flight."""
        encoded: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
        for request_id, (partition, entry) in changes.items():
            encoded[partition].append((request_id.encode(), None if entry is None else encode_entry(entry)))
        return encoded

    async def persist(self, changes: Mapping[str, tuple[int, Entry | None]],
                      encoded: Mapping[int, list[tuple[bytes, bytes | None]]] | None = None) -> None:
        """Write changed entries (None: delete) to the changelog, wait for the broker's
        acknowledgement, then to memory, and reschedule their timers. `encoded` is
        `encode(changes)` when the caller made it already. Raises KafkaError on failure; nothing
        is changed in memory then, and the same call may be retried."""
        if encoded is None:
            encoded = self.encode(changes)
        futures = []
        for partition, records in encoded.items():
            batch = self._producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await self._producer.send_batch(batch, self.changelog_topic, partition=partition))
                    batch = self._producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"join entry for {key!r} does not fit in one producer batch")
            futures.append(await self._producer.send_batch(batch, self.changelog_topic, partition=partition))
        if futures:
            await asyncio.gather(*futures)
        data = self._data
        schedule = self.schedule
        for request_id, (partition, entry) in changes.items():
            if entry is None:
                data.pop(request_id.encode(), None)
            else:
                data[request_id.encode()] = entry
            schedule(partition, request_id, entry)

    def schedule(self, partition: int, request_id: str, entry: Entry | None) -> None:
        """(Re)schedule the entry's next timer check; forget it if deleted."""
        index = self._indexes.get(partition)
        if index is None:
            if entry is None:
                return
            # written before the sweeper synced the assignment; the sync indexes the rest
            index = self._indexes[partition] = DueIndex(self._resolution_s)
        if entry is None:
            index.discard(request_id)
        else:
            index.set(request_id, due_at(entry, self._rules))

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
            for key in index.pop_due(float("inf")) if index is not None else ():
                self._store.pop(key.encode(), None)
        if added:
            for partition in added:
                self._indexes.setdefault(partition, DueIndex(self._resolution_s))
            self._synced |= added
            scanned = 0
            for raw_key, raw in list(self._store.items()):
                request_id = raw_key.decode() if isinstance(raw_key, (bytes, bytearray)) else str(raw_key)
                try:
                    entry = raw if raw.__class__ is Entry else decode_entry(request_id, raw)
                except ValueError as exc:
                    log.error("dropping an unreadable join entry from the table: %s", exc)
                    continue
                if entry.partition in added:
                    self._indexes[entry.partition].set(request_id, due_at(entry, self._rules))
                    scanned += 1
            log.info("join table: partitions %s assigned, %d entries indexed; %s revoked",
                     sorted(added), scanned, sorted(removed) or "none")
        elif removed:
            log.info("join table: partitions %s revoked", sorted(removed))
        return added, removed

    def pending_timers(self) -> int:
        return sum(len(index) for index in self._indexes.values())
