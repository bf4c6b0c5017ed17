"""The feedback worker as a real subprocess against poison events and Redis operating errors.

Before: a gaussian reward of 1e200 made the ledger's squared sum inf, orjson wrote it as null, the
script failed half-way and the worker stopped on it (and again on every restart); an arm named
``a:b`` made the planner raise; Redis answering READONLY (a failover) or OOM (maxmemory with
noeviction) was taken for a bug and stopped the worker too."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time

import orjson
import pytest
import redis.asyncio as aredis

from router.stats_store import ArmStatsStore
from tests.feedback.test_worker_stack import assert_exact, complete, expected_from_topic, make_traffic, send
from tests.feedback.worker_helpers import ROUTES, counts, outcome, quality_totals, wait_until
from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.stack

REVENUE = {"name": "revenue", "policy": "thompson", "reward": "gaussian",
           "arms": [{"name": "a", "model": "rev", "version": 1}, {"name": "b", "model": "rev", "version": 2}]}


def regression_prediction(request_id: str, arm: str, now: float, model: str | None = None) -> bytes:
    version = 1 if arm == "a" else 2
    return orjson.dumps({"request_id": request_id, "route": "revenue", "arm": arm, "model": model or "rev",
                         "model_version": version, "policy": "thompson", "propensity": 0.5,
                         "outputs": {"y": [10.0]}, "ts_request": now, "ts_predicted": now, "latency_ms": 1.0})


async def test_poison_events_are_dead_lettered_and_the_worker_keeps_counting(stack, topics, redis, redis_prefix,
                                                                             start_worker) -> None:
    worker = start_worker(routes=[*ROUTES, REVENUE])
    await worker.wait_ready()
    now = time.time()
    rng = random.Random(5)
    messages: list[tuple[str, bytes, bytes]] = []
    good: dict[str, tuple[str, float, float]] = {}  # request -> (arm, reward, label)
    for i in range(300):
        request_id = f"good-{i}"
        arm = rng.choice("ab")
        reward, label = round(rng.uniform(-50, 150), 2), round(rng.uniform(0, 20), 1)
        good[request_id] = (arm, reward, label)
        messages.append(("predictions", request_id.encode(), regression_prediction(request_id, arm, now)))
        messages.append(("outcomes", request_id.encode(), outcome(request_id, now + 1, reward=reward, label=label)))
    poison_outcomes = {
        "p-reward": outcome("p-reward", now + 1, reward=1e200),
        "p-label": outcome("p-label", now + 1, label=1e200),
        "p-inf": b'{"request_id": "p-inf", "reward": 1e400, "ts": %d}' % int(now),
        "p-neg-inf": b'{"request_id": "p-neg-inf", "reward": -1e400, "label": 1}',
        "p-nan": b'{"request_id": "p-nan", "reward": NaN}',
        "p-clicks": orjson.dumps({"request_id": "p-clicks", "reward": 1.0, "clicks": [f"i{k}" for k in range(5000)]}),
        "p-big-int": b'{"request_id": "p-big-int", "reward": 18446744073709551615}',
    }
    for request_id, value in poison_outcomes.items():
        messages.append(("predictions", request_id.encode(), regression_prediction(request_id, "a", now)))
        messages.append(("outcomes", request_id.encode(), value))
    poison_predictions = {"p-arm": regression_prediction("p-arm", "a:b", now),
                          "p-model": regression_prediction("p-model", "a", now, model="rev|2")}
    for request_id, value in poison_predictions.items():
        messages.append(("predictions", request_id.encode(), value))
        messages.append(("outcomes", request_id.encode(), outcome(request_id, now + 1, reward=5.0)))
    rng.shuffle(messages)
    await send(stack.kafka, topics, messages)

    async def all_joined() -> bool:
        return (await counts(redis, redis_prefix, "revenue")).get("joined", 0) >= len(good)

    await wait_until(all_joined, 60, "every good outcome joined", worker)
    letters = await read_topic(stack.kafka, topics.topics.deadletter, len(poison_outcomes) + len(poison_predictions),
                               timeout_s=30, settle_s=2.0)
    # the payload is the original text (1e400 and NaN are not JSON orjson reads back)
    reasons = {re.search(r'"request_id": ?"([^"]+)"', letter["payload"]).group(1): letter["reason"]  # type: ignore[union-attr]
               for letter in letters}
    assert reasons == {"p-reward": "out_of_range", "p-label": "out_of_range", "p-inf": "not_finite",
                       "p-neg-inf": "not_finite", "p-nan": "not_json", "p-clicks": "out_of_range",
                       "p-big-int": "out_of_range", "p-arm": "bad_id", "p-model": "bad_id"}
    assert worker.process is not None and worker.process.poll() is None, worker.output()[-3000:]
    assert "stopping after an unexpected error" not in worker.output()
    await asyncio.sleep(1.0)
    # Redis holds exactly the good ones
    got = await counts(redis, redis_prefix, "revenue")
    per_arm = {arm: [r for r, (a, _, _) in good.items() if a == arm] for arm in "ab"}
    assert got == {"joined": 300, **{f"joined|{arm}": len(ids) for arm, ids in per_arm.items()}}
    snapshot = await ArmStatsStore(redis, prefix=redis_prefix).snapshot("revenue")
    assert snapshot.outcome_count == 300
    quality = await quality_totals(redis, redis_prefix, "revenue")
    for arm, ids in per_arm.items():
        rewards = [good[r][1] for r in ids]
        stats = snapshot.arm(arm).stats
        assert stats.weight == len(ids) and stats.mean == pytest.approx(sum(rewards) / len(rewards), rel=1e-9)
        base = f"primary|{arm}|rev|{1 if arm == 'a' else 2}"
        assert quality[f"{base}|reward_sq_sum"] == pytest.approx(sum(r * r for r in rewards), rel=1e-9)
        assert quality[f"{base}|sq_err_sum"] == pytest.approx(sum((10.0 - good[r][2]) ** 2 for r in ids), rel=1e-9)
    assert all(math.isfinite(v) for v in quality.values())


async def test_redis_read_only_then_over_maxmemory_loses_and_doubles_nothing(stack, topics, redis_prefix,
                                                                           private_redis, start_worker) -> None:
    """A failover's READONLY (REPLICAOF an address where nothing listens: the data stays, writes
    are refused), then OOM (maxmemory below what is used, noeviction), each for a few seconds
    while events flow: the worker retries, says so once per episode, and counts exactly."""
    url, _process = private_redis
    client = aredis.Redis.from_url(url)
    now = time.time()
    traffic = make_traffic(3000, seed=4, now=now, orphan_ts=now - 3600.0 * 24 * 30)
    worker = start_worker(redis_url=url)
    await worker.wait_ready()
    third = len(traffic.messages) // 3
    try:
        await send(stack.kafka, topics, traffic.messages[:third])

        async def some_joined() -> bool:
            return (await counts(client, redis_prefix, "churn")).get("joined", 0) >= 200

        await wait_until(some_joined, 60, "some outcomes joined", worker, interval_s=0.05)
        await client.execute_command("REPLICAOF", "127.0.0.1", "9")  # port 9 (discard): nothing answers
        await send(stack.kafka, topics, traffic.messages[third:2 * third])
        await worker.wait_for("read only replica", timeout_s=30)  # READONLY, as Redis 6 or 7 words it
        await asyncio.sleep(3.0)
        await client.execute_command("REPLICAOF", "NO", "ONE")
        await worker.wait_for("redis writes succeed again", timeout_s=30)
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", str(used // 2))
        await send(stack.kafka, topics, traffic.messages[2 * third:])
        await worker.wait_for("used memory > 'maxmemory'", timeout_s=30)  # OOM
        await asyncio.sleep(3.0)
        await client.config_set("maxmemory", "0")
        expected = await expected_from_topic(stack.kafka, topics, traffic)
        await wait_until(complete(expected, client, redis_prefix), 90, "all outcomes joined after Redis took writes "
                         "again", worker)
        await asyncio.sleep(1.0)
        await assert_exact(client, redis_prefix, expected)
        output = worker.output()
        assert worker.process is not None and worker.process.poll() is None
        assert output.count("redis write failed") == 2, output[-3000:]  # one line per episode
    finally:
        await client.aclose()

