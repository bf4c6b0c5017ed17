"""The feedback worker's lifecycle driver against the real Redis: evidence from the stores, a
guardrail breach rolls the canary back once across workers, the same-period baseline."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.config import parse_config
from feedback.lifecycle import LifecycleDriver, stats_since
from router.arm_stats import ArmStats
from router.rollout import Evidence, step
from router.rollout_store import RolloutStore, latency_bucket
from router.stats_store import ArmStatsStore, ArmUpdate


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_stats_since_recovers_the_later_part(before: list[float], after: list[float]) -> None:
    start = ArmStats.from_rewards(before)
    later = stats_since(ArmStats.from_rewards(before + after), start)
    expected = ArmStats.from_rewards(after)
    assert later.weight == pytest.approx(expected.weight)
    assert later.mean == pytest.approx(expected.mean, abs=1e-9)
    assert later.m2 == pytest.approx(expected.m2, abs=1e-7)


@pytest.fixture
async def parts(stack, redis_prefix):  # type: ignore[no-untyped-def]
    client = aredis.Redis.from_url(stack.redis)
    config = parse_config({
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 1}],
                    "rollout": {"canary": {"max_share": 0.3, "min_outcomes": 1000, "min_calls": 10,
                                           "max_p99_latency_ms": 50}}}]}, env={})
    yield config, client
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def canary(config, client):  # type: ignore[no-untyped-def]
    store = RolloutStore(client, prefix=config.redis.key_prefix)
    record = await store.begin(config.routes[0], 2, now=1.0)
    transition = step(record.state, Evidence("promote", 500.0), config.routes[0].rollout, 2.0)
    assert await store.apply(record, transition, ArmStats.from_rewards([1.0, 0.0]))
    return store


@pytest.mark.stack
async def test_evidence_comes_from_the_stores(parts) -> None:  # type: ignore[no-untyped-def]
    config, client = parts
    store = await canary(config, client)
    arms = ArmStatsStore(client, prefix=config.redis.key_prefix)
    await arms.apply("r", [ArmUpdate("q1", "a", 1.0), ArmUpdate("q2", "a", 0.0),  # before the canary: in baseline
                           ArmUpdate("q3", "a", 1.0), ArmUpdate("q4", "m-v2", 1.0), ArmUpdate("q5", "m-v2", 1.0)])
    await arms.record_calls("r", {"m-v2": (20, 0)})
    record = await store.read("r")
    await store.add_latency("r", record.state.seq, {latency_bucket(2.0): 95, latency_bucket(80.0): 5})
    driver = LifecycleDriver(config, client, out=None)  # type: ignore[arg-type]
    evidence = await driver.gather_evidence(config.routes[0], record)
    assert evidence.candidate.weight == 2 and evidence.candidate.mean == 1.0
    assert evidence.baseline.weight == pytest.approx(1.0) and evidence.baseline.mean == pytest.approx(1.0)
    assert (evidence.calls, evidence.errors) == (20, 0)
    assert evidence.p99_latency_ms == pytest.approx(80.0, rel=0.11)
    assert evidence.guardrail_breach is None
    # 5% of calls at ~80 ms: p99 over the 50 ms limit after min_calls: rolled back, by one of two workers
    applied = await asyncio.gather(driver.step_rollout(config.routes[0]),
                                   LifecycleDriver(config, client, out=None).step_rollout(config.routes[0]))  # type: ignore[arg-type]
    assert applied.count(True) == 1
    final = await store.read("r")
    assert final.state.stage == "rolled_back" and final.state.reason.startswith("p99 latency")
    # the candidate left the route: drained in the arm store, so the guardrail never weighs it again
    assert not await driver.step_rollout(config.routes[0])
    snapshot = await arms.snapshot("r")
    assert snapshot.arms["m-v2"].state == "drained" and snapshot.arms["a"].state == "active"


@pytest.mark.stack
async def test_a_guardrail_drain_rolls_the_canary_back(parts) -> None:  # type: ignore[no-untyped-def]
    config, client = parts
    store = await canary(config, client)
    arms = ArmStatsStore(client, prefix=config.redis.key_prefix)
    await arms.set_arm_state("r", "m-v2", "drained")
    await client.set(f"{config.redis.key_prefix}:{{r}}:guardrail:m-v2", "1")
    driver = LifecycleDriver(config, client, out=None)  # type: ignore[arg-type]
    assert await driver.step_rollout(config.routes[0])
    final = await store.read("r")
    assert final.state.stage == "rolled_back" and "guardrail" in final.state.reason
    status = await store.status("r")
    assert status is not None and status["stage"] == "canary"  # what the worker saw before it acted


def _retrain_config(stack, redis_prefix: str, trigger: str):  # type: ignore[no-untyped-def]
    """One route `r` (arm `a`, model `m` version 4) with the retrain trigger `trigger` on, no cooldown."""
    return parse_config({
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 4}],
                    "retrain": {trigger: True, "cooldown_s": 0}}]}, env={})


@pytest.mark.stack
async def test_a_drift_alarm_fires_the_retrain_trigger_once(stack, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    client = aredis.Redis.from_url(stack.redis)
    config = _retrain_config(stack, redis_prefix, "drift")
    route = config.routes[0]
    store = RolloutStore(client, prefix=redis_prefix)
    try:
        await store.add_alarms("r", {"drift": 2})  # before the triggers were on: not new
        driver = LifecycleDriver(config, client, out=None)  # type: ignore[arg-type]
        assert await driver.step_retrain(route) is None
        assert await driver.step_retrain(route) is None
        await store.add_alarms("r", {"drift": 1})  # a gateway saw drift
        decisions = await asyncio.gather(driver.step_retrain(route),
                                         LifecycleDriver(config, client, out=None).step_retrain(route))  # type: ignore[arg-type]
        fired = [d for d in decisions if d is not None]
        assert len(fired) == 1 and fired[0].reasons == ("drift",)
        assert await driver.step_retrain(route) is None  # consumed
        sent: list[dict] = []

        async def send(items: list[dict]) -> None:
            sent.extend(items)

        await store.drain_outbox("r", send)
        [alert] = [item["value"] for item in sent]
        assert alert["kind"] == "retrain" and alert["metric"] == "drift" and alert["model_version"] == 4
    finally:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.mark.stack
async def test_quality_drift_alarms_of_a_worker_fire_the_quality_trigger_once(stack, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    """The worker's quality-drift watch counts alarm episodes per route (pending_alarms); the
    driver moves them into the store, where every worker's `quality` trigger sees them."""
    import collections

    client = aredis.Redis.from_url(stack.redis)
    config = _retrain_config(stack, redis_prefix, "quality")
    route = config.routes[0]
    pending: collections.Counter[str] = collections.Counter()
    try:
        driver = LifecycleDriver(config, client, out=None, quality_alarms=pending)  # type: ignore[arg-type]
        await driver.tick_retrain()  # the first evaluation opens the window
        await driver.tick_retrain()
        assert await RolloutStore(client, prefix=redis_prefix).alarms("r") == {}
        pending["r"] += 1  # an alarm episode on the serving model
        await driver.tick_retrain()
        assert not pending  # counted in the store, once
        assert await RolloutStore(client, prefix=redis_prefix).alarms("r") == {"quality": 1}
        raw = {k.decode(): v.decode() for k, v in (await client.hgetall(driver.retrain_key("r"))).items()}
        assert raw.get("alarms_seen_quality") == "1"  # the trigger consumed it
        sent: list[dict] = []

        async def send(items: list[dict]) -> None:
            sent.extend(items)

        await RolloutStore(client, prefix=redis_prefix).drain_outbox("r", send)
        [alert] = [item["value"] for item in sent]
        assert alert["kind"] == "retrain" and alert["metric"] == "quality"
        await driver.tick_retrain()
        await RolloutStore(client, prefix=redis_prefix).drain_outbox("r", send)
        assert len(sent) == 1  # no new alarm, no new trigger
    finally:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_alerts_the_driver_publishes_are_counted() -> None:
    from prometheus_client import CollectorRegistry

    from feedback.metrics import FeedbackMetrics

    class _Out:  # the messages only (publishing itself is tested on the stack above)
        def __init__(self) -> None:
            self.sent: list = []

        async def send_all(self, messages: list) -> None:
            self.sent.extend(messages)

    registry = CollectorRegistry()
    config = parse_config({"routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 1}]}]}, env={})
    out = _Out()
    client = aredis.Redis.from_url("redis://127.0.0.1:1/0")  # never connected: sending touches no Redis
    driver = LifecycleDriver(config, client, out, metrics=FeedbackMetrics(registry))  # type: ignore[arg-type]
    await driver.send_queued([{"topic": "alerts", "value": {"route": "r", "kind": "rollback"}},
                              {"topic": "routing_changes", "value": {"route": "r", "to_stage": "rolled_back"}}])
    assert len(out.sent) == 2
    assert registry.get_sample_value("banditgate_feedback_alerts_total", {"route": "r", "kind": "rollback"}) == 1
    await client.aclose()
