"""The join table on disk (`feedback.join_store: rocksdb`) without Kafka: entries, their timer
index and the budget's counters stay together whether the worker writes them or faust's recovery
replays the changelog into an empty folder. Skipped when rocksdict is not installed (the CI
installs the `[rocksdb]` extra); without it the worker refuses the setting in one line."""

from __future__ import annotations

import asyncio
import importlib.util
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from banditgate.config import Config
from feedback.disk_store import COUNTS_KEY
from feedback.join import LANE_SETTLED, LANE_WAITING, JoinRules, RouteRules
from feedback.state import JoinBudget
from tests.feedback.test_join_budget import _gateway_entries

HAVE_ROCKSDICT = importlib.util.find_spec("rocksdict") is not None
needs_rocksdict = pytest.mark.skipif(not HAVE_ROCKSDICT, reason="rocksdict is not installed "
                                     "(pip install 'banditgate[rocksdb]'): the rocksdb join store is not tested")
RULES = JoinRules(ttl_s=1000.0, routes={"r": RouteRules()})


class _Batch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None]] = []

    def append(self, key: bytes, value: bytes | None, timestamp: None) -> int:
        self.records.append((key, value))
        return 1


class _Changelog:
    """A producer whose changelog is a list: what faust would recover from."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, bytes, bytes | None]] = []  # (partition, offset, key, value)

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[Any]:
        first = sum(1 for p, *_ in self.log if p == partition)
        for i, (key, value) in enumerate(batch.records):
            self.log.append((partition, first + i, key, value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(SimpleNamespace(offset=first))
        return future


def _store(folder: Path) -> Any:
    import faust

    from feedback.disk_store import ROCKSDB_OPTIONS, JoinCollection

    app = faust.App(f"test-{folder.name}", store="rocksdb://", tabledir=str(folder), autodiscover=False)
    table = JoinCollection(app, name="join", partitions=4, key_type=bytes, value_type=bytes,
                           options=dict(ROCKSDB_OPTIONS), beacon=app.tables.beacon)
    table.join_rules = RULES
    return table.data


def _index(store: Any, partition: int) -> list[tuple[bytes, bytes]]:
    """The partition's index keys (without the counters' key) and their values."""
    it = store.index(partition).iter()
    it.seek_to_first()
    out = []
    while it.valid() and it.key() != COUNTS_KEY:
        out.append((it.key(), it.value()))
        it.next()
    return out


@needs_rocksdict
def test_the_worker_and_a_recovery_write_the_same_index_and_counters(tmp_path: Path) -> None:
    from feedback.disk_store import DiskJoinTable

    changelog = _Changelog()
    store = _store(tmp_path / "a")
    table = DiskJoinTable(store, changelog, "changelog", RULES, budget=JoinBudget(max_entries=200, partitions=4))
    table.sync_partitions(range(4))
    entries = _gateway_entries(400, joined=False, rate=1.0)
    asyncio.run(table.persist(entries))
    joined = _gateway_entries(40, joined=True, rate=1.0)  # the 40 oldest get their outcome
    asyncio.run(table.persist(joined))
    assert len(table) == 400 and table.over_budget()
    assert table.get(next(iter(joined)), joined[next(iter(joined))][0]) == next(iter(joined.values()))[1]

    victims = table.evictions(limit=1000)  # claimed: counted as gone before they are written
    assert Counter(p for p, _ in victims) == {p: 50 for p in range(4)} and not table.over_budget()
    assert set(joined) <= {r for _, r in victims}  # joined entries (settled) go before waiting ones
    asyncio.run(table.persist({r: (p, None) for p, r in victims}))
    assert len(table) == 200 and not table.over_budget()
    lanes = Counter(key[0] for p in range(4) for key, _ in _index(store, p))
    assert lanes == {LANE_WAITING: 200} and LANE_SETTLED not in lanes

    # another disk: faust replays the changelog (in batches of any size) into an empty folder
    recovered = _store(tmp_path / "b")
    for start in range(0, len(changelog.log), 37):
        events = [SimpleNamespace(message=SimpleNamespace(partition=p, offset=o, key=k, value=v))
                  for p, o, k, v in changelog.log[start:start + 37]]
        recovered.apply_changelog_batch(events, None, None)
    for p in range(4):
        assert _index(recovered, p) == _index(store, p)
        assert recovered.counts[p] == store.counts[p]
        assert recovered.persisted_offset(SimpleNamespace(partition=p)) == store.persisted_offset(
            SimpleNamespace(partition=p))
    assert table.bytes == sum(recovered.counts[p][1] for p in range(4))


@needs_rocksdict
def test_due_entries_come_from_the_front_of_the_index_and_are_claimed_until_written(tmp_path: Path) -> None:
    from feedback.disk_store import DiskJoinTable

    store = _store(tmp_path / "a")
    table = DiskJoinTable(store, _Changelog(), "changelog", RULES)
    table.sync_partitions(range(4))
    entries = _gateway_entries(100, joined=False, rate=1.0)  # ts 1.7e9 + i: due 1 000 s later
    asyncio.run(table.persist(entries))
    now = 1.7e9 + 1000 + 50.5  # the first 50 are due (their second has ended)
    assert table.has_due(now) and not table.has_due(1.7e9 + 1000)
    due = table.pop_due(now, limit=30) + table.pop_due(now, limit=30)
    assert len(due) == 50 and len(set(due)) == 50  # claimed: not returned twice
    assert {r for _, r in due} == set(list(entries)[:50])
    for partition, request_id in due[:10]:  # unchanged (a sweep found nothing to do): released
        table.schedule(partition, request_id, None)
    assert len(table.pop_due(now, limit=100)) == 10


def test_without_rocksdict_the_worker_refuses_the_rocksdb_store_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import feedback.app

    if HAVE_ROCKSDICT:  # as where it is not installed
        monkeypatch.setattr(feedback.app, "rocksdict_missing", lambda: "... the rocksdict package is not installed ...")
    config = Config.model_validate({"feedback": {"join_store": "rocksdb"}, "routes": [
        {"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "m", "version": 1}]}]})
    with pytest.raises(feedback.app.JoinStoreUnavailable, match="rocksdict package is not installed") as caught:
        feedback.app.run_feedback(config)
    assert getattr(caught.value, "user_facing", False) and "\n" not in str(caught.value)
