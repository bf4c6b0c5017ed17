"""Episodes across replicas on the real Redis: two drift monitors that see halves of the same
shifted traffic send one `firing` alert per feature between them and one `resolved` when both
went quiet; a replica whose owner died opens a new episode once the claim expired; with Redis
away each replica alerts on its own (a duplicate, never a lost alert)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aredis

from banditgate.drift.episodes import EpisodeBook, EpisodeKey
from banditgate.drift.monitor import FeatureDriftMonitor
from banditgate.drift.reference import ReferenceProfile
from banditgate.episode_store import EpisodeClaims, Episodes

pytestmark = pytest.mark.stack

QUIET_S = 0.6
REFRESH_S = 0.2


@pytest.fixture
async def client(stack: Any) -> Any:
    redis = aredis.Redis.from_url(stack.redis)
    yield redis
    await redis.aclose()


def replica(client: Any, prefix: str, name: str) -> Episodes:
    return Episodes("drift", EpisodeBook(QUIET_S, refresh_s=REFRESH_S), EpisodeClaims(client, prefix, "drift"),
                    token_prefix=f"{name}:")


async def feed(monitor: FeatureDriftMonitor, episodes: Episodes, rows: np.ndarray) -> list[dict[str, Any]]:
    alerts = []
    for batch in np.array_split(rows, 20):
        for alarm in monitor.update(batch):
            key = EpisodeKey("r", "a", "m", 1, "feature_drift", alarm.feature)
            alert = await episodes.alarm(key, {"value": alarm.statistic, "threshold": alarm.threshold}, {})
            if alert is not None:
                alerts.append(alert)
    return alerts


async def test_two_replicas_send_one_alert_per_episode(client: Any, redis_prefix: str) -> None:
    rng = np.random.default_rng(3)
    profile = ReferenceProfile.build(rng.normal(size=(5000, 3)), ["f0", "f1", "f2"])
    # fixed thresholds: this test is about episodes, not calibration
    monitors = [FeatureDriftMonitor(profile, thresholds=[15.0, 15.0, 15.0]) for _ in range(2)]
    a, b = replica(client, redis_prefix, "a"), replica(client, redis_prefix, "b")
    shifted = rng.normal(size=(8000, 3)) + [0.0, 0.0, 2.0]  # f2 drifts: each replica sees half
    alarms_before = [int(m.alarms_total[2]) for m in monitors]
    fired = await feed(monitors[0], a, shifted[:4000]) + await feed(monitors[1], b, shifted[4000:])
    assert sum(int(m.alarms_total[2]) for m in monitors) - sum(alarms_before) > 4  # many alarms ...
    assert [(x["details"]["feature"], x["state"]) for x in fired] == [("f2", "firing")]  # ... one alert
    assert fired[0]["details"]["episode"].startswith("a:")
    assert await a.sweep() == [] and await b.sweep() == []  # not quiet yet
    await asyncio.sleep(QUIET_S + 2 * REFRESH_S + 0.1)  # both quiet: the claim expires
    resolved = await a.sweep() + await b.sweep()
    assert [(x["state"], x["details"]["feature"], x["details"]["episode"]) for x in resolved] == [
        ("resolved", "f2", fired[0]["details"]["episode"])]
    assert resolved[0]["details"]["alarms"] == int(monitors[0].alarms_total[2])  # the owner's own count
    assert len(a.book) == len(b.book) == 0
    again = await feed(monitors[1], b, shifted[:2000])  # a new episode, opened by b this time
    assert [(x["details"]["feature"], x["details"]["episode"][:2]) for x in again] == [("f2", "b:")]


async def test_an_owner_that_dies_leaves_an_episode_that_expires(client: Any, redis_prefix: str) -> None:
    key = EpisodeKey("r", "a", "m", 1, "score_drift")
    values = {"value": 9.0, "threshold": 8.0}
    a, b = replica(client, redis_prefix, "a"), replica(client, redis_prefix, "b")
    assert (await a.alarm(key, values, {}))["state"] == "firing"  # type: ignore[index]
    assert await b.alarm(key, values, {}) is None  # a holds it
    del a  # a dies: it never sweeps, never resolves
    await asyncio.sleep(QUIET_S + 2 * REFRESH_S + 0.1)
    assert await b.sweep() == []  # b followed: it closes its view without an alert
    fired = await b.alarm(key, values, {})
    assert fired is not None and fired["details"]["episode"].startswith("b:") and fired["details"]["feature"] is None


async def test_without_redis_each_replica_alerts_on_its_own(redis_prefix: str) -> None:
    away = aredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens on port 1
    try:
        key = EpisodeKey("r", "a", "m", 1, "feature_drift", "f0")
        alone = replica(away, redis_prefix, "x")
        assert (await alone.alarm(key, {"value": 2.0, "threshold": 1.0}, {}))["state"] == "firing"  # type: ignore[index]
        assert await alone.alarm(key, {"value": 2.0, "threshold": 1.0}, {}) is None  # still one per episode
        assert alone.redis_errors >= 1  # counted (the second alarm may be a due refresh)
    finally:
        await away.aclose()
