"""MemoryArmStatsStore: identical to the Redis store (real Redis), and its bulk path to its exact one."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as redis_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from router.arm_stats import RouteSnapshot
from router.memory_store import MemoryArmStatsStore
from router.stats_store import ArmStatsStore, ArmUpdate

REDIS_URL = os.environ.get("BANDITGATE_REDIS", "redis://127.0.0.1:16379/0")


@pytest.fixture
async def redis_store() -> AsyncIterator[ArmStatsStore]:
    """A store on the real Redis under a prefix of its own, deleted after the test."""
    connection = redis_asyncio.Redis.from_url(REDIS_URL)
    prefix = f"bgtest-{uuid.uuid4().hex[:10]}"
    yield ArmStatsStore(connection, prefix=prefix, half_lives={"decayed": 37.0, "plain": None})
    keys = [key async for key in connection.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await connection.delete(*keys)
    await connection.aclose()


def same_snapshot(memory: RouteSnapshot, redis: RouteSnapshot) -> None:
    """Equal field for field: floats compared exactly (==), not approximately."""
    assert memory.outcome_count == redis.outcome_count
    assert memory.unusable == redis.unusable == ()
    assert sorted(memory.arms) == sorted(redis.arms)
    for name, arm in redis.arms.items():
        assert memory.arms[name] == arm, name


@pytest.mark.stack
@pytest.mark.parametrize("route", ["decayed", "plain"])
async def test_memory_store_holds_exactly_what_redis_holds(redis_store: ArmStatsStore, route: str) -> None:
    """3 000 outcomes over 4 arms in uneven batches, with redeliveries (inside a batch and across
    batches), a batch over the 1 000-update chunk size, a batch of duplicates only naming a new
    arm, drains, call counters and a reset: every snapshot equal to the last bit."""
    memory = MemoryArmStatsStore(half_lives={"decayed": 37.0, "plain": None})
    rng = np.random.default_rng(41)
    rewards = np.where(rng.random(3000) < 0.5, rng.random(3000) < 0.3, rng.normal(2.0, 3.0, 3000))
    updates = [ArmUpdate(f"q{i}", f"arm{rng.integers(0, 4)}", float(rewards[i])) for i in range(3000)]
    start = 0
    for size in (1, 7, 1200, 300, 2, 490, 1000):
        batch = updates[start:start + size]
        batch = batch + batch[: size // 3]  # redeliveries inside the batch
        if start:
            batch = batch + updates[start - 5:start]  # and of the previous batch
        expected = await redis_store.apply(route, batch)
        assert memory.apply_now(route, batch) == expected
        same_snapshot(memory.snapshot_now(route), await redis_store.snapshot(route))
        start += size
    only_duplicates = [ArmUpdate("q0", "fresh", 1.0), ArmUpdate("q1", "arm1", 0.0), ArmUpdate("new-one", "arm2", 1.0)]
    assert memory.apply_now(route, only_duplicates) == await redis_store.apply(route, only_duplicates)
    for operation, args in (("set_arm_state", ("arm1", "drained")), ("set_arm_state", ("ghost", "drained")),
                            ("record_calls", ({"arm0": (10, 2), "arm3": (5, 0)},)), ("reset_arm", ("arm2",))):
        await getattr(memory, operation)(route, *args)
        await getattr(redis_store, operation)(route, *args)
    late = [ArmUpdate(f"late{i}", f"arm{i % 4}", float(i % 2)) for i in range(50)]
    assert memory.apply_now(route, late) == await redis_store.apply(route, late)
    same_snapshot(memory.snapshot_now(route), await redis_store.snapshot(route))
    assert (await memory.snapshots([route, "other"])) == await redis_store.snapshots([route, "other"])


def test_dedup_marks_expire_with_the_clock_and_are_bounded() -> None:
    now = [0.0]
    memory = MemoryArmStatsStore(dedup_ttl_s=10, clock=lambda: now[0], max_seen=3)
    assert memory.apply_now("r", [ArmUpdate("a", "x", 1.0)]).applied == 1
    now[0] = 9.0
    assert memory.apply_now("r", [ArmUpdate("a", "x", 1.0)]).duplicates == 1
    now[0] = 10.5  # the mark (set at 0, TTL 10) has expired, as a Redis key would
    assert memory.apply_now("r", [ArmUpdate("a", "x", 1.0)]).applied == 1
    memory.apply_now("r", [ArmUpdate(name, "x", 0.0) for name in "bcd"])
    assert memory.seen_dropped == 1  # "a" was the oldest of four marks
    assert memory.apply_now("r", [ArmUpdate("a", "x", 1.0)]).applied == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(-5.0, 5.0)), min_size=1, max_size=120),
       st.integers(1, 5), st.sampled_from([None, 3.0, 40.0]))
def test_bulk_path_equals_the_exact_path(outcomes: list[tuple[int, float]], batches: int,
                                         half_life: float | None) -> None:
    """apply_rewards (closed-form sums) against apply_now (the script's steps), any batching."""
    names = ("a", "b", "c")
    exact = MemoryArmStatsStore(half_lives={"r": half_life})
    bulk = MemoryArmStatsStore(half_lives={"r": half_life})
    exact.apply_now("r", [ArmUpdate(f"u{i}", names[arm], reward) for i, (arm, reward) in enumerate(outcomes)])
    arms = np.array([arm for arm, _ in outcomes])
    rewards = np.array([reward for _, reward in outcomes])
    for part in np.array_split(np.arange(len(outcomes)), batches):
        assert bulk.apply_rewards("r", names, arms[part], rewards[part]) == len(part)
    want, got = exact.snapshot_now("r"), bulk.snapshot_now("r")
    assert got.outcome_count == want.outcome_count
    for name in want.arms:
        w, g = want.arms[name].stats, got.arms[name].stats
        assert g.weight == pytest.approx(w.weight, rel=1e-12)
        assert g.mean == pytest.approx(w.mean, rel=1e-11, abs=1e-12)
        assert g.m2 == pytest.approx(w.m2, rel=1e-9, abs=1e-9)


def test_bulk_path_refuses_what_the_script_refuses() -> None:
    memory = MemoryArmStatsStore()
    with pytest.raises(ValueError):
        memory.apply_rewards("r", ("a",), np.array([1]), np.array([0.0]))
    with pytest.raises(ValueError):
        memory.apply_rewards("r", ("a:b",), np.array([0]), np.array([0.0]))
    with pytest.raises(ValueError):
        memory.apply_rewards("r", ("a",), np.array([0]), np.array([np.nan]))
    assert memory.snapshot_now("r").outcome_count == 0
