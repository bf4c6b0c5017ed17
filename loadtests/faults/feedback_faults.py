"""The feedback worker SIGKILLed mid-stream and restarted: every outcome still counts exactly once.

Traffic: `n` predictions and their outcomes, 1% of outcomes duplicated, 10% arriving before
their prediction, 2% orphans (outcomes for requests never predicted, already older than the
join TTL, so they expire on arrival). The expected arm statistics (outcomes and reward sum per
arm), quality sums and ledger counts are known exactly; after the drain every one of them is
compared with Redis, and every joined request's dedup mark is checked one by one.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aredis
from aiokafka import AIOKafkaProducer

from loadtests.faults.context import Context
from loadtests.faults.harness import ARMS, ROUTE, FeedbackProc, Processes, create_topics, feedback_config
from loadtests.faults.outages import arm_statistics

NO_ROUTE = "_none"


@dataclass
class Traffic:
    events: list[tuple[float, str, str, bytes]] = field(default_factory=list)  # (position, topic field, key, value)
    arm_of: dict[str, str] = field(default_factory=dict)
    reward_of: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    early: int = 0
    orphans: int = 0

    @property
    def outcomes(self) -> int:
        return sum(1 for _p, topic, _k, _v in self.events if topic == "outcomes")

    def expected_arms(self) -> dict[str, tuple[int, float]]:
        out = {arm: [0, 0.0] for arm in ARMS}
        for request_id, arm in self.arm_of.items():
            out[arm][0] += 1
            out[arm][1] += self.reward_of[request_id]
        return {arm: (int(c), float(s)) for arm, (c, s) in out.items()}


def make_traffic(n: int, seed: int, now: float) -> Traffic:
    rng = random.Random(seed)
    traffic = Traffic()
    for i in range(n):
        request_id = f"fb-{i}"
        arm = rng.choice(sorted(ARMS))
        model, version = ARMS[arm]
        reward = float(rng.random() < (0.3 if arm == "a" else 0.6))
        traffic.arm_of[request_id] = arm
        traffic.reward_of[request_id] = reward
        probability = rng.random()
        prediction = orjson.dumps({
            "request_id": request_id, "route": ROUTE, "arm": arm, "model": model, "model_version": version,
            "policy": "thompson", "propensity": 0.5, "outputs": {"probability": [probability],
                                                                 "label": int(probability >= 0.5)},
            "ts_request": now - 0.01, "ts_predicted": now, "latency_ms": 2.0})
        outcome = orjson.dumps({"request_id": request_id, "reward": reward, "label": int(reward), "ts": now + 1})
        key = request_id.encode()
        traffic.events.append((float(i), "predictions", request_id, prediction))
        if rng.random() < 0.10:
            traffic.early += 1
            outcome_at = i - rng.uniform(20, 1500)
        else:
            outcome_at = i + rng.uniform(20, 1500)
        traffic.events.append((outcome_at, "outcomes", request_id, outcome))
        if rng.random() < 0.01:
            traffic.duplicates += 1
            traffic.events.append((outcome_at + rng.uniform(1, 3000), "outcomes", request_id, outcome))
        del key
    for j in range(int(n * 0.02)):
        request_id = f"orphan-{j}"
        traffic.orphans += 1
        value = orjson.dumps({"request_id": request_id, "reward": 1.0, "ts": now - 30 * 86400.0})
        traffic.events.append((rng.uniform(0, n), "outcomes", request_id, value))
    traffic.events.sort(key=lambda e: e[0])
    return traffic


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


async def _hash(client: aredis.Redis, key: str) -> dict[str, float]:
    return {_text(k): float(_text(v)) for k, v in (await client.hgetall(key)).items()}


async def feedback_kill(ctx: Context) -> dict[str, Any]:
    n, kills, events_per_s = ctx.pick((5000, 1, 4000), (50_000, 3, 5000))
    prefix = ctx.prefix("feedback_kill")
    topics = await create_topics(ctx.kafka, prefix, 4)
    procs = Processes()
    worker = FeedbackProc("feedback_kill-worker", feedback_config(
        kafka=ctx.kafka, redis=ctx.redis, topics=topics, app_id=f"{prefix}-fb", redis_prefix=prefix), ctx.work)
    procs.add(worker)
    client = aredis.Redis.from_url(ctx.redis)
    traffic = make_traffic(n, seed=17, now=time.time())
    try:
        worker.spawn()
        await worker.wait_ready()
        producer = AIOKafkaProducer(bootstrap_servers=ctx.kafka, enable_idempotence=True, linger_ms=5)
        await producer.start()
        total = len(traffic.events)
        send_s = total / events_per_s
        kill_at = [send_s * (k + 0.5) / kills for k in range(kills)]
        started = time.monotonic()
        sent = 0
        pending = []
        restarts: list[asyncio.Task] = []
        placed: list[tuple[str, str]] = []
        ready_since: float | None = time.monotonic()
        try:
            chunk = max(1, int(events_per_s / 50))
            while sent < total or kill_at:
                restarting = bool(restarts) and not restarts[-1].done()
                if restarting:
                    ready_since = None
                elif ready_since is None:
                    ready_since = time.monotonic()
                working_s = time.monotonic() - ready_since if ready_since is not None else 0.0
                if kill_at and working_s >= 1.0 and time.monotonic() - started >= kill_at[0]:
                    # the next kill waits until the restarted worker holds its partitions again
                    kill_at.pop(0)
                    worker.kill()
                    ctx.say(f"feedback_kill: SIGKILL the worker ({kills - len(kill_at)}/{kills}) after {sent} events")
                    await asyncio.sleep(0.5)
                    worker.spawn()
                    restarts.append(asyncio.get_running_loop().create_task(worker.wait_ready()))
                elif restarts and restarts[-1].done() and restarts[-1].exception() is not None:
                    raise restarts[-1].exception()  # type: ignore[misc]
                if sent < total:
                    for _pos, topic, key, value in traffic.events[sent:sent + chunk]:
                        pending.append(await producer.send(topics[topic], key=key.encode(), value=value))
                        placed.append((topic, key))
                    sent = min(total, sent + chunk)
                await asyncio.sleep(0.02)
            await asyncio.gather(*pending)
            await asyncio.gather(*restarts)
        finally:
            await producer.stop()
        if not worker.alive():
            raise RuntimeError(f"the feedback worker exited: {worker.tail()}")
        await worker.wait_ready()
        expected = traffic.expected_arms()
        ctx.say(f"feedback_kill: {total} events sent ({traffic.outcomes} outcomes); waiting for Redis")
        deadline = time.monotonic() + ctx.pick(120, 400)
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            counts = await _hash(client, f"{prefix}:{{{ROUTE}}}:fb:counts")
            orphans = await _hash(client, f"{prefix}:{{{NO_ROUTE}}}:fb:counts")
            if counts.get("joined", 0) >= n and counts.get("duplicate", 0) >= traffic.duplicates \
                    and orphans.get("orphan", 0) >= traffic.orphans:
                break
            if time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                ctx.say(f"feedback_kill: {int(counts.get('joined', 0))}/{n} joined")
            if not worker.alive():
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # a double count would land now
        result = await _check(client, prefix, traffic, expected, n)
        if result["unmarked_examples"]:  # where their events are, for whoever investigates
            wanted = set(result["unmarked_examples"])
            metadata = [f.result() for f in pending]
            result["unmarked_events"] = [f"{topic}[{md.partition}]@{md.offset} {key}"
                                         for (topic, key), md in zip(placed, metadata) if key in wanted]
        code, exit_s = await asyncio.to_thread(worker.terminate, 60.0)
        result.update(kills=kills, early_sent=traffic.early, duplicates_sent=traffic.duplicates,
                      orphans_sent=traffic.orphans, sigterm_exit_code=code, sigterm_exit_s=round(exit_s, 2))
    finally:
        await asyncio.to_thread(procs.stop_all)
        await client.aclose()
    result.update(crashes=procs.crashes(), unclean_exits=procs.unclean_terms())
    return result


async def _check(client: aredis.Redis, prefix: str, traffic: Traffic, expected: dict[str, tuple[int, float]],
                 n: int) -> dict[str, Any]:
    """Compare every ledger in Redis with the exact expectations."""
    stats = await arm_statistics(client, prefix)
    counts = await _hash(client, f"{prefix}:{{{ROUTE}}}:fb:counts")
    orphans = await _hash(client, f"{prefix}:{{{NO_ROUTE}}}:fb:counts")
    quality = await _hash(client, f"{prefix}:{{{ROUTE}}}:fb:quality")
    pipe = client.pipeline(transaction=False)
    ids = list(traffic.arm_of)
    for request_id in ids:
        pipe.exists(f"{prefix}:{{{ROUTE}}}:seen:{request_id}")
    marks = await pipe.execute()
    missing_ids = [request_id for request_id, found in zip(ids, marks) if not found]
    missing = len(missing_ids)
    mismatches: list[str] = []
    excess: list[float] = []
    deficit: list[float] = [missing]

    def compare(what: str, got: float, want: float, counted: bool = True) -> None:
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):
            mismatches.append(f"{what}: {got:g}, expected {want:g}")
        if counted:
            excess.append(max(0.0, got - want))
            deficit.append(max(0.0, want - got))

    compare("arm statistics counter", stats["counter"], n)
    compare("joined", counts.get("joined", 0), n)
    compare("duplicate outcomes", counts.get("duplicate", 0), traffic.duplicates, counted=False)
    compare("orphans", orphans.get("orphan", 0), traffic.orphans, counted=False)
    for kind in ("late", "default"):
        compare(kind, counts.get(kind, 0), 0, counted=False)
    for arm, (count, total) in expected.items():
        model, version = ARMS[arm]
        weight, reward_sum = stats["arms"][arm]
        compare(f"arm {arm} weight", weight, count)
        compare(f"arm {arm} reward sum", reward_sum, total, counted=False)
        compare(f"joined|{arm}", counts.get(f"joined|{arm}", 0), count)
        base = f"primary|{arm}|{model}|{version}"
        compare(f"quality {base} n_reward", quality.get(f"{base}|n_reward", 0), count)
        compare(f"quality {base} reward_sum", quality.get(f"{base}|reward_sum", 0), total, counted=False)
        compare(f"quality {base} n", quality.get(f"{base}|n", 0), count)
    return {
        "outcomes": traffic.outcomes, "expected_applied": n, "applied": stats["counter"],
        "double_counted": int(round(max(excess, default=0.0))), "lost": int(round(max(deficit))),
        "unmarked_requests": missing, "unmarked_examples": missing_ids[:10], "exact": not mismatches, "mismatches": mismatches[:10],
    }
