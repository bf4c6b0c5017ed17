"""The join table on disk (`feedback.join_store: rocksdb`): faust's RocksDB store through
`rocksdict`, with the timer index and the budget's counters on disk beside the entries.

The in-memory table keeps about 1 KB of Python objects per pending request; a 7-day window at
1 000 requests/s is 600 million requests, so on disk nothing per request may stay in memory:

* **Entries** live in faust's per-partition RocksDB database (`<tabledir>/join-<p>.db`), as their
  changelog bytes, keyed by request id. faust still owns the databases: it opens one per
  assigned partition, recovers it from the changelog (only from the offset it last stored, so a
  worker restarted on the same disk reads only what it missed), and closes it on revocation.
* **The timer index** is a column family of the same database (:data:`INDEX_CF`), ordered by
  key: ``lane (1 byte) + due second (8 bytes, big-endian) + request id`` → the entry's stored
  size. A sweep reads the due keys from the front of each lane; an eviction reads the oldest
  keys of the first non-empty lanes. The column family also holds the partition's counters
  (entries and bytes) under :data:`COUNTS_KEY`.
* **Every write keeps the three together**, in one RocksDB write batch per partition: the entry,
  its old index key replaced by the new one, the counters, and faust's stored changelog offset.
  The worker's own writes (after the broker acknowledged the changelog records, as with the
  memory store) and faust's recovery (:meth:`IndexedRocksStore.apply_changelog_batch`) go
  through the same :meth:`IndexedRocksStore.write_change`, so an index rebuilt by a recovery on
  another disk is the one the old owner had.

A sweep or an eviction claims the keys it returns (in memory, until their change is written) so
that the next batch, joined while this one is still being written, does not pick them again.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import faust
from faust.stores.rocksdb import Store as RocksStore
from faust.types import TP, CollectionT, EventT, StoreT
from yarl import URL

from feedback.join import LANES, Entry, JoinRules, decode_entry, schedule_of
from feedback.state import ChangelogRecord, Encoded, JoinBudget, JoinTable, send_changelog

if TYPE_CHECKING:  # rocksdict is optional (the rocksdb extra): imported where it is used
    from rocksdict import ColumnFamily, Rdict, WriteBatch

    from feedback.producer import ReplaceableProducer

log = logging.getLogger("banditgate.feedback.disk_store")

INDEX_CF = "banditgate-join-index"
COUNTS_KEY = b"\xff"
"""In the index column family: the partition's (entries, stored bytes). Index keys start with
their lane (0..2), so no index key sorts at or after it."""
_COUNTS = struct.Struct(">qq")
_SIZE = struct.Struct(">I")
_BUCKET = struct.Struct(">Q")

ROCKSDB_OPTIONS = {
    # per partition database: faust's defaults (a 2 GiB block cache and three 64 MiB memtables
    # each) would let four partitions take 9 GiB
    "block_cache_size": 128 * 1024 * 1024,
    "write_buffer_size": 32 * 1024 * 1024,
    "max_write_buffer_number": 2,
    # faust's 3 bits per key make one read in 4 probe the disk for a missing key (a new request)
    "bloom_filter_size": 10,
}


def index_key(lane: int, due: float, key: bytes) -> bytes:
    """The timer index key of an entry: ordered by lane, then due second, then request id."""
    return bytes((lane,)) + _BUCKET.pack(max(0, int(due))) + key


def rocksdict_missing() -> str | None:
    """Why the rocksdb store cannot be used here (one line), or None."""
    try:
        import rocksdict  # noqa: F401
    except ImportError:
        return ("feedback.join_store is rocksdb, but the rocksdict package is not installed: "
                "pip install 'banditgate[rocksdb]'")
    return None


class IndexedRocksStore(RocksStore):
    """faust's RocksDB store (rocksdict) whose every write also maintains the join's timer index
    and counters (see the module docstring). `rules` gives each entry its due time and lane."""

    def __init__(self, *args: Any, rules: JoinRules, **kwargs: Any) -> None:  # Any: passed on to faust's rocksdb Store.__init__ (its **kwargs are Any)
        super().__init__(*args, **kwargs)
        self.rules = rules
        self._indexes: dict[int, Rdict] = {}
        self._handles: dict[int, ColumnFamily] = {}
        self.counts: dict[int, list[int]] = {}
        """Per open partition: [entries, stored bytes], as written with the last write batch."""

    # -- opening and closing ----------------------------------------------------------------
    def _open_for_partition(self, partition: int) -> Rdict:
        import rocksdict

        db = super()._open_for_partition(partition)
        try:
            index = db.get_column_family(INDEX_CF)
            fresh = False
        except Exception:  # noqa: BLE001 - rocksdict raises a bare Exception for a missing column family
            index = db.create_column_family(INDEX_CF, rocksdict.Options(raw_mode=True))
            fresh = True
        self._indexes[partition] = index
        self._handles[partition] = db.get_column_family_handle(INDEX_CF)
        raw = index.get(COUNTS_KEY)
        self.counts[partition] = list(_COUNTS.unpack(raw)) if raw is not None else [0, 0]
        if fresh:
            self._reindex(partition, db)
        return db

    def _reindex(self, partition: int, db: Rdict) -> None:
        """Index a database that has entries but no index (written by something else)."""
        import rocksdict

        batch = rocksdict.WriteBatch(raw_mode=True)
        pending: dict[bytes, bytes | None] = {}
        counts = self.counts[partition] = [0, 0]
        it = db.iter()
        it.seek_to_first()
        indexed = 0
        while it.valid():
            key = it.key()
            if key != self.offset_key:
                self._change(partition, batch, pending, key, it.value(), old=None)
                indexed += 1
            it.next()
        batch.put(COUNTS_KEY, _COUNTS.pack(*counts), self._handles[partition])
        db.write(batch)
        if indexed:
            log.info("join store: partition %d indexed (%d entries)", partition, indexed)

    def revoke_partitions(self, table: CollectionT, tps: set[TP]) -> None:
        for tp in tps:
            if tp.topic in table.changelog_topic.topics:
                # our column family handles keep the database (and its lock) alive: drop them
                # first so that faust's close lets another owner open it
                self._indexes.pop(tp.partition, None)
                self._handles.pop(tp.partition, None)
                self.counts.pop(tp.partition, None)
        super().revoke_partitions(table, tps)

    def db(self, partition: int) -> Rdict:
        return self._db_for_partition(partition)

    def index(self, partition: int) -> Rdict:
        self._db_for_partition(partition)
        return self._indexes[partition]

    # -- writing ------------------------------------------------------------------------------
    def apply_changelog_batch(self, batch: Iterable[EventT], to_key: Callable[[object], object],
                              to_value: Callable[[object], object]) -> None:
        """faust's recovery (and standby) path: the records as they are, with their index."""
        import rocksdict

        batches: dict[int, tuple[WriteBatch, dict[bytes, bytes | None]]] = {}
        offsets: dict[int, int] = {}
        for event in batch:
            message = event.message
            partition = message.partition
            slot = batches.get(partition)
            if slot is None:
                self._db_for_partition(partition)
                slot = batches[partition] = (rocksdict.WriteBatch(raw_mode=True), {})
            if message.key is None:  # faust's Message allows it; the join's changelog always has one
                raise ValueError(f"join changelog record at offset {message.offset} has no key")
            self.write_change(partition, slot[0], slot[1], message.key, message.value)
            offsets[partition] = max(offsets.get(partition, -1), message.offset)
        for partition, (write_batch, _pending) in batches.items():
            self.commit(partition, write_batch, offsets[partition])

    def apply_records(self, partition: int, records: Sequence[ChangelogRecord]) -> None:
        """The worker's bulk recovery path (feedback/consumer.py): aiokafka records of one
        partition, in offset order, written as :meth:`apply_changelog_batch` would."""
        import rocksdict

        batch = rocksdict.WriteBatch(raw_mode=True)
        pending: dict[bytes, bytes | None] = {}
        for record in records:
            self.write_change(partition, batch, pending, record.key, record.value)
        self.commit(partition, batch, records[-1].offset if records else None)

    def write_change(self, partition: int, batch: WriteBatch, pending: dict[bytes, bytes | None], key: bytes,
                     value: bytes | None) -> None:
        """Add one entry's new value (None: delete) to `batch`, with its index and counters;
        `pending` holds this batch's earlier values (a key changed twice reads its first)."""
        old = pending[key] if key in pending else self._db_for_partition(partition).get(key)
        self._change(partition, batch, pending, key, value, old)

    def _change(self, partition: int, batch: WriteBatch, pending: dict[bytes, bytes | None], key: bytes,
                value: bytes | None, old: bytes | None) -> None:
        handle = self._handles[partition]
        counts = self.counts[partition]
        old_index = new_index = None
        if old is not None:
            old_index, old_size = self._index_of(key, old)
            counts[0] -= 1
            counts[1] -= old_size
        if value is not None:
            new_index, new_size = self._index_of(key, value)
            if new_index is None:
                value = None  # unreadable: not kept (the memory store drops it too)
        if old_index is not None and old_index != new_index:
            batch.delete(old_index, handle)
        if new_index is None:  # None exactly when `value` is (deleted, or unreadable above)
            batch.delete(key)
        else:
            batch.put(key, value)
            batch.put(new_index, _SIZE.pack(new_size), handle)
            counts[0] += 1
            counts[1] += new_size
        pending[key] = value

    def _index_of(self, key: bytes, raw: bytes) -> tuple[bytes | None, int]:
        try:
            entry = decode_entry(key.decode(errors="replace"), raw)
        except ValueError as exc:
            log.error("join store: dropping an unreadable entry: %s", exc)
            return None, 0
        due, lane = schedule_of(entry, self.rules)
        return index_key(lane, due, key), len(key) + len(raw)

    def commit(self, partition: int, batch: WriteBatch, offset: int | None) -> None:
        """Write `batch` with the partition's counters and (when known) the changelog offset it
        reflects, in one atomic RocksDB write."""
        if offset is not None and offset >= 0:
            batch.put(self.offset_key, str(offset).encode())
        batch.put(COUNTS_KEY, _COUNTS.pack(*self.counts[partition]), self._handles[partition])
        self._db_for_partition(partition).write(batch)


class DiskJoinTable:
    """:class:`feedback.state.JoinTable`'s interface over an :class:`IndexedRocksStore`: nothing
    per entry stays in memory but the keys a sweep or an eviction is working on."""

    encode = staticmethod(JoinTable.encode)

    def __init__(self, store: IndexedRocksStore, producer: ReplaceableProducer, changelog_topic: str, rules: JoinRules,
                 budget: JoinBudget | None = None) -> None:
        self._store = store
        self._producer = producer
        self.changelog_topic = changelog_topic
        self._rules = rules
        self.budget = budget or JoinBudget()
        self._share_entries, self._share_bytes = self.budget.share()
        self._synced: set[int] = set()
        self._claimed: dict[str, tuple[int, int]] = {}
        """Keys a sweep or an eviction returned, not yet written: request_id -> (partition, size)."""
        self._claimed_evictions: dict[int, list[int]] = {}
        """Per partition: [entries, bytes] claimed for eviction (counted as gone already)."""
        self._evicting: set[str] = set()

    def __len__(self) -> int:
        return sum(self._store.counts.get(p, (0, 0))[0] for p in self._synced)

    @property
    def bytes(self) -> int:
        """Stored bytes (keys and values before compression) of the assigned partitions."""
        return sum(self._store.counts.get(p, (0, 0))[1] for p in self._synced)

    @property
    def partitions(self) -> frozenset[int]:
        return frozenset(self._synced)

    def pending_timers(self) -> int:
        return len(self)

    def get(self, request_id: str, partition: int | None = None) -> Entry | None:
        key = request_id.encode()
        partitions = [partition] if partition is not None else sorted(self._synced)
        for p in partitions:
            raw = self._store.db(p).get(key)
            if raw is not None:
                return decode_entry(request_id, raw)
        return None

    # -- writing ------------------------------------------------------------------------------
    async def persist(self, changes: Mapping[str, tuple[int, Entry | None]], encoded: Encoded | None = None) -> None:
        """As :meth:`JoinTable.persist`: the changelog first (acknowledged by the broker), then
        one atomic write per partition of the entries, their index and counters, and the
        changelog offset they reflect (so a restart on this disk recovers only what follows)."""
        import rocksdict

        if encoded is None:
            encoded = self.encode(changes)
        by_partition, _sizes = encoded
        offsets = await send_changelog(self._producer, self.changelog_topic, by_partition)
        store = self._store
        for partition, records in by_partition.items():
            batch = rocksdict.WriteBatch(raw_mode=True)
            pending: dict[bytes, bytes | None] = {}
            for key, value in records:
                store.write_change(partition, batch, pending, key, value)
            store.commit(partition, batch, offsets.get(partition))
        for request_id in changes:
            self._unclaim(request_id)

    def schedule(self, partition: int, request_id: str, entry: Entry | None, stored: int | None = None) -> None:
        """A swept entry that did not change: its index key is still in place; release it."""
        self._unclaim(request_id)

    def _unclaim(self, request_id: str) -> None:
        claimed = self._claimed.pop(request_id, None)
        if claimed is not None and request_id in self._evicting:
            self._evicting.discard(request_id)
            partition, size = claimed
            pending = self._claimed_evictions.get(partition)
            if pending is not None:
                pending[0] -= 1
                pending[1] -= size

    # -- timers and eviction ------------------------------------------------------------------
    def _scan(self, partition: int, lane: int, newest_bucket: int | None) -> Iterator[tuple[str, int]]:
        """(request_id, size) of `lane`'s index keys in order, up to `newest_bucket` (None: all),
        skipping claimed keys."""
        it = self._store.index(partition).iter()
        it.seek(bytes((lane,)))
        claimed = self._claimed
        while it.valid():
            key = it.key()
            if key[0] != lane or (newest_bucket is not None and _BUCKET.unpack_from(key, 1)[0] > newest_bucket):
                return
            request_id = key[9:].decode(errors="replace")
            if request_id not in claimed:
                yield request_id, _SIZE.unpack(it.value())[0]
            it.next()

    def has_due(self, now: float) -> bool:
        newest = int(now) - 1
        return any(next(self._scan(p, lane, newest), None) is not None for p in self._synced for lane in range(LANES))

    def pop_due(self, now: float, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (partition, request_id) due at `now`, claimed until written."""
        newest = int(now) - 1
        out: list[tuple[int, str]] = []
        for partition in sorted(self._synced):
            for lane in range(LANES):
                for request_id, size in self._scan(partition, lane, newest):
                    if len(out) >= limit:
                        return out
                    self._claimed[request_id] = (partition, size)
                    out.append((partition, request_id))
        return out

    def _over(self, partition: int) -> tuple[int, int]:
        """How many entries and bytes `partition` holds beyond its share (after the claimed evictions)."""
        entries, size = self._store.counts.get(partition, (0, 0))
        claimed = self._claimed_evictions.get(partition, (0, 0))
        entries -= claimed[0]
        size -= claimed[1]
        return (0 if self._share_entries is None else max(0, entries - self._share_entries),
                0 if self._share_bytes is None else max(0, size - self._share_bytes))

    def over_budget(self) -> bool:
        return any(self._over(p) != (0, 0) for p in self._synced)

    def evictions(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (partition, request_id) to evict, lane by lane, oldest first, until
        every partition is within its share; claimed (and counted as gone) until written."""
        out: list[tuple[int, str]] = []
        for partition in sorted(self._synced):
            entries, size = self._over(partition)
            if not entries and not size:
                continue
            claimed = self._claimed_evictions.setdefault(partition, [0, 0])
            for lane in range(LANES):
                for request_id, stored in self._scan(partition, lane, None):
                    if (entries <= 0 and size <= 0) or len(out) >= limit:
                        break
                    self._claimed[request_id] = (partition, stored)
                    self._evicting.add(request_id)
                    claimed[0] += 1
                    claimed[1] += stored
                    entries -= 1
                    size -= stored
                    out.append((partition, request_id))
                if (entries <= 0 and size <= 0) or len(out) >= limit:
                    break
        return out

    def sync_partitions(self, assigned: Iterable[int]) -> tuple[set[int], set[int]]:
        """Match the table to the assigned partitions (their databases are open and recovered)."""
        assigned = set(assigned)
        added = assigned - self._synced
        removed = self._synced - assigned
        for partition in added:
            self._store.db(partition)
        self._synced = assigned
        if removed:
            for request_id, (partition, _) in list(self._claimed.items()):
                if partition in removed:
                    self._claimed.pop(request_id, None)
                    self._evicting.discard(request_id)
            for partition in removed:
                self._claimed_evictions.pop(partition, None)
        if added or removed:
            log.info("join store: partitions %s assigned (%d entries, %.1f MB on disk before compression); %s revoked",
                     sorted(added), sum(self._store.counts.get(p, (0, 0))[0] for p in added),
                     sum(self._store.counts.get(p, (0, 0))[1] for p in added) / 1e6, sorted(removed) or "none")
        return added, removed


class JoinCollection(faust.Table):
    """faust's table whose `rocksdb://` store is an :class:`IndexedRocksStore` (set
    `join_rules` before the table starts); any other store URL is faust's own."""

    join_rules: JoinRules | None = None

    def _new_store_by_url(self, url: str | URL) -> StoreT:
        if URL(url).scheme == "rocksdb":
            if self.join_rules is None:
                raise RuntimeError("JoinCollection.join_rules must be set before the table's store is made")
            return IndexedRocksStore(url, self.app, self, table_name=self.name, key_type=self.key_type,
                                     key_serializer=self.key_serializer, value_serializer=self.value_serializer,
                                     value_type=self.value_type, loop=self.loop, options=self.options,
                                     rules=self.join_rules)
        return super()._new_store_by_url(url)
