"""The applied guardrail against the real Redis: a clearly worse arm is drained once, with one alert;
drain and marker are one atomic step (a refused write leaves neither), and the marker expires."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aredis
from redis.exceptions import ResponseError

from banditgate.config import parse_config
from gateway.guardrail_watch import MARKER_TTL_S, GuardrailWatch, marker_key
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
        assert 0 < await client.pttl(marker_key(store, "g", "bad")) <= MARKER_TTL_S * 1000  # it expires
    finally:
        await store.clear_route("g")
        await client.delete(marker_key(store, "g", "bad"))
        await client.aclose()


def _config():  # type: ignore[no-untyped-def]
    return parse_config({"routes": [{"name": "g", "policy": "thompson", "exploration_floor": 0.05,
                                     "guardrail": {"min_outcomes": 100, "confidence": 0.99},
                                     "arms": [{"name": "good", "model": "m", "version": 1},
                                              {"name": "bad", "model": "m", "version": 2}]}]}, env={})


async def test_a_refused_drain_leaves_no_marker_and_the_next_check_drains(stack, redis_prefix) -> None:
    """Redis refusing the drain (here NOPERM on HSET, for a user without it; READONLY or OOM in a
    failover or at maxmemory) used to leave the SET NX marker behind without the drain: every
    later check saw the marker and skipped the arm, so it was never drained."""
    config = _config()
    client = aredis.Redis.from_url(stack.redis)
    user = f"bg-noh-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    await client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "-hset")
    limited = aredis.Redis.from_url(stack.redis, username=user, password=password)
    store = ArmStatsStore(client, prefix=redis_prefix)
    try:
        updates = [ArmUpdate(f"g{i}", "good", float(i % 10 < 8)) for i in range(600)]
        updates += [ArmUpdate(f"b{i}", "bad", float(i % 10 < 3)) for i in range(600)]
        await store.apply("g", updates)
        alerts: list[dict] = []
        refused = GuardrailWatch(ArmStatsStore(limited, prefix=redis_prefix), limited,
                                 {r.name: r for r in config.routes}, alerts.append)
        with pytest.raises(ResponseError, match="permission|can't run this command"):  # NOPERM, inside or out of a script
            await refused.check_once()
        assert not await client.exists(marker_key(store, "g", "bad")) and alerts == []
        assert (await store.snapshot("g")).arm("bad").state == "active"
        # Redis accepts writes again: the next check drains the arm, once
        watch = GuardrailWatch(store, client, {r.name: r for r in config.routes}, alerts.append)
        await watch.check_once()
        await watch.check_once()
        assert (await store.snapshot("g")).arm("bad").state == "drained" and len(alerts) == 1
    finally:
        await client.execute_command("ACL", "DELUSER", user)
        await store.clear_route("g")
        await client.delete(marker_key(store, "g", "bad"))
        await limited.aclose()
        await client.aclose()


async def test_drain_is_idempotent_and_an_operator_drain_is_not_claimed(stack, redis_prefix) -> None:
    config = _config()
    client = aredis.Redis.from_url(stack.redis)
    store = ArmStatsStore(client, prefix=redis_prefix)
    try:
        watch = GuardrailWatch(store, client, {r.name: r for r in config.routes}, lambda _a: None, marker_ttl_s=30)
        assert await watch.drain("g", "bad") is True
        assert await watch.drain("g", "bad") is False  # a second replica: no second drain, no second alert
        assert 0 < await client.pttl(marker_key(store, "g", "bad")) <= 30_000
        await store.set_arm_state("g", "good", "drained")  # an operator drained it
        assert await watch.drain("g", "good") is False
        assert (await store.snapshot("g")).arm("good").state == "drained"
        assert await client.exists(marker_key(store, "g", "good"))
    finally:
        await store.clear_route("g")
        await client.delete(marker_key(store, "g", "bad"), marker_key(store, "g", "good"))
        await client.aclose()
