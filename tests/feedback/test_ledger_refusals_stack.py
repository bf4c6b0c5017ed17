"""Poison in the ledger, against the real Redis: the ledger script checks its arguments and what is
stored where it adds before its first write, and refuses with ``BGREFUSED`` having changed
nothing (Redis does not roll a failed script back: tokens written before the failure would make
the items look applied on a retry or replay). RedisSink then splits a refused chunk until it has
the single effects Redis refuses, applies every other one, and hands those back to dead-letter."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.exceptions import ResponseError

from banditgate import redis_errors
from feedback.join import Count, Label, Reward, Served
from feedback.ledger import FeedbackKeys, Ledger, LedgerPlanner
from feedback.outcome_metrics import PredictionView
from feedback.sinks import RedisSink
from router.stats_store import ArmStatsStore
from tests.feedback.worker_helpers import counts

pytestmark = pytest.mark.stack

A = Served("a", "m", 3, PredictionView(0.8, 1), offset=1)


def effects(now: float, n: int = 20, prefix: str = "r") -> list[Any]:
    out: list[Any] = []
    for i in range(n):
        request_id = f"{prefix}{i}"
        out += [Count("churn", request_id, "joined", "decision", "a"),
                Reward("churn", request_id, A, float(i % 2), False, now),
                Label("churn", request_id, A, 1, now, None)]
    return out


def parts(redis: Any, prefix: str) -> tuple[FeedbackKeys, ArmStatsStore, Ledger, LedgerPlanner]:
    keys = FeedbackKeys(prefix)
    return keys, ArmStatsStore(redis, prefix=prefix, dedup_ttl_s=3600), Ledger(redis, keys, 3600), \
        LedgerPlanner(keys, 60.0)


async def tokens(redis: Any, keys: FeedbackKeys, n: int, prefix: str = "r") -> int:
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        pipe.hlen(keys.seen("churn", f"{prefix}{i}"))
    return sum(await pipe.execute())


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 1e300, "1"])
async def test_a_poison_amount_in_the_last_item_is_refused_before_any_token(redis, redis_prefix, poison) -> None:
    """orjson writes inf and NaN as null; 1e300 squared is what a gaussian reward of 1e150 adds.
    Before, the script set the tokens of the items before it, then failed on the arithmetic."""
    keys, store, ledger, planner = parts(redis, redis_prefix)
    [chunk] = planner.plan(effects(time.time()), store)
    chunk.rows[-1][2][-1] = poison  # the last amount of the last item's first group
    [reply] = await ledger.apply_each([chunk])
    assert isinstance(reply, ResponseError) and redis_errors.classify(reply) == redis_errors.REFUSED
    assert str(reply).startswith("BGREFUSED item 60:")
    assert [key async for key in redis.scan_iter(match=f"{redis_prefix}:*")] == []


async def test_an_arm_update_with_a_bad_name_or_reward_is_refused_before_any_token(redis, redis_prefix) -> None:
    keys, store, ledger, planner = parts(redis, redis_prefix)
    for bad in ({2: "a:b"}, {3: float("inf")}, {3: 1e16}):
        [chunk] = planner.plan(effects(time.time()), store)
        arm_group = chunk.rows[-2][-1]  # the last Reward's arm update: [0, seen key, arm, reward]
        assert arm_group[0] == 0
        for position, value in bad.items():
            arm_group[position] = value
        [reply] = await ledger.apply_each([chunk])
        assert str(reply).startswith("BGREFUSED item 59:"), reply
        assert [key async for key in redis.scan_iter(match=f"{redis_prefix}:*")] == []


async def test_a_key_of_another_type_is_refused_before_any_token(redis, redis_prefix) -> None:
    """The route's counts hash is a string: before, every seen token of the chunk was written,
    then HINCRBYFLOAT failed with WRONGTYPE."""
    keys, store, ledger, planner = parts(redis, redis_prefix)
    await redis.set(keys.counts("churn"), "not a hash")
    [reply] = await ledger.apply_each(planner.plan(effects(time.time()), store))
    assert isinstance(reply, ResponseError) and str(reply).startswith("BGREFUSED ")
    assert "holds a string, not a hash" in str(reply)
    assert await tokens(redis, keys, 20) == 0 and await redis.exists(store.stats_key("churn")) == 0


async def test_a_stored_field_that_is_not_a_number_is_refused_before_any_token(redis, redis_prefix) -> None:
    keys, store, ledger, planner = parts(redis, redis_prefix)
    await redis.hset(keys.counts("churn"), "joined", "many")
    [reply] = await ledger.apply_each(planner.plan(effects(time.time()), store))
    assert "field joined of" in str(reply) and "not a number" in str(reply)
    assert await tokens(redis, keys, 20) == 0
    await redis.delete(keys.counts("churn"))
    await redis.hset(store.stats_key("churn"), "a:m", "inf")  # an arm's statistics corrupted
    [reply] = await ledger.apply_each(planner.plan(effects(time.time()), store))
    assert "field a:m of" in str(reply)
    assert await tokens(redis, keys, 20) == 0


async def test_a_seen_hash_of_another_type_mid_chunk_takes_back_the_tokens_before_it(redis, redis_prefix) -> None:
    """A seen key is only known to be wrong when HSETNX meets it: the tokens the call set before
    are removed again, and the error comes back as Redis gave it."""
    keys, store, ledger, planner = parts(redis, redis_prefix)
    await redis.set(keys.seen("churn", "r10"), "x")
    [reply] = await ledger.apply_each(planner.plan(effects(time.time()), store))
    assert redis_errors.classify(reply) == redis_errors.REFUSED and "WRONGTYPE" in str(reply)
    assert await tokens(redis, keys, 10) == 0
    assert await redis.exists(store.stats_key("churn"), keys.counts("churn"), keys.quality("churn")) == 0


async def test_the_sink_applies_everything_but_exactly_the_refused_effects(redis, redis_prefix) -> None:
    """One request's seen key is a string, one reward names an arm that is not a name, one is
    NaN: those are refused (and come back to be dead-lettered), every other effect is applied
    once. Before, the planner raised ValueError (a crash-looping worker) and a script error
    failed the whole batch."""
    keys, store, ledger, planner = parts(redis, redis_prefix)
    sink = RedisSink(store, ledger, LedgerPlanner(keys, 60.0, chunk_items=64))
    now = time.time()
    batch = effects(now, n=200)
    bad_name = Reward("churn", "bad-name", Served("a:b", "m", 3, PredictionView(0.8, 1), offset=9), 1.0, False, now)
    nan = Reward("churn", "nan", A, float("nan"), False, now)
    batch += [bad_name, nan]
    await redis.set(keys.seen("churn", "r77"), "x")
    applied = await sink.apply(batch)
    refused = {(r.effect.request_id, type(r.effect).__name__, r.reason) for r in applied.refused}
    assert refused == {("bad-name", "Reward", "bad_id"), ("nan", "Reward", "not_finite"),
                       ("r77", "Count", "redis_refused"), ("r77", "Reward", "redis_refused"),
                       ("r77", "Label", "redis_refused")}
    assert len(applied.counts) == 199 and applied.arm_applied == 199 and len(applied.scored) == 2 * 199
    assert await counts(redis, redis_prefix, "churn") == {"joined": 199, "joined|a": 199}
    snapshot = await store.snapshot("churn")
    assert snapshot.outcome_count == 199 and snapshot.arm("a").stats.weight == 199
    again = await sink.apply(batch)  # a replay: the refused ones again, nothing twice
    assert len(again.refused) == 5 and again.counts == [] and again.arm_applied == 0
