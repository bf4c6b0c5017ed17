"""The Redis side against the real Redis: a batch of effects applied twice (a retry after a lost
reply, a replay after a crash) counts once; quality sums land in the all-time hash and the
window bucket; the quality monitor reads them back into gauges."""

from __future__ import annotations

import time

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from banditgate.config import Route
from feedback.join import Count, Label, Reward, Served
from feedback.ledger import FeedbackKeys, Ledger, LedgerPlanner
from feedback.metrics import FeedbackMetrics
from feedback.outcome_metrics import PredictionView
from feedback.sinks import KafkaOut, QualityMonitor, RedisSink
from router.stats_store import ArmStatsStore, ArmUpdate
from tests.feedback.worker_helpers import counts, quality_totals
from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.stack

A = Served("a", "m", 3, PredictionView(0.8, 1), offset=1)
C = Served("c", "m", 4, PredictionView(0.3, 0), offset=2, shadow=True)


def effects(now: float) -> list:
    out: list = []
    for i in range(300):
        request_id = f"r{i}"
        out += [Count("churn", request_id, "joined", "decision", "a"),
                Reward("churn", request_id, A, float(i % 2), False, now),
                Label("churn", request_id, A, 1, now, None),
                Label("churn", request_id, C, 1, now, A)]
    out.append(Count("churn", "r0", "duplicate", "dup:77", "a"))
    return out


async def test_effects_applied_twice_count_once(redis, redis_prefix) -> None:
    keys = FeedbackKeys(redis_prefix)
    store = ArmStatsStore(redis, prefix=redis_prefix, dedup_ttl_s=3600)
    sink = RedisSink(store, Ledger(redis, keys, dedup_ttl_s=3600), LedgerPlanner(keys, window_s=60.0))
    metrics = FeedbackMetrics(CollectorRegistry())
    now = time.time()
    batch = effects(now)
    # every effect twice in the same call too (a replay inside one batch): the second is a no-op
    first = await sink.apply([e for effect in batch for e in (effect, effect)], metrics)
    again = await sink.apply(batch, metrics)
    assert len(first.counts) == 301 and first.arm_applied == 300 and first.arm_duplicates == 300
    assert len(first.scored) == 900  # each Label and Reward once
    assert again.counts == [] and again.arm_applied == 0 and again.arm_duplicates == 300
    assert await counts(redis, redis_prefix, "churn") == {"joined": 300, "joined|a": 300, "duplicate": 1,
                                                          "duplicate|a": 1}
    totals = await quality_totals(redis, redis_prefix, "churn")
    assert totals["primary|a|m|3|n_reward"] == 300 and totals["primary|a|m|3|reward_sum"] == 150
    assert totals["primary|a|m|3|tp"] == 300 and totals["shadow|c|m|4|fn"] == 300
    assert totals["shadow|c|m|4|n_pair"] == 300 and totals["shadow|c|m|4|n_agree"] == 300
    assert "shadow|c|m|4|agree_sum" not in totals  # zero sums are not written
    snapshot = await store.snapshot("churn")
    assert snapshot.arm("a").stats.weight == 300 and snapshot.arm("a").stats.mean == pytest.approx(0.5)
    ttl = await redis.ttl(keys.seen("churn", "r1"))
    assert 3500 < ttl <= 3600


async def test_arm_updates_in_the_ledger_script_match_the_router_store(redis, redis_prefix) -> None:
    """The ledger's script applies the batch's rewards with the router's own update: the same
    statistics as ArmStatsStore.apply (order, lazy discounting, several chunks), and each arm
    update counts once by the router's seen key, also when only one of the two landed before."""
    rewards = [(f"r{i}", "a" if i % 3 else "b", float((i * 7) % 5 == 0)) for i in range(250)]
    served = {"a": A, "b": Served("b", "m", 1, PredictionView(0.4, 0), offset=3)}
    via_store = ArmStatsStore(redis, prefix=f"{redis_prefix}-store", half_lives={"churn": 40.0})
    await via_store.apply("churn", [ArmUpdate(r, arm, reward) for r, arm, reward in rewards])
    keys = FeedbackKeys(redis_prefix)
    store = ArmStatsStore(redis, prefix=redis_prefix, half_lives={"churn": 40.0})
    # r0..r9 counted by the router's store alone (as if a crash came between the two): not again
    await store.apply("churn", [ArmUpdate(r, arm, reward) for r, arm, reward in rewards[:10]])
    sink = RedisSink(store, Ledger(redis, keys, dedup_ttl_s=3600), LedgerPlanner(keys, 60.0, chunk_items=64))
    now = time.time()
    applied = await sink.apply([Reward("churn", r, served[arm], reward, False, now) for r, arm, reward in rewards])
    assert (applied.arm_applied, applied.arm_duplicates) == (240, 10)
    expected, got = await via_store.snapshot("churn"), await store.snapshot("churn")
    assert got.outcome_count == expected.outcome_count == 250
    for arm in ("a", "b"):
        assert got.arm(arm).stats.weight == pytest.approx(expected.arm(arm).stats.weight, rel=1e-12)
        assert got.arm(arm).stats.mean == pytest.approx(expected.arm(arm).stats.mean, rel=1e-12)
        assert got.arm(arm).stats.m2 == pytest.approx(expected.arm(arm).stats.m2, rel=1e-12)
    again = await sink.apply([Reward("churn", r, served[arm], reward, False, now) for r, arm, reward in rewards])
    assert (again.arm_applied, again.arm_duplicates) == (0, 250)
    refused = (await sink.apply([Reward("churn", "bad", served["a"], float("nan"), False, now)])).refused
    assert [(r.effect.request_id, r.reason) for r in refused] == [("bad", "not_finite")]  # dead-lettered, not raised



async def test_quality_monitor_serves_gauges_and_rejects_a_worse_shadow_once(stack, topics, redis,
                                                                             redis_prefix) -> None:
    keys = FeedbackKeys(redis_prefix)
    sink = RedisSink(ArmStatsStore(redis, prefix=redis_prefix), Ledger(redis, keys, dedup_ttl_s=3600),
                     LedgerPlanner(keys, window_s=60.0))
    now = time.time()
    await sink.apply(effects(now))
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, enable_idempotence=True)
    await producer.start()
    try:
        metrics = FeedbackMetrics(CollectorRegistry())
        route = Route(name="churn", arms=[{"name": "a", "model": "m", "version": 3}],
                      shadows=[{"name": "c", "model": "m", "version": 4}])
        monitor = QualityMonitor(redis, keys, [route], window_s=60.0, confidence=0.95, margin=0.0,
                                 out=KafkaOut(producer, topics.topics.deadletter, topics.topics.alerts),
                                 metrics=metrics, clock=lambda: now)
        # 300 pairs, shadow Brier 0.49 vs primary 0.04: the confidence sequence excludes 0
        sent = await monitor.refresh()
        assert [(a.kind, a.arm, a.model_version) for a in sent] == [("reject", "c", 4)]
        assert await monitor.refresh() == []  # decided once per shadow version
    finally:
        await producer.stop()
    alerts = await read_topic(stack.kafka, topics.topics.alerts, 1, timeout_s=20, settle_s=1.0)
    assert len(alerts) == 1 and alerts[0]["kind"] == "reject" and alerts[0]["details"]["upper"] < 0
    rows = {labels: values for labels, values in metrics.quality._rows}
    primary = rows[("churn", "a", "m", "3", "primary")]
    assert primary["accuracy"] == 1.0 and primary["rewards"] == 300 and primary["reward_mean"] == 0.5
    shadow = rows[("churn", "c", "m", "4", "shadow")]
    assert shadow["accuracy"] == 0.0 and shadow["pairs"] == 300 and shadow["advantage"] == pytest.approx(-0.45)
    assert shadow["agreement"] == 0.0
