"""Rollout records in the real Redis: compare-and-set on seq, starts once, outbox, lineups, runtime arms."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aredis

from banditgate.config import Route
from router.arm_stats import ArmSnapshot, ArmStats, RouteSnapshot
from router.decision import RoutePolicy
from router.lineup import RolloutRecord, lineup
from router.rollout import Evidence, RolloutError, manual, step
from router.rollout_store import RolloutStore, latency_bucket, latency_quantile

ROUTE = Route(name="churn", arms=[{"name": "a", "model": "m", "version": 3}],
              rollout={"shadow": {"min_outcomes": 10}, "canary": {"max_share": 0.2, "min_outcomes": 5, "min_calls": 5},
                       "grace_s": 0})


@pytest.fixture
async def store(stack, redis_prefix):  # type: ignore[no-untyped-def]
    client = aredis.Redis.from_url(stack.redis)
    yield RolloutStore(client, prefix=redis_prefix)
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def test_lineup_per_stage() -> None:
    from router.rollout import start

    record = RolloutRecord.begin(ROUTE, start("churn", "m", 4, "a", now=0.0), previous=None)
    view = lineup(ROUTE, record)
    assert [a.name for a in view.arms] == ["a"] and [s.name for s in view.shadows] == ["m-v4"]
    canary = record.with_state(step(record.state, Evidence("promote", 50.0), ROUTE.rollout, 1.0).state)
    view = lineup(ROUTE, canary)
    assert [(a.name, a.cap, a.floor) for a in view.arms] == [("a", 1.0, 0.0), ("m-v4", 0.2, 0.1)]
    full = canary.with_state(manual(canary.state, "promote", "t", 2.0, ROUTE.rollout).state)
    view = lineup(ROUTE, full)
    assert [a.name for a in view.arms] == ["a", "m-v4"] and view.held_drained == ("a",)
    done = full.with_state(manual(full.state, "promote", "t", 3.0, ROUTE.rollout).state)
    view = lineup(ROUTE, done)
    assert [(a.name, a.version) for a in view.arms] == [("m-v4", 4)] and view.retired == (("m", 3),)
    rolled = canary.with_state(manual(canary.state, "rollback", "t", 2.0, ROUTE.rollout).state)
    view = lineup(ROUTE, rolled)
    assert [a.name for a in view.arms] == ["a"] and not view.shadows and view.retired == (("m", 4),)


def test_policy_arms_change_at_run_time() -> None:
    policy = RoutePolicy("churn", ["a"], rng=np.random.default_rng(1))
    policy.reconfigure(["a", "m-v4"], caps=[1.0, 0.2], weights=[1, 1], floors=[0.0, 0.1], shadow_names=[])
    snapshot = RouteSnapshot("churn", {"a": ArmSnapshot(ArmStats(1000, 0.9, 90)),
                                       "m-v4": ArmSnapshot(ArmStats(1000, 0.1, 90))})
    policy.apply_snapshot(snapshot)
    assert policy.shares[1] == pytest.approx(0.1)  # the bandit starves it: the canary keeps its floor
    snapshot = RouteSnapshot("churn", {"a": ArmSnapshot(ArmStats(1000, 0.1, 90)),
                                       "m-v4": ArmSnapshot(ArmStats(1000, 0.9, 90))})
    policy.apply_snapshot(snapshot)
    assert policy.shares[1] == pytest.approx(0.2)  # preferred, but capped
    decision = policy.decide(20_000)
    assert abs(np.mean(decision.arm_index == 1) - 0.2) < 0.02  # 0.2 +- 5 sd (sd 0.0028)
    policy.reconfigure(["a", "m-v4"], caps=[1.0, 1.0], weights=[1, 1], held_drained=["a"])
    assert policy.drained == {"a"} and policy.shares[1] == pytest.approx(1.0)
    policy.apply_snapshot(snapshot)  # the store does not undo a held drain
    assert policy.drained == {"a"}
    policy.reconfigure(["m-v4"], caps=[1.0], weights=[1])
    assert policy.arm_names == ("m-v4",) and policy.decide(5).arm_index.tolist() == [0] * 5
    with pytest.raises(ValueError):
        policy.reconfigure(["x", "y"], caps=[0.3, 0.3], weights=[1, 1])
    assert policy.arm_names == ("m-v4",)  # unchanged after a refused change


def test_latency_histogram_quantile() -> None:
    counts = {latency_bucket(1.0): 98, latency_bucket(100.0): 2}
    assert latency_quantile(counts, 0.5) == pytest.approx(1.0, rel=0.11)
    assert latency_quantile(counts, 0.99) == pytest.approx(100.0, rel=0.11)
    assert latency_quantile({}, 0.99) is None




@pytest.mark.stack
async def test_start_and_transitions_apply_once_across_writers(store: RolloutStore) -> None:
    starts = await asyncio.gather(*(store.begin(ROUTE, 4, now=1.0) for _ in range(8)))
    assert sum(record is not None for record in starts) == 1  # eight replicas, one start
    assert await store.begin(ROUTE, 4, now=2.0) is None  # active: not again
    record = await store.read("churn")
    assert record is not None and record.state.stage == "shadow" and record.state.seq == 0
    transition = step(record.state, Evidence("promote", 50.0), ROUTE.rollout, 3.0)
    assert transition is not None
    applied = await asyncio.gather(*(store.apply(record, transition, ArmStats(10, 0.5, 2.5)) for _ in range(8)))
    assert applied.count(True) == 1
    stored = await store.read("churn")
    assert stored is not None and stored.state.stage == "canary" and stored.state.seq == 1
    assert stored.baseline == ArmStats(10, 0.5, 2.5)
    assert not await store.apply(record, transition)  # stale: seq moved on
    _, audit = await store.operate(ROUTE, "rollback", "alice", "bad idea")
    assert audit.actor == "admin:alice" and audit.to_stage == "rolled_back"
    with pytest.raises(RolloutError, match="already rolled_back"):
        await store.operate(ROUTE, "promote", "alice")
    # rolled back: version 4 is never retried, a newer one starts with a seq that moves on
    assert await store.begin(ROUTE, 4, now=5.0) is None
    newer = await store.begin(ROUTE, 5, now=6.0)
    assert newer is not None and newer.state.seq == 3 and newer.rejected == {"m": 4}
    sent: list[dict] = []

    async def send(items: list[dict]) -> None:
        sent.extend(items)

    assert await store.drain_outbox("churn", send) == len(sent)
    kinds = [(item["topic"], item["value"].get("to_stage") or item["value"].get("kind")) for item in sent]
    assert kinds == [("routing_changes", "shadow"), ("routing_changes", "canary"), ("alerts", "promote"),
                     ("routing_changes", "rolled_back"), ("alerts", "rollback"), ("routing_changes", "shadow")]
    assert [item["value"]["seq"] for item in sent if item["topic"] == "routing_changes"] == [0, 1, 2, 3]
    assert await store.drain_outbox("churn", send) == 0


def test_rollout_needs_the_replaced_model_pinned() -> None:
    with pytest.raises(ValueError, match="pin its version"):
        Route(name="churn", arms=[{"name": "a", "model": "m", "version": "latest"}], rollout={})
