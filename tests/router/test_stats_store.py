"""ArmStatsStore and SnapshotRefresher against the real Redis (no fakes)."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from banditgate import redis_errors
from banditgate.config import RedisConfig, Route
from router.arm_stats import ArmStats, decay_factor
from router.decision import RoutePolicy
from router.stats_store import ArmStatsStore, ArmUpdate, SnapshotRefresher

pytestmark = pytest.mark.stack

REDIS_URL = os.environ.get("BANDITGATE_REDIS", "redis://127.0.0.1:16379/0")


PREFIXES: dict[int, str] = {}


@pytest.fixture
async def client() -> AsyncIterator[redis_asyncio.Redis]:
    """A connection to the real Redis; every key the test writes is under its own prefix, deleted after."""
    connection = redis_asyncio.Redis.from_url(REDIS_URL)
    prefix = f"bgtest-{uuid.uuid4().hex[:10]}"
    PREFIXES[id(connection)] = prefix
    yield connection
    keys = [key async for key in connection.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await connection.delete(*keys)
    await connection.aclose()
    del PREFIXES[id(connection)]


def store_for(client: redis_asyncio.Redis, connection: redis_asyncio.Redis | None = None, **kwargs) -> ArmStatsStore:
    """A store on `connection` (default: `client`) using the test's prefix."""
    return ArmStatsStore(connection or client, prefix=PREFIXES[id(client)], **kwargs)


async def test_redelivered_outcomes_count_once(client) -> None:
    store = store_for(client)
    first = await store.apply("churn", [ArmUpdate(f"r{i}", "a", float(i % 4 == 0)) for i in range(100)])
    assert (first.applied, first.duplicates) == (100, 0)
    again = await store.apply("churn", [ArmUpdate(f"r{i}", "a", 1.0) for i in range(50, 150)]
                              + [ArmUpdate("r200", "b", 1.0), ArmUpdate("r200", "b", 1.0)])
    assert (again.applied, again.duplicates) == (51, 51)
    snapshot = await store.snapshot("churn")
    expected = ArmStats.from_rewards([float(i % 4 == 0) for i in range(100)] + [1.0] * 50)
    assert snapshot.arm("a").stats.weight == 150
    assert snapshot.arm("a").stats.mean == pytest.approx(expected.mean)
    assert snapshot.arm("a").stats.m2 == pytest.approx(expected.m2)
    assert snapshot.outcome_count == 151
    ttl = await client.ttl(store.seen_key("churn", "r1"))
    assert 8 * 86400 - 60 < ttl <= 8 * 86400


async def test_concurrent_updaters_with_overlapping_redeliveries_lose_nothing(client) -> None:
    """Eight workers (own connections) send overlapping slices of 4 000 outcomes in batches."""
    rewards = np.random.default_rng(3).random(4000)
    updates = [ArmUpdate(f"req-{i}", f"arm{i % 3}", float(rewards[i])) for i in range(4000)]
    workers = [redis_asyncio.Redis.from_url(REDIS_URL) for _ in range(8)]
    try:
        async def worker(index: int) -> tuple[int, int]:
            store = store_for(client, workers[index])
            start = index * 400  # slices of 1 000 overlapping their neighbours by 600
            totals = [0, 0]
            for batch in range(start, start + 1000 + (800 if index == 7 else 0), 100):
                result = await store.apply("r", updates[batch:batch + 100])
                totals[0] += result.applied
                totals[1] += result.duplicates
            return totals[0], totals[1]

        results = await asyncio.gather(*(worker(i) for i in range(8)))
    finally:
        for connection in workers:
            await connection.aclose()
    assert sum(applied for applied, _ in results) == 4000
    snapshot = await store_for(client).snapshot("r")
    for arm in range(3):
        expected = rewards[arm::3]
        stats = snapshot.arm(f"arm{arm}").stats
        assert stats.weight == len(expected)
        assert stats.mean == pytest.approx(expected.mean(), rel=1e-9)
        assert stats.m2 == pytest.approx(((expected - expected.mean()) ** 2).sum(), rel=1e-6)


async def test_discounting_matches_per_outcome_decay(client) -> None:
    half_life = 40.0
    route = Route(name="d", half_life=half_life, arms=[{"name": f"arm{i}", "model": "m", "version": 1} for i in range(3)])
    store = ArmStatsStore.for_routes(client, RedisConfig(key_prefix=PREFIXES[id(client)]), [route])
    rng = np.random.default_rng(9)
    outcomes = [(int(rng.integers(0, 3)), float(rng.random() < 0.3)) for _ in range(300)]
    for start in range(0, 300, 37):
        await store.apply("d", [ArmUpdate(f"x{i}", f"arm{arm}", reward)
                                for i, (arm, reward) in enumerate(outcomes[start:start + 37], start)])
    eager = [ArmStats() for _ in range(3)]
    for arm, reward in outcomes:
        eager = [stats.decayed(decay_factor(1, half_life)) for stats in eager]
        eager[arm] = eager[arm].updated(reward)
    snapshot = await store.snapshot("d")
    for arm in range(3):
        got = snapshot.arm(f"arm{arm}").stats
        assert got.weight == pytest.approx(eager[arm].weight, rel=1e-9)
        assert got.mean == pytest.approx(eager[arm].mean, rel=1e-9)
        assert got.m2 == pytest.approx(eager[arm].m2, rel=1e-7)
    assert sum(arm.stats.weight for arm in snapshot.arms.values()) < 2 * half_life / np.log(2)


async def test_admin_drain_restore_reset_and_call_counters(client) -> None:
    store = store_for(client)
    await store.apply("a", [ArmUpdate("1", "x", 1.0), ArmUpdate("2", "y", 0.0)])
    await store.set_arm_state("a", "x", "drained")
    await store.record_calls("a", {"x": (100, 7), "y": (50, 0)})
    await store.record_calls("a", {"x": (10, 1)})
    snapshot = await store.snapshot("a")
    assert snapshot.drained == frozenset({"x"})
    assert (snapshot.arm("x").calls, snapshot.arm("x").errors) == (110, 8)
    await store.reset_arm("a", "x")
    await store.set_arm_state("a", "x", "active")
    snapshot = await store.snapshot("a")
    assert snapshot.arm("x").stats == ArmStats() and snapshot.arm("x").calls == 0
    assert snapshot.arm("y").stats.weight == 1 and not snapshot.drained
    with pytest.raises(ValueError):
        await store.set_arm_state("a", "x", "paused")
    with pytest.raises(ValueError):
        ArmUpdate("3", "x", float("nan"))


async def test_refresher_keeps_the_last_snapshot_through_an_outage(client, caplog) -> None:
    store = store_for(client)
    route = Route(name="live", arms=[{"name": "a", "model": "m", "version": 1}, {"name": "b", "model": "m", "version": 1}])
    policy = RoutePolicy.from_route(route, np.random.default_rng(0))
    await store.apply("live", [ArmUpdate(f"u{i}", "b", 1.0) for i in range(200)] +
                      [ArmUpdate(f"v{i}", "a", 0.0) for i in range(200)])
    changes: list[bool] = []
    refresher = SnapshotRefresher(store, {"live": policy}, refresh_ms=10, on_state_change=changes.append,
                                  timeout_s=2.0)
    assert await refresher.refresh_once() and refresher.redis_ok
    learned = policy.shares
    assert learned[1] > 0.99

    # a Redis that is not there: a closed port on loopback
    dead = redis_asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    refresher._store = store_for(client, dead)
    with caplog.at_level(logging.INFO, logger="banditgate.router.stats_store"):
        async with refresher:
            await asyncio.sleep(0.5)  # many failed attempts (connection refused at once)
            assert not refresher.redis_ok
            assert np.array_equal(policy.shares, learned)
            assert policy.decide(100).arm_index.size == 100
            refresher._store = store
            for _ in range(100):  # a busy machine may need a while for the next refresh
                await asyncio.sleep(0.05)
                if refresher.redis_ok:
                    break
            assert refresher.redis_ok
    await dead.aclose()
    outage_lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    assert any("available again" in r.getMessage() for r in caplog.records)
    assert changes == [False, True]


async def test_a_hanging_read_is_reported_and_abandoned(client) -> None:
    """A server that accepts the connection and never answers (the real client, no timeouts of
    its own): the refresher reports the outage after timeout_s and stops promptly instead of
    waiting on the stuck read."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hanging = redis_asyncio.Redis(host="127.0.0.1", port=port)
    route = Route(name="s", arms=[{"name": "a", "model": "m", "version": 1}])
    refresher = SnapshotRefresher(store_for(client, hanging), {"s": RoutePolicy.from_route(route)},
                                  refresh_ms=10, timeout_s=0.2)
    try:
        assert not await refresher.refresh_once()
        assert not refresher.redis_ok
        async with asyncio.timeout(5):
            async with refresher:
                await asyncio.sleep(0.3)
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
        await hanging.aclose()


@pytest.mark.parametrize(("arm", "reward"), [("b", "inf"), ("b", "nan"), ("b", "1e16"), ("b:x", "1.0"), ("", "1.0"),
                                             ("b", "one")])
async def test_the_update_script_refuses_bad_arguments_before_any_write(client, arm, reward) -> None:
    """The last update of a call is bad: nothing of the call lands (before, `tonumber('inf')` was
    added as inf, and an arm name with ':' wrote fields the snapshot splits wrongly)."""
    store = store_for(client)
    keys = [store.stats_key("churn"), *(store.seen_key("churn", f"r{i}") for i in range(3))]
    with pytest.raises(ResponseError, match=r"^BGREFUSED update 3: "):
        await store._apply_script(keys=keys, args=["0.0", 3600, "a", "1.0", "a", "0.0", arm, reward])
    assert [key async for key in client.scan_iter(match=f"{PREFIXES[id(client)]}:*")] == []
    assert redis_errors.classify(ResponseError("BGREFUSED update 3: x")) == redis_errors.REFUSED


async def test_an_arm_whose_stored_statistics_are_not_numbers_is_unusable(client, caplog) -> None:
    """A hash corrupted by hand (inf, NaN, text): that arm is drained in the snapshot (never
    sampled from garbage) and logged once; the other arm routes on; the update script refuses to
    add to it. Before, inf went into sampling and text failed every refresh of every route."""
    store = store_for(client)
    route = Route(name="live", arms=[{"name": "a", "model": "m", "version": 1}, {"name": "b", "model": "m", "version": 1}])
    policy = RoutePolicy.from_route(route, np.random.default_rng(0))
    await store.apply("live", [ArmUpdate(f"{arm}{i}", arm, 1.0) for i in range(50) for arm in "ab"])
    seen: list[tuple[str, tuple[str, ...]]] = []
    refresher = SnapshotRefresher(store, {"live": policy}, refresh_ms=10, on_unusable=lambda r, a: seen.append((r, a)))
    for corrupt in ("inf", "nan", "lots"):
        await client.hset(store.stats_key("live"), "a:m", corrupt)
        snapshot = await store.snapshot("live")
        assert snapshot.unusable == ("a",) and snapshot.arm("a").state == "drained"
        assert snapshot.arm("b").stats.weight == 50 and snapshot.arm("b").state == "active"
        with caplog.at_level(logging.INFO, logger="banditgate.router.stats_store"):
            assert await refresher.refresh_once() and await refresher.refresh_once()
        assert policy.decide(200).arm_index.tolist().count(0) < 200 * 0.2  # mostly b: a gets only its floor
        with pytest.raises(ResponseError, match="BGREFUSED field a:m of"):
            await store.apply("live", [ArmUpdate("v1", "a", 1.0)])
    assert [r.getMessage() for r in caplog.records].count(
        "route live arm a: its statistics in Redis are not numbers; the arm is drained in this gateway's view "
        "until they are (reset the arm to start it afresh)") == 1
    await store.reset_arm("live", "a")
    assert await refresher.refresh_once() and refresher.unusable["live"] == ()
    assert seen == [("live", ("a",)), ("live", ())]
