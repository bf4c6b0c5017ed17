"""The model lifecycle on the real stack: a gateway (in this process), a feedback worker (a real
subprocess), real Kafka and Redis, and traffic whose rewards and labels depend on what was served.

Scripted cases (docs/lifecycle.md): a better version dropped into the repository goes shadow ->
canary -> full -> done and the old one is drained, then unloaded - with the feedback worker
SIGKILLed at the canary stage and restarted (no stage lost or repeated); a worse version is
rejected at the shadow stage; a version better on labels but too slow is rolled back at the
canary stage.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from router.rollout_store import RolloutStore
from tests.feedback.worker_helpers import WorkerProcess, wait_until, write_config
from tests.gateway.support import start_gateway
from tests.lifecycle.stack_helpers import (
    ROUTE,
    Traffic,
    drop_version,
    gateway_config,
    make_repository,
    read_topic,
    route_config,
)

pytestmark = pytest.mark.stack


@pytest.fixture
async def loop_parts(stack, topics, redis_prefix, unique, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build (route) -> (gateway, worker factory, store); everything is stopped afterwards."""
    started: dict[str, Any] = {"workers": [], "gateway": None}
    client = aredis.Redis.from_url(stack.redis)

    async def build(route: dict[str, Any]) -> tuple[Any, Any, RolloutStore, Path]:
        repository = make_repository(tmp_path)
        gateway = await start_gateway(gateway_config(stack, topics, repository, redis_prefix, route))
        started["gateway"] = gateway
        config_path = write_config(tmp_path / "feedback.yaml", kafka=stack.kafka, redis=stack.redis,
                                   topics=topics.topics.model_dump(), redis_prefix=redis_prefix,
                                   app_id=f"fb-{unique}", routes=[route],
                                   kafka_settings={"session_timeout_ms": 6000})

        def worker() -> WorkerProcess:
            process = WorkerProcess(config_path, tmp_path / "worker.log").start()
            started["workers"].append(process)
            return process

        return gateway, worker, RolloutStore(client, prefix=redis_prefix), repository

    yield build
    for process in started["workers"]:
        process.stop(timeout_s=20)
    if started["gateway"] is not None:
        await started["gateway"].stop()
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def stage_of(store: RolloutStore, *stages: str):  # type: ignore[no-untyped-def]
    async def check() -> Any:
        record = await store.read(ROUTE)
        return record if record is not None and record.state.stage in stages else None
    return check


async def test_better_version_goes_full_and_survives_a_worker_kill(loop_parts, stack, topics) -> None:
    gateway, start_worker, store, repository = await loop_parts(route_config())
    worker = start_worker()
    await worker.wait_ready()
    async with Traffic(stack, topics, seed=1) as traffic:
        traffic.run(rate_per_s=100)
        drop_version(repository, 2, slope=20.0)
        await wait_until(stage_of(store, "shadow"), 20, "the new version to enter as a shadow", worker)
        runtime = gateway.gateway.dataplane.routes[ROUTE]
        await wait_until(lambda: _arms(runtime, ["a"], shadows=["m-v2"]), 10, "the gateway to add the shadow")
        seen: set[tuple[tuple[str, ...], frozenset[str]]] = set()

        async def watch() -> None:
            while True:
                seen.add((runtime.policy.arm_names, runtime.policy.drained))
                await asyncio.sleep(0.05)
        watcher = asyncio.get_running_loop().create_task(watch())
        await wait_until(stage_of(store, "canary"), 90, "the shadow test to promote it", worker)
        worker.kill()  # mid-rollout: nothing of the rollout lives in the worker
        second = start_worker()
        await wait_until(stage_of(store, "full", "done"), 120, "the canary criteria to hold", second)
        await wait_until(stage_of(store, "done"), 30, "the grace period to end", second)
        await wait_until(lambda: _arms(runtime, ["m-v2"]), 5, "every replica to serve the new version alone")
        watcher.cancel()
    # the canary served next to the old arm, then the old arm was drained, then removed
    assert (("a", "m-v2"), frozenset()) in seen
    assert (("a", "m-v2"), frozenset({"a"})) in seen
    repository_keys = {(m.name, m.version) for m in gateway.gateway.repository.loaded()}
    assert ("m", 1) not in repository_keys and ("m", 2) in repository_keys  # the replaced version unloaded
    assert traffic.served_by.get("m-v2", 0) > 0
    changes = await wait_until(lambda: _changes(stack, topics, 4), 20, "the audit events to be published", second)
    by_seq = {event["seq"]: event["to_stage"] for event in changes}
    assert by_seq == {0: "shadow", 1: "canary", 2: "full", 3: "done"}  # each stage once, none lost
    alerts = await wait_until(lambda: _rollout_alerts(stack, topics, 3), 20, "the promote alerts", second)
    assert sorted({a["details"]["to_stage"] for a in alerts}) == ["canary", "done", "full"]
    assert all(a["kind"] == "promote" and a["model_version"] == 2 for a in alerts)


async def test_worse_version_is_rejected_at_shadow(loop_parts, stack, topics) -> None:
    gateway, start_worker, store, repository = await loop_parts(route_config())
    worker = start_worker()
    await worker.wait_ready()
    async with Traffic(stack, topics, seed=2) as traffic:
        traffic.run(rate_per_s=100)
        drop_version(repository, 2, slope=-20.0)
        record = await wait_until(stage_of(store, "rejected", "canary", "rolled_back"), 90,
                                  "the shadow test to decide", worker)
        assert record.state.stage == "rejected" and record.state.reason.startswith("shadow test: reject")
        runtime = gateway.gateway.dataplane.routes[ROUTE]
        await wait_until(lambda: _arms(runtime, ["a"], shadows=[]), 5, "the candidate to leave the route")
    assert traffic.served_by.get("m-v2", 0) == 0  # it never served
    assert ("m", 2) not in {(m.name, m.version) for m in gateway.gateway.repository.loaded()}
    assert await store.begin(gateway.gateway.config.routes[0], 2) is None  # never retried
    drop_version(repository, 3, slope=20.0)  # a newer one does start
    newer = await wait_until(stage_of(store, "shadow"), 20, "the newer version to start", worker)
    assert newer.state.version == 3 and newer.rejected == {"m": 2}
    alerts = await wait_until(lambda: _rollout_alerts(stack, topics, 1), 20, "the reject alert", worker)
    assert [a["kind"] for a in alerts] == ["reject"]


async def test_slow_version_is_rolled_back_at_canary(loop_parts, stack, topics) -> None:
    route = route_config(canary={"max_p99_latency_ms": 20})
    gateway, start_worker, store, repository = await loop_parts(route)
    worker = start_worker()
    await worker.wait_ready()
    async with Traffic(stack, topics, seed=3) as traffic:
        traffic.run(rate_per_s=60)
        drop_version(repository, 2, slope=20.0, slow_matmuls=60)  # right on labels, ~40 ms a batch
        await wait_until(stage_of(store, "canary", "rejected"), 90, "the shadow test to promote it", worker)
        record = await wait_until(stage_of(store, "rolled_back", "full"), 90, "the canary to be judged", worker)
        assert record.state.stage == "rolled_back"
        assert "p99 latency" in record.state.reason, record.state.reason
        runtime = gateway.gateway.dataplane.routes[ROUTE]
        await wait_until(lambda: _arms(runtime, ["a"], shadows=[]), 5, "traffic to return to the old arm")
    changes = await wait_until(lambda: _changes(stack, topics, 3), 20, "the audit events", worker)
    rollback = [c for c in changes if c["to_stage"] == "rolled_back"]
    assert len(rollback) == 1 and rollback[0]["actor"] == "rule:latency-error"


async def _arms(runtime: Any, arms: list[str], shadows: list[str] | None = None) -> bool:
    names = [a.name for a in runtime.route.arms]
    ok = names == arms and list(runtime.policy.arm_names) == arms
    if shadows is not None:
        ok = ok and [s.name for s in runtime.route.shadows] == shadows
    return ok


async def _changes(stack: Any, topics: Any, count: int) -> list[dict[str, Any]] | None:
    events = await read_topic(stack, topics.topics.routing_changes)
    return events if len({e["seq"] for e in events}) >= count else None



async def _rollout_alerts(stack: Any, topics: Any, count: int) -> list[dict[str, Any]] | None:
    alerts = [a for a in await read_topic(stack, topics.topics.alerts) if a.get("metric") == "rollout_stage"]
    return alerts if len(alerts) >= count else None
