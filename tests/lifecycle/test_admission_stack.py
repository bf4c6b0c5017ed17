"""The admission gate on the real Redis with two gateway replicas in this process: a new version is
benchmarked once (one replica wins the lease), a version over budget is refused and never
shadows, the verdict survives a restart without a second benchmark, an operator admits it by hand
through the admin endpoint (admin token), and a version within budget goes on to shadow by itself.

The refusal is decided on the file-size budget (the heavy model's file is 3x the incumbent's, a
fact of the file) and the other budgets are wide, so the verdicts do not depend on how busy the
machine is; tests/lifecycle/test_admission.py checks the measured figures themselves."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis

from banditgate.config import parse_config
from loadtests.admission_models import build_admission_model
from router.rollout_store import RolloutStore
from tests.feedback.worker_helpers import wait_until
from tests.gateway.support import start_gateway

pytestmark = pytest.mark.stack
ROUTE = "r"
TOKEN = "admission-admin"  # noqa: S105 - a test token
HIDDEN = 512


def drop(repository: Path, version: int, extra: int = 0, seed: int = 1) -> None:
    """A new version arrives: written aside, then renamed into the repository in one step."""
    staging = repository / f".staging-{uuid.uuid4().hex[:6]}"
    build_admission_model(staging / "model.onnx", hidden=HIDDEN, seed=seed, extra=extra)
    os.replace(staging, repository / "m" / str(version))


def document(stack: Any, topics: Any, repository: Path, prefix: str) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                  "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": prefix, "snapshot_refresh_ms": 100},
        "models": {"repository": str(repository), "poll_interval_s": 0.3, "warmup_rows": 2},
        "batching": {"max_batch_size": 16},
        "server": {"http_port": 0, "grpc_port": 0, "enable_grpc": False, "admin_tokens": [TOKEN]},
        "drift": {"enabled": False},
        "routes": [{"name": ROUTE, "policy": "thompson", "guardrail": {"enabled": False},
                    "arms": [{"name": "a", "model": "m", "version": 1}],
                    "rollout": {"admission": {"max_size_mb": 2.5, "max_latency_p99_ratio": 50,
                                              "max_memory_ratio": 10, "min_throughput_ratio": 0.02,
                                              "samples": 20, "batch_samples": 3, "busy_fraction": 1.0,
                                              "timeout_s": 120}}}],
    }


async def test_refused_once_never_shadows_admitted_by_hand(stack, topics, redis_prefix, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    build_admission_model(repository / "m" / "1" / "model.onnx", hidden=HIDDEN, seed=1)
    config = parse_config(document(stack, topics, repository, redis_prefix), env={})
    client = aredis.Redis.from_url(stack.redis)
    store = RolloutStore(client, prefix=redis_prefix)
    gateways = [await start_gateway(config), await start_gateway(config)]
    later = None
    shadowed: list[str] = []

    def watch() -> None:
        for running in [*gateways, *([later] if later else [])]:
            shadowed.extend(s.name for s in running.gateway.dataplane.routes[ROUTE].route.shadows)

    async def stage(wanted: str, version: int) -> Any:
        watch()
        record = await store.read(ROUTE)
        return record if record is not None and record.state.version == version and \
            record.state.stage == wanted else None

    try:
        drop(repository, 2, extra=2)  # answers as v1 does, 3x the weights
        record = await wait_until(lambda: stage("refused", 2), 90, "version 2 to be refused", interval_s=0.2)
        assert shadowed == []  # never mirrored traffic on either replica
        result = record.admission
        assert result is not None and result["admitted"] is False
        assert result["reason"].startswith("refused at admission: size")
        # refused on its file size before any child loaded it; one replica wrote the verdict
        assert result["candidate"] is None and result["checks"][0]["value"] > 2.5
        runners = [running.gateway.rollouts.admission for running in gateways]
        assert sum(r.children_started for r in runners) == 0
        assert sum(r.verdicts_written for r in runners) == 1
        # every replica exports the stored verdict (and the file size it was refused on)
        labels = {"route": ROUTE, "model": "m", "version": "2"}
        for running in gateways:
            registry = running.gateway.registry
            await wait_until(lambda r=registry: _is(r, "banditgate_admission_admitted", labels, 0.0), 5,
                             "the refusal gauge")
            assert await _sample(registry, "banditgate_admission_file_bytes", labels) == pytest.approx(
                result["checks"][0]["value"] * 2**20, rel=1e-3)
        # the version left admission: the replicas keep nothing of it
        await wait_until(lambda: _all_pruned(runners), 5, "the runners to forget version 2")
        # one audit event per transition, one alert, with the figures
        sent: list[dict[str, Any]] = []

        async def collect(items: list[dict[str, Any]]) -> None:
            sent.extend(items)

        await store.drain_outbox(ROUTE, collect)
        assert [(item["topic"], item["value"].get("to_stage") or item["value"]["kind"]) for item in sent] == [
            ("routing_changes", "admission"), ("routing_changes", "refused"), ("alerts", "refused")]
        assert sent[2]["value"]["details"]["admission"]["checks"] == result["checks"]
        # a restarted replica finds the verdict recorded: no second benchmark, no shadow
        await gateways[0].stop()
        gateways.pop(0)
        later = await start_gateway(config)
        await asyncio.sleep(1.5)
        watch()
        assert later.gateway.rollouts.admission.children_started == 0 and shadowed == []
        assert (await store.read(ROUTE)).state.stage == "refused"  # type: ignore[union-attr]
        # admitted by hand: the admin token is needed
        base = f"http://127.0.0.1:{later.gateway.http_port}/v2/admin/routes/{ROUTE}/rollout"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.post(f"{base}/admit", json={"version": 2})).status_code == 401
            wrong = await http.post(f"{base}/admit", json={"version": 3, "who": "carol"}, headers=auth)
            assert wrong.status_code == 400 and "not 3" in wrong.json()["error"]
            status = (await http.get(f"{base}/status", headers=auth)).json()["rollout"]
            assert status["stage"] == "refused" and status["admission"]["admitted"] is False
            answer = await http.post(f"{base}/admit", json={"version": 2, "who": "carol"}, headers=auth)
            assert answer.status_code == 200, answer.text
            assert answer.json()["rollout"]["stage"] == "shadow" and "admin:carol" in answer.json()["change"]
            assert [s.name for s in later.gateway.dataplane.routes[ROUTE].route.shadows] == ["m-v2"]
            # the stored verdict says admitted by hand (the gauge and status follow), the measured one beside
            status = (await http.get(f"{base}/status", headers=auth)).json()["rollout"]
            assert status["admission"]["admitted"] is True
            assert status["admission"]["reason"].startswith("admitted by hand by carol")
            assert status["admission"]["manual"]["measured"] == result["reason"]
            await wait_until(lambda: _is(later.gateway.registry, "banditgate_admission_admitted", labels, 1.0), 5,
                             "the admitted gauge")
            other = gateways[0].gateway.dataplane.routes[ROUTE]
            await wait_until(lambda: _shadows(other, ["m-v2"]), 5, "the other replica to add the shadow")
            # a version within budget goes on to shadow by itself
            rolled = await http.post(f"{base}/rollback", json={"who": "carol"}, headers=auth)
            assert rolled.status_code == 200, rolled.text
        drop(repository, 3, seed=2)
        record = await wait_until(lambda: stage("shadow", 3), 90, "version 3 to be admitted", interval_s=0.2)
        assert record.admission["admitted"] is True and record.state.reason.startswith("admitted: ")
        # benchmarked in one child process, its figures exported
        assert sum(r.children_started for r in [*runners[1:], later.gateway.rollouts.admission]) == 1
        figures = record.admission["incumbent"]
        await wait_until(lambda: _is(later.gateway.registry, "banditgate_admission_memory_bytes",
                                     {**labels, "version": "1"}, figures["memory_mb"] * 2**20), 5,
                         "the incumbent's memory gauge")
        await wait_until(lambda: _shadows(later.gateway.dataplane.routes[ROUTE], ["m-v3"]), 5, "the shadow")
    finally:
        for running in [*gateways, *([later] if later else [])]:
            await running.stop()
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _sample(registry: Any, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


async def _is(registry: Any, name: str, labels: dict[str, str], value: float) -> bool:
    return registry.get_sample_value(name, labels) == value


async def _all_pruned(runners: list[Any]) -> bool:
    return all(not r.results and not r.child_pids and not r._next_claim for r in runners)


async def _shadows(runtime: Any, names: list[str]) -> bool:
    return [s.name for s in runtime.route.shadows] == names
