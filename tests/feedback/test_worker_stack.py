"""The feedback worker as a real subprocess (`banditgate feedback -c`) on the real Kafka and Redis:
exact counts with duplicates and orphans in random order, across a SIGKILL, TTL expiry, default
rewards and late outcomes, promote alerts, Redis going away mid-stream."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aredis
from aiokafka import AIOKafkaProducer

from router.stats_store import ArmStatsStore
from tests.feedback.worker_helpers import counts, outcome, prediction, quality_totals, wait_until
from tests.kafka_helpers import produce, read_topic

pytestmark = pytest.mark.stack

ARMS = {"a": ("churn-gbm", 3), "b": ("churn-mlp", 1)}


@dataclass
class Traffic:
    """A shuffled mix of predictions, shadow predictions, outcomes, duplicates and orphans for
    route `churn`, with the counts the worker must end up with."""

    messages: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic field, key, value)
    arm_of: dict[str, str] = field(default_factory=dict)
    reward_of: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    orphans: int = 0
    shadows: int = 0
    outcomes_of: dict[str, int] = field(default_factory=dict)

    def expected_arms(self) -> dict[str, tuple[int, float]]:
        out: dict[str, tuple[int, float]] = {}
        for arm in ARMS:
            rewards = [self.reward_of[r] for r, a in self.arm_of.items() if a == arm]
            out[arm] = (len(rewards), sum(rewards))
        return out


def make_traffic(n: int, seed: int, now: float, orphan_ts: float, duplicate_share: float = 0.05,
                 orphan_share: float = 0.02, shadow_share: float = 0.2) -> Traffic:
    rng = random.Random(seed)
    traffic = Traffic()
    for i in range(n):
        request_id = f"req-{seed}-{i}"
        arm = rng.choice(sorted(ARMS))
        model, version = ARMS[arm]
        reward = float(rng.random() < (0.3 if arm == "a" else 0.6))
        traffic.arm_of[request_id] = arm
        traffic.reward_of[request_id] = reward
        key = request_id.encode()
        traffic.messages.append(("predictions", key, prediction(request_id, "churn", arm, model, version,
                                                                rng.random(), now)))
        if rng.random() < shadow_share:
            traffic.shadows += 1
            traffic.messages.append(("shadow_predictions", key, prediction(request_id, "churn", "c", "churn-gbm", 4,
                                                                           rng.random(), now, shadow_of=arm)))
        traffic.messages.append(("outcomes", key, outcome(request_id, now + 1, reward=reward, label=int(reward))))
    for i in rng.sample(range(n), int(n * duplicate_share)):
        request_id = f"req-{seed}-{i}"
        traffic.duplicates += 1
        traffic.messages.append(("outcomes", request_id.encode(),
                                 outcome(request_id, now + 2, reward=1.0 - traffic.reward_of[request_id], label=0)))
    for i in range(int(n * orphan_share)):
        request_id = f"orphan-{seed}-{i}"
        traffic.orphans += 1
        traffic.messages.append(("outcomes", request_id.encode(), outcome(request_id, orphan_ts, reward=1.0)))
    rng.shuffle(traffic.messages)
    return traffic


async def send(kafka: str, topics: Any, messages: list[tuple[str, bytes, bytes]]) -> None:
    """Produce in the given order, each message to its own topic."""
    by_topic = topics.topics.model_dump()
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(by_topic[name], key=key, value=value) for name, key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def expected_from_topic(kafka: str, topics: Any, traffic: Traffic) -> Traffic:
    """The expectations from what the outcomes topic really holds (a producer retry that wrote a
    message twice makes a real duplicate): per request, the first outcome by offset wins."""
    sent = sum(1 for name, _, _ in traffic.messages if name == "outcomes")
    values = await read_topic(kafka, topics.topics.outcomes, sent, timeout_s=60, settle_s=0.5)
    per_request: dict[str, list[dict[str, Any]]] = {}
    for value in values:
        per_request.setdefault(value["request_id"], []).append(value)
    expected = Traffic(arm_of=dict(traffic.arm_of), orphans=traffic.orphans, shadows=traffic.shadows)
    expected.reward_of = {r: per_request[r][0]["reward"] for r in traffic.arm_of}
    expected.duplicates = sum(len(per_request[r]) - 1 for r in traffic.arm_of)
    expected.outcomes_of = {r: len(v) for r, v in per_request.items()}
    return expected


async def mismatches(redis: Any, prefix: str, expected: Traffic) -> list[tuple[str, list[str], int]]:
    """Requests whose ledger tokens disagree with the topic (for the failure message)."""
    out = []
    async for key in redis.scan_iter(match=f"{prefix}:{{churn}}:fb:seen:*", count=1000):
        request_id = key.decode().rsplit(":", 1)[1]
        tokens = sorted(t.decode() for t in await redis.hkeys(key))
        outcomes = expected.outcomes_of.get(request_id, 0)
        if sum(t.startswith("dup:") for t in tokens) != max(0, outcomes - 1) or "decision" not in tokens:
            out.append((request_id, tokens, outcomes))
    return out


async def assert_exact(redis: Any, prefix: str, traffic: Traffic) -> None:
    got = await counts(redis, prefix, "churn")
    n = len(traffic.arm_of)
    expected_arms = traffic.expected_arms()
    if got.get("joined") != n or got.get("duplicate", 0) != traffic.duplicates:
        raise AssertionError(f"counts {got} != joined {n}, duplicate {traffic.duplicates}; requests that differ: "
                             f"{(await mismatches(redis, prefix, traffic))[:10]}")
    for arm, (count, _) in expected_arms.items():
        assert got.get(f"joined|{arm}") == count
    assert "late" not in got and "default" not in got
    orphans = await counts(redis, prefix, "_none")
    assert orphans.get("orphan", 0) == traffic.orphans
    snapshot = await ArmStatsStore(redis, prefix=prefix).snapshot("churn")
    assert snapshot.outcome_count == n
    for arm, (count, total) in expected_arms.items():
        stats = snapshot.arm(arm).stats
        assert stats.weight == pytest.approx(count, abs=1e-9)
        assert stats.reward_sum == pytest.approx(total, abs=1e-6)
    quality = await quality_totals(redis, prefix, "churn")
    for arm, (count, total) in expected_arms.items():
        model, version = ARMS[arm]
        assert quality[f"primary|{arm}|{model}|{version}|n_reward"] == count
        assert quality[f"primary|{arm}|{model}|{version}|reward_sum"] == pytest.approx(total)
        assert quality[f"primary|{arm}|{model}|{version}|n"] == count  # every outcome had a label
    assert quality["shadow|c|churn-gbm|4|n"] == traffic.shadows


def complete(traffic: Traffic, redis: Any, prefix: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        got = await counts(redis, prefix, "churn")
        orphans = await counts(redis, prefix, "_none")
        return (got.get("joined", 0) >= len(traffic.arm_of) and got.get("duplicate", 0) >= traffic.duplicates
                and orphans.get("orphan", 0) >= traffic.orphans)
    return check


async def test_ten_thousand_in_random_order_count_exactly(stack, topics, redis, redis_prefix, start_worker) -> None:
    """10 000 predictions (20% with a shadow) and their outcomes, shuffled, plus 5% duplicate
    outcomes and 2% orphans that expire while the test runs: Redis holds the exact counts."""
    now = time.time()
    ttl = 60.0
    traffic = make_traffic(10_000, seed=1, now=now, orphan_ts=now - ttl + 6)
    worker = start_worker(join_ttl_s=ttl)
    await worker.wait_ready()
    third = len(traffic.messages) // 3
    for start in range(0, len(traffic.messages), third):  # arrives while the worker consumes
        await send(stack.kafka, topics, traffic.messages[start:start + third])
    expected = await expected_from_topic(stack.kafka, topics, traffic)
    await wait_until(complete(expected, redis, redis_prefix), 90, "all outcomes joined and orphans expired", worker)
    await asyncio.sleep(1.0)  # anything extra (a double count) would land now
    await assert_exact(redis, redis_prefix, expected)
    letters = await read_topic(stack.kafka, topics.topics.deadletter, traffic.orphans, timeout_s=30)
    assert len(letters) == traffic.orphans
    assert {letter["reason"] for letter in letters} == {"orphan"}


async def test_sigkill_mid_stream_and_restart_stays_exact(stack, topics, redis, redis_prefix, start_worker) -> None:
    """The worker is SIGKILLed while it is joining, more traffic arrives while it is down, and a new
    worker (same app id: same consumer group and changelog) finishes: the counts are still exact,
    though the new worker re-read events whose effects had been applied already."""
    now = time.time()
    traffic = make_traffic(4000, seed=2, now=now, orphan_ts=now - 3600.0 * 24 * 30)  # orphans expire on arrival
    half = len(traffic.messages) // 2
    await send(stack.kafka, topics, traffic.messages[:half])
    # the broker's minimum: the dead worker's partitions move to the new one 6 s after the kill
    first = start_worker(kafka_settings={"session_timeout_ms": 6000})
    await first.wait_ready()

    async def some_joined() -> bool:
        return (await counts(redis, redis_prefix, "churn")).get("joined", 0) >= 500

    await wait_until(some_joined, 60, "the first worker to join some outcomes", first, interval_s=0.05)
    first.kill()
    assert (await counts(redis, redis_prefix, "churn")).get("joined", 0) < len(traffic.arm_of)
    await send(stack.kafka, topics, traffic.messages[half:])
    second = start_worker()
    await second.wait_ready()
    expected = await expected_from_topic(stack.kafka, topics, traffic)
    await wait_until(complete(expected, redis, redis_prefix), 90, "all outcomes joined after the restart", second)
    await asyncio.sleep(1.0)
    await assert_exact(redis, redis_prefix, expected)
    assert second.stop() == 0


async def test_outcomes_older_than_the_ttl_are_dead_lettered(stack, topics, redis, redis_prefix,
                                                             start_worker) -> None:
    """An outcome already older than the TTL is an orphan at once; one that waits past the TTL
    for a prediction that never comes is expired by the timer; both are counted and dead-lettered."""
    ttl = 30.0
    worker = start_worker(join_ttl_s=ttl)
    await worker.wait_ready()
    now = time.time()
    await produce(stack.kafka, topics.topics.outcomes, [
        (b"too-old", outcome("too-old", now - ttl - 5, reward=1.0)),
        (b"waits", outcome("waits", now - ttl + 2, reward=1.0)),
    ])
    letters = await read_topic(stack.kafka, topics.topics.deadletter, 2, timeout_s=30)
    assert all("orphan outcome" in letter["error"] and "join TTL 30 s" in letter["error"] for letter in letters)
    assert sorted(orjson.loads(letter["payload"])["request_id"] for letter in letters) == ["too-old",
                                                                                                         "waits"]
    assert all(letter["reason"] == "orphan" and letter["topic"] == topics.topics.outcomes for letter in letters)
    assert (await counts(redis, redis_prefix, "_none")).get("orphan") == 2


async def test_default_reward_once_then_late_outcomes_do_not_count_twice(stack, topics, redis, redis_prefix,
                                                                         start_worker) -> None:
    """Route `clicks` waits 2 s for a reward, then scores the arm with 0, once. Outcomes after
    that are late: counted as late, the arm's statistics unchanged."""
    worker = start_worker()
    await worker.wait_ready()
    now = time.time()
    ids = [f"click-{i}" for i in range(20)]
    arms = {request_id: "x" if i % 2 else "y" for i, request_id in enumerate(ids)}
    await produce(stack.kafka, topics.topics.predictions, [
        (r.encode(), prediction(r, "clicks", arms[r], "ctr", 1 if arms[r] == "x" else 2, 0.6, now)) for r in ids])
    await produce(stack.kafka, topics.topics.outcomes, [(r.encode(), outcome(r, now + 0.5, reward=1.0)) for r in ids[:10]])

    async def defaults_done() -> bool:
        got = await counts(redis, redis_prefix, "clicks")
        return got.get("joined", 0) == 10 and got.get("default", 0) == 10

    await wait_until(defaults_done, 30, "10 joined and 10 defaulted", worker)
    await produce(stack.kafka, topics.topics.outcomes, [(r.encode(), outcome(r, time.time(), reward=1.0))
                                                        for r in ids[10:15]])

    async def late_done() -> bool:
        return (await counts(redis, redis_prefix, "clicks")).get("late", 0) == 5

    await wait_until(late_done, 30, "5 late outcomes", worker)
    await asyncio.sleep(1.5)  # a second default or a double count would land now
    got = await counts(redis, redis_prefix, "clicks")
    assert (got["joined"], got["default"], got["late"]) == (10, 10, 5)
    snapshot = await ArmStatsStore(redis, prefix=redis_prefix).snapshot("clicks")
    assert snapshot.outcome_count == 20
    rewarded = Counter(arms[r] for r in ids[:10])
    for arm in ("x", "y"):
        assert snapshot.arm(arm).stats.weight == pytest.approx(10)
        assert snapshot.arm(arm).stats.reward_sum == pytest.approx(rewarded[arm])


async def test_a_better_shadow_is_promoted_with_evidence(stack, topics, redis, redis_prefix, start_worker) -> None:
    """Shadow `c` is right where primary `a` is wrong: after a few hundred labels the sequential
    test decides and one promote alert carries the evidence; the quality gauges are served."""
    worker = start_worker()
    await worker.wait_ready()
    now = time.time()
    rng = random.Random(9)
    messages = []
    for i in range(400):
        request_id = f"q-{i}"
        label = rng.randint(0, 1)
        wrong, right = (0.9 if label == 0 else 0.1), (0.1 if label == 0 else 0.9)
        messages.append(("predictions", request_id.encode(),
                         prediction(request_id, "churn", "a", "churn-gbm", 3, wrong, now)))
        messages.append(("shadow_predictions", request_id.encode(),
                         prediction(request_id, "churn", "c", "churn-gbm", 4, right, now, shadow_of="a")))
        messages.append(("outcomes", request_id.encode(), outcome(request_id, now + 1, reward=0.0, label=label)))
    rng.shuffle(messages)
    await send(stack.kafka, topics, messages)
    alerts = await read_topic(stack.kafka, topics.topics.alerts, 1, timeout_s=60, settle_s=3.0)
    assert len(alerts) == 1
    alert = alerts[0]
    assert (alert["kind"], alert["route"], alert["arm"], alert["model_version"]) == ("promote", "churn", "c", 4)
    details = alert["details"]
    assert details["lower"] > 0 and details["shadow_loss"] < details["primary_loss"]
    assert details["shadow"]["accuracy"] == 1.0 and details["primaries"]["a:churn-gbm:v3"]["accuracy"] == 0.0
    port = int(worker.output().split("metrics on port ")[1].split()[0])
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    assert 'banditgate_quality_accuracy_ratio{arm="c",model="churn-gbm",role="shadow",route="churn",version="4"} 1.0' in text
    assert 'banditgate_feedback_outcomes_total{result="joined",route="churn"} 400.0' in text
    assert 'banditgate_feedback_alerts_total{kind="promote",route="churn"} 1.0' in text


async def test_redis_away_mid_stream_loses_and_doubles_nothing(stack, topics, redis_prefix, private_redis,
                                                               start_worker) -> None:
    """Redis stops answering (SIGSTOP) while the worker joins, for longer than the client's
    timeouts, then comes back: the worker retried without acknowledging, and the counts are
    exact, though some script calls it gave up on had already run."""
    url, redis_process = private_redis
    client = aredis.Redis.from_url(url)
    now = time.time()
    traffic = make_traffic(3000, seed=3, now=now, orphan_ts=now - 3600.0 * 24 * 30)
    worker = start_worker(redis_url=url)
    await worker.wait_ready()
    await send(stack.kafka, topics, traffic.messages[: len(traffic.messages) // 2])

    async def some_joined() -> bool:
        return (await counts(client, redis_prefix, "churn")).get("joined", 0) >= 300

    await wait_until(some_joined, 60, "some outcomes joined", worker, interval_s=0.05)
    redis_process.send_signal(signal.SIGSTOP)
    await send(stack.kafka, topics, traffic.messages[len(traffic.messages) // 2:])
    await worker.wait_for("redis write failed", timeout_s=30)
    await asyncio.sleep(3.0)  # past the client's 2 s socket timeout: calls are abandoned and retried
    redis_process.send_signal(signal.SIGCONT)
    expected = await expected_from_topic(stack.kafka, topics, traffic)
    await wait_until(complete(expected, client, redis_prefix), 90, "all outcomes joined after Redis came back", worker)
    await asyncio.sleep(1.0)
    try:
        await assert_exact(client, redis_prefix, expected)
    finally:
        await client.aclose()
    assert "redis writes succeed again" in worker.output()
