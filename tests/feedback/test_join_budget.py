"""The join table's budget (pure logic): eviction lanes and order, what an evicted entry counts,
the timer index's sizes, a bounded table that still counts every event once, and the memory
estimate behind `feedback.join_max_bytes`."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from banditgate.config import Topics
from feedback.agents import JoinProcessor, SourceMessage
from feedback.join import (
    LANE_DEADLINE,
    LANE_SETTLED,
    LANE_WAITING,
    LANES,
    Count,
    DropOutcome,
    DueIndex,
    Entry,
    JoinRules,
    OutcomeIn,
    PredictionIn,
    Reward,
    RouteRules,
    Seen,
    Served,
    due_at,
    lane_of,
    on_due,
    on_evict,
    on_outcome,
    on_prediction,
    schedule_of,
)
from feedback.metrics import FeedbackMetrics
from feedback.outcome_metrics import PredictionView
from feedback.state import JoinBudget, JoinTable
from tests.feedback.test_join import Ledger, kinds, outcome, primary, shadow

TTL = 1000.0
RULES = JoinRules(ttl_s=TTL, routes={"r": RouteRules(), "d": RouteRules(reward_wait_s=100.0, default_reward=0.0)})


def _entry(*events: Any, now: float = 10.0) -> Entry:
    entry = None
    for event in events:
        step = on_outcome(entry, event, now, RULES) if isinstance(event, OutcomeIn) else on_prediction(entry, event,
                                                                                                        RULES)
        entry = step.entry if step.changed else entry
    assert entry is not None
    return entry


# ---------------------------------------------------------------------------------------------
# lanes and what an eviction counts


def test_lanes_put_settled_entries_first_and_waiting_defaults_last() -> None:
    assert lane_of(_entry(primary(), outcome()), RULES) == LANE_SETTLED
    assert lane_of(_entry(primary()), RULES) == LANE_WAITING
    assert lane_of(_entry(outcome()), RULES) == LANE_WAITING
    assert lane_of(_entry(shadow()), RULES) == LANE_WAITING
    waiting_default = _entry(primary(route="d"))
    assert lane_of(waiting_default, RULES) == LANE_DEADLINE
    defaulted = on_due(waiting_default, 150.0, RULES).entry
    assert defaulted is not None and lane_of(defaulted, RULES) == LANE_SETTLED
    for entry in (waiting_default, defaulted, _entry(outcome())):
        assert schedule_of(entry, RULES) == (due_at(entry, RULES), lane_of(entry, RULES))


def test_evicting_a_waiting_prediction_counts_it_unanswered() -> None:
    step = on_evict(_entry(primary()), 50.0, RULES)
    assert (step.entry, step.changed) == (None, True)
    assert step.effects == (Count("r", "q", "unanswered", "unanswered", "a"),
                            Count("r", "q", "evicted", "evicted:unanswered:10", "a"))


def test_evicting_a_prediction_whose_default_is_to_come_applies_the_default_now() -> None:
    step = on_evict(_entry(primary(route="d")), 50.0, RULES)
    assert kinds(step.effects) == ["default", "Reward", "evicted"]
    reward = step.effects[1]
    assert isinstance(reward, Reward) and (reward.reward, reward.default, reward.ts) == (0.0, True, 50.0)
    assert step.effects[0].token == "decision"  # type: ignore[union-attr]  # the same token as the deadline's
    assert step.effects[2].token == "evicted:default:10"  # type: ignore[union-attr]


def test_evicting_an_early_outcome_dead_letters_it_as_an_orphan() -> None:
    step = on_evict(_entry(outcome(offset=30), outcome(offset=31)), 50.0, RULES)
    assert kinds(step.effects) == ["orphan", "DropOutcome", "duplicate", "evicted"]
    drop = step.effects[1]
    assert isinstance(drop, DropOutcome) and drop.reason == "orphan" and "over its budget" in drop.error
    assert step.effects[3] == Count("_none", "q", "evicted", "evicted:orphan:30", None)


def test_evicting_settled_or_shadow_only_entries_counts_only_the_eviction() -> None:
    assert on_evict(_entry(primary(), outcome()), 50.0, RULES).effects == (
        Count("r", "q", "evicted", "evicted:settled:10", "a"),)
    assert on_evict(_entry(shadow(offset=20)), 50.0, RULES).effects == (
        Count("r", "q", "evicted", "evicted:shadow:20", None),)


def test_the_outcome_of_an_evicted_prediction_ends_as_an_orphan() -> None:
    ledger = Ledger()
    ledger.apply(on_evict(_entry(primary()), 50.0, RULES).effects)
    late = on_outcome(None, outcome(offset=40, ts=60.0), 60.0, RULES)
    assert late.changed and late.entry is not None and not late.effects  # waits for a prediction
    expired = on_due(late.entry, 60.0 + TTL, RULES)
    ledger.apply(expired.effects)
    assert expired.entry is None
    assert sorted(e.kind for e in ledger.applied if isinstance(e, Count)) == ["evicted", "orphan", "unanswered"]


def test_orphans_of_one_request_count_once_per_outcome() -> None:
    """An outcome evicted (or expired) as an orphan, then a second outcome for the same request:
    both count (the token names the outcome's offset), a replay of either does not."""
    ledger = Ledger()
    for offset in (30, 31, 30):
        ledger.apply(on_evict(_entry(outcome(offset=offset)), 50.0, RULES).effects)
    assert Counter(e.kind for e in ledger.applied if isinstance(e, Count)) == {"orphan": 2, "evicted": 2}


# ---------------------------------------------------------------------------------------------
# the index: lanes, sizes, eviction order


OPS = st.lists(st.tuples(st.integers(0, 15), st.floats(0, 40), st.integers(0, LANES - 1), st.integers(0, 50),
                         st.booleans()), max_size=80)


def _model(ops: list[tuple[int, float, int, int, bool]], index: DueIndex) -> dict[int, tuple[int, int, int]]:
    """Apply `ops` (key, due, lane, size, delete?) to `index` and to a plain dict of key ->
    (lane, bucket, size)."""
    model: dict[int, tuple[int, int, int]] = {}
    for key, due, lane, size, delete in ops:
        if delete:
            index.discard(key)
            model.pop(key, None)
        else:
            index.set(key, due, lane, size)
            model[key] = (lane, int(due // 1.0), size)
    return model


@given(OPS, st.floats(0, 45), st.integers(1, 10))
def test_due_index_pops_what_is_due_in_every_lane(ops: list, now: float, limit: int) -> None:
    index = DueIndex(resolution_s=1.0, lanes=LANES)
    model = _model(ops, index)
    assert len(index) == len(model) and index.bytes == sum(size for _, _, size in model.values())
    expected = {k for k, (_, bucket, _) in model.items() if bucket <= int(now // 1.0) - 1}
    assert index.has_due(now) == bool(expected) or not expected  # may say yes for nothing, never no for something
    got: list[int] = []
    while batch := index.pop_due(now, limit):
        assert len(batch) <= limit
        got += batch
    assert sorted(got) == sorted(expected)
    assert index.bytes == sum(size for k, (_, _, size) in model.items() if k not in expected)


@given(OPS, st.one_of(st.none(), st.integers(0, 16)), st.one_of(st.none(), st.integers(0, 400)),
       st.integers(1, 20))
def test_eviction_pops_lane_by_lane_oldest_first_until_within_the_budget(
        ops: list, max_entries: int | None, max_bytes: int | None, limit: int) -> None:
    index = DueIndex(resolution_s=1.0, lanes=LANES)
    model = _model(ops, index)
    popped = index.pop_evict(max_entries, max_bytes, limit)
    order = [(model[key][0], model[key][1]) for key, _ in popped]
    assert order == sorted(order)  # lane first, then oldest bucket
    assert [size for _, size in popped] == [model[key][2] for key, _ in popped]
    left = {k: v for k, v in model.items() if k not in dict(popped)}
    if popped:  # nothing left comes before the last victim
        assert all((lane, bucket) >= order[-1] for lane, bucket, _ in left.values())
    assert len(index) == len(left) and index.bytes == sum(size for _, _, size in left.values())

    def over(entries: int, size: int) -> bool:
        return (max_entries is not None and entries > max_entries) or (max_bytes is not None and size > max_bytes)

    assert len(popped) == limit or not over(len(left), index.bytes)
    if popped:  # it stopped as soon as the budget held: before the last victim it was over
        last_size = popped[-1][1]
        assert over(len(left) + 1, index.bytes + last_size)


# ---------------------------------------------------------------------------------------------
# a bounded table still counts every event once


@st.composite
def traffic(draw: st.DrawFn) -> list[Any]:
    """Requests on routes with and without a default reward: a prediction (maybe), a shadow
    (maybe), 0-2 outcomes, all interleaved; every event has its own offset."""
    events: list[Any] = []
    offset = 0
    for i in range(draw(st.integers(1, 12))):
        request_id = f"q{i}"
        route = draw(st.sampled_from(["r", "d"]))
        if draw(st.booleans()):
            events.append(PredictionIn(request_id, 0, route, Served("a", "m", 1, PredictionView(0.7, 1), offset), 0.0))
            offset += 1
        if draw(st.integers(0, 3)) == 0:
            events.append(PredictionIn(request_id, 0, route, Served("s", "m", 2, PredictionView(0.2, 0), offset,
                                                                    shadow=True), 0.0))
            offset += 1
        for _ in range(draw(st.integers(0, 2))):
            events.append(OutcomeIn(request_id, 0, Seen(1.0, 1, 5.0, offset)))
            offset += 1
    return draw(st.permutations(events))


@given(traffic(), st.integers(1, 6))
@settings(max_examples=300, deadline=None)
def test_a_bounded_table_counts_every_prediction_and_outcome_once(events: list[Any], budget: int) -> None:
    """A table of at most `budget` entries (evicting after each event, as a batch of one would):
    it never holds more, and in the end every prediction was joined, defaulted or unanswered
    exactly once and every outcome joined, late, duplicate or orphan exactly once."""
    table: dict[str, Entry] = {}
    index = DueIndex(resolution_s=1.0, lanes=LANES)
    ledger = Ledger()
    evictions = 0

    def write(request_id: str, entry: Entry | None) -> None:
        if entry is None:
            table.pop(request_id, None)
            index.discard(request_id)
        else:
            table[request_id] = entry
            due, lane = schedule_of(entry, RULES)
            index.set(request_id, due, lane, 1)

    now = 10.0
    for event in events:
        entry = table.get(event.request_id)
        step = on_outcome(entry, event, now, RULES) if isinstance(event, OutcomeIn) else on_prediction(entry, event,
                                                                                                        RULES)
        ledger.apply(step.effects)
        if step.changed:
            write(event.request_id, step.entry)
        for request_id, _ in index.pop_evict(budget, None, limit=100):
            evict = on_evict(table[request_id], now, RULES)
            ledger.apply(evict.effects)
            write(request_id, None)
            evictions += 1
        assert len(table) <= budget
    later = now + 10 * TTL
    while table:  # every timer runs out
        for request_id in index.pop_due(later):
            step = on_due(table[request_id], later, RULES)
            ledger.apply(step.effects)
            write(request_id, step.entry if step.changed else table[request_id])
        later += TTL
    counts = Counter(e.kind for e in ledger.applied if isinstance(e, Count))
    predictions = sum(1 for e in events if isinstance(e, PredictionIn) and not e.served.shadow)
    outcomes = sum(1 for e in events if isinstance(e, OutcomeIn))
    assert counts["joined"] + counts["default"] + counts["unanswered"] == predictions
    assert counts["joined"] + counts["late"] + counts["duplicate"] + counts["orphan"] == outcomes
    assert counts["evicted"] == evictions


# ---------------------------------------------------------------------------------------------
# the table: shares of the budget, and the memory estimate


def test_each_partition_holds_its_share_of_the_budget() -> None:
    assert JoinBudget(max_bytes=1000, max_entries=10, partitions=4).share() == (3, 250)
    assert JoinBudget().share() == (None, None)
    with pytest.raises(ValueError):
        JoinBudget(max_entries=0)


class _Batch:
    def append(self, key: bytes, value: bytes | None, timestamp: None) -> int:
        return 1


class _Producer:
    """Accepts every changelog batch at once (the store and the index are what is under test)."""

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


TOPICS = Topics()


def _decoder() -> JoinProcessor:
    return JoinProcessor(table=None, redis=None, out=None, rules=RULES, topics=TOPICS,  # type: ignore[arg-type]
                         metrics=FeedbackMetrics(CollectorRegistry()))


def _gateway_entries(n: int, joined: bool, decoder: JoinProcessor | None = None,
                     rate: float = 1000.0) -> dict[str, tuple[int, Entry]]:
    """`n` entries from gateway-shaped events (36-character ids, a probability and a label) at
    `rate` requests/s, decoded by the worker's own decoder, with their outcome when `joined`."""
    topics = TOPICS
    decoder = decoder or _decoder()
    out = {}
    for i in range(n):
        request_id = f"{i:08d}-0000-4000-8000-{i:012d}"
        value = orjson.dumps({"request_id": request_id, "route": "r", "arm": "a", "model": "churn-gbm",
                              "model_version": 3, "policy": "thompson", "propensity": 0.5,
                              "outputs": {"probability": [0.25 + i / 1e6], "label": i % 2},
                              "ts_request": 1.7e9 + i / rate - 0.01, "ts_predicted": 1.7e9 + i / rate,
                              "latency_ms": 2.5})
        event = decoder._decode(SourceMessage(topics.predictions, i % 4, i, request_id.encode(), value, 0))
        entry = on_prediction(None, event, RULES).entry  # type: ignore[arg-type]
        if joined:
            value = orjson.dumps({"request_id": request_id, "reward": 1.0, "label": 1, "ts": 1.7e9 + i / rate + 1})
            event = decoder._decode(SourceMessage(topics.outcomes, i % 4, i, request_id.encode(), value, 0))
            entry = on_outcome(entry, event, 1.7e9, RULES).entry  # type: ignore[arg-type]
        assert entry is not None
        out[request_id] = (i % 4, entry)
    return out


@pytest.mark.parametrize("joined", [False, True])
def test_the_memory_estimate_covers_what_entries_take(joined: bool) -> None:
    """`feedback.join_max_bytes` is in estimated bytes: for gateway-shaped entries the estimate
    is at least what Python allocates for them in the store and the index (tracemalloc; the
    process's RSS grows by about 1.15 times that, which the estimate was fitted to), and not
    wildly more."""
    table = JoinTable({}, _Producer(), "changelog", RULES, budget=JoinBudget(partitions=4))
    table.sync_partitions(range(4))
    decoder = _decoder()
    gc.collect()
    tracemalloc.start()
    try:
        changes = _gateway_entries(20_000, joined, decoder)
        asyncio.run(table.persist(changes, table.encode(changes)))
        del changes
        gc.collect()
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_entry = traced / 20_000
    estimate = table.bytes / 20_000
    assert len(table) == 20_000
    assert per_entry <= estimate <= 1.6 * per_entry, (per_entry, estimate)


def test_evictions_bring_every_partition_within_its_share() -> None:
    changes = _gateway_entries(400, joined=False, rate=1.0)  # a timer bucket (1 s) each: a strict order
    table = JoinTable({}, _Producer(), "changelog", RULES, budget=JoinBudget(max_entries=200, partitions=4))
    table.sync_partitions(range(4))
    asyncio.run(table.persist(changes))
    assert table.over_budget()
    victims = table.evictions(limit=1000)
    assert Counter(partition for partition, _ in victims) == {p: 50 for p in range(4)}
    assert not table.over_budget()
    # the oldest (smallest ts_predicted) of each partition went first
    evicted = set(victims)
    kept = {p: min(changes[r][1].ts_predicted or 0 for r in changes if changes[r][0] == p and (p, r) not in evicted)
            for p in range(4)}
    for partition, request_id in victims:
        assert (changes[request_id][1].ts_predicted or 0) < kept[partition]


def test_a_revoked_partition_s_entries_leave_memory() -> None:
    """A rebalance that takes partitions away drops their entries (the new owner recovers them
    from the changelog). This raised before (the index was emptied with pop_due(inf), and
    inf // 1.0 is nan): the worker stopped at its first rebalance that revoked a partition."""
    changes = _gateway_entries(40, joined=False)
    table = JoinTable({}, _Producer(), "changelog", RULES, budget=JoinBudget(partitions=4))
    table.sync_partitions(range(4))
    asyncio.run(table.persist(changes))
    assert table.sync_partitions([0, 1]) == (set(), {2, 3})
    assert len(table) == 20 and table.partitions == {0, 1}
    assert all((table.get(r) is None) == (p in (2, 3)) for r, (p, _) in changes.items())
