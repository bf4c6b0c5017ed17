"""The applied guardrail against the real Redis: a clearly worse arm is drained once, with one alert."""

from __future__ import annotations

import pytest
import redis.asyncio as aredis

from banditgate.config import parse_config
from gateway.guardrail_watch import GuardrailWatch, marker_key
from router.stats_store import ArmStatsStore, ArmUpdate

pytestmark = pytest.mark.stack


async def test_worse_arm_is_drained_once_with_one_alert(stack, redis_prefix) -> None:
    config = parse_config({"routes": [{"name": "g", "policy": "thompson", "exploration_floor": 0.05,
                                       "guardrail": {"min_outcomes": 100, "confidence": 0.99},
                                       "arms": [{"name": "good", "model": "m", "version": 1},
                                                {"name": "bad", "model": "m", "version": 2}]}]}, env={})
    client = aredis.Redis.from_url(stack.redis)
    store = ArmStatsStore(client, prefix=redis_prefix)
    try:
        updates = [ArmUpdate(f"g{i}", "good", float(i % 10 < 8)) for i in range(600)]
        updates += [ArmUpdate(f"b{i}", "bad", float(i % 10 < 3)) for i in range(600)]
        await store.apply("g", updates)
        alerts: list[dict] = []
        replicas = [GuardrailWatch(store, client, {r.name: r for r in config.routes}, alerts.append) for _ in range(2)]
        for watch in replicas:
            await watch.check_once()
        snapshot = await store.snapshot("g")
        assert snapshot.arm("bad").state == "drained" and snapshot.arm("good").state == "active"
        assert len(alerts) == 1  # two replicas, one drain, one alert
        alert = alerts[0]
        assert alert["kind"] == "guardrail" and alert["arm"] == "bad" and alert["model_version"] == 2
        assert alert["details"]["best_arm"] == "good" and alert["details"]["action"] == "drained"
        assert await client.exists(marker_key(store, "g", "bad"))
    finally:
        await store.clear_route("g")
        await client.delete(marker_key(store, "g", "bad"))
        await client.aclose()
