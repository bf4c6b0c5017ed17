"""Operating a rollout by hand on the real stack: the admin endpoints (admin token) and the
`banditgate rollout` CLI; every change is one audit event on routing-changes and the gateway
applies it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
import yaml

from banditgate.config import parse_config
from tests.feedback.worker_helpers import wait_until
from tests.gateway.support import start_gateway
from tests.lifecycle.stack_helpers import ROUTE, drop_version, make_repository, read_topic, route_config

pytestmark = pytest.mark.stack
TOKEN = "admin-secret"


async def test_admin_endpoints_and_cli_operate_a_rollout(stack, topics, redis_prefix, tmp_path: Path) -> None:
    from aiohttp import web

    hooked: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        hooked.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp has no public accessor
    repository = make_repository(tmp_path)
    drop_version(repository, 2, slope=20.0)
    document = {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}", "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix, "snapshot_refresh_ms": 100},
        # no polling: versions start only when registered through the admin API
        "models": {"repository": str(repository), "poll_interval_s": 0, "warmup_rows": 2},
        "server": {"http_port": 0, "grpc_port": 0, "enable_grpc": False, "admin_tokens": [TOKEN]},
        "drift": {"enabled": False},
        "routes": [{**route_config(), "webhook_url": f"http://127.0.0.1:{hook_port}/hook"}],
    }
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(parse_config(document, env={}))
    replica = await start_gateway(parse_config(document, env={}))  # a second replica: applies from the store
    client = aredis.Redis.from_url(stack.redis)
    runtime = gateway.gateway.dataplane.routes[ROUTE]
    other = replica.gateway.dataplane.routes[ROUTE]
    base = f"http://127.0.0.1:{gateway.gateway.http_port}/v2/admin/routes/{ROUTE}/rollout"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.post(f"{base}/start", json={"version": 2})).status_code == 401
            status = (await http.get(f"{base}/status", headers=auth)).json()
            assert status["rollout"] is None
            answer = await http.post(f"{base}/start", json={"version": 2, "who": "carol"}, headers=auth)
            assert answer.status_code == 200, answer.text
            assert answer.json()["rollout"]["stage"] == "shadow"
            assert [s.name for s in runtime.route.shadows] == ["m-v2"]  # this replica at once
            await wait_until(lambda: _lineup(other, ["a"], ["m-v2"]), 5, "the other replica to add the shadow")
            again = await http.post(f"{base}/start", json={"version": 2}, headers=auth)
            assert again.status_code == 400 and "may not start" in again.json()["error"]
            paused = (await http.post(f"{base}/pause", json={"who": "carol"}, headers=auth)).json()
            assert paused["rollout"]["paused"] is True
            promoted = (await http.post(f"{base}/promote", json={"who": "carol", "reason": "looks fine"},
                                        headers=auth)).json()
            assert promoted["rollout"]["stage"] == "canary" and promoted["change"].endswith("looks fine")
            assert [a.name for a in runtime.route.arms] == ["a", "m-v2"]
            assert runtime.policy.shares[1] == pytest.approx(0.5)  # capped at max_share (no rewards yet: even)
            await wait_until(lambda: _lineup(other, ["a", "m-v2"], []), 5, "the other replica to add the canary")
            unknown = await http.post(f"{base}/explode", headers=auth, json={})
            assert unknown.status_code == 404
        result = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "banditgate.cli", "rollout", "rollback", ROUTE, "-c", str(config_path),
            "--who", "bob", "--reason", "manual test", "--json"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert printed["rollout"]["stage"] == "rolled_back" and "admin:bob" in printed["change"]
        assert printed["published"] == 6  # start, pause, promote + its alert, rollback + its alert
        await wait_until(lambda: _serves(runtime, ["a"]), 5, "the gateway to apply the rollback")
        await wait_until(lambda: _serves(other, ["a"]), 5, "the other replica to apply the rollback")
        status_cli = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "banditgate.cli", "rollout", "status", ROUTE, "-c", str(config_path)],
            capture_output=True, text=True, timeout=60)
        assert status_cli.returncode == 0 and "rolled_back" in status_cli.stdout, status_cli.stderr
        failed = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "banditgate.cli", "rollout", "promote", ROUTE, "-c", str(config_path)],
            capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1 and "already rolled_back" in failed.stderr
        # the alerts went the worker's way: the alerts topic and the route's webhook
        assert sorted(a["kind"] for a in hooked) == ["promote", "rollback"]
        changes = await read_topic(stack, topics.topics.routing_changes)
        assert [(c["seq"], c["to_stage"], c["actor"]) for c in changes] == [
            (0, "shadow", "admin:carol"), (1, "shadow", "admin:carol"), (2, "canary", "admin:carol"),
            (3, "rolled_back", "admin:bob")]
    finally:
        await gateway.stop()
        await replica.stop()
        await runner.cleanup()
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _serves(runtime: Any, arms: list[str]) -> bool:
    return [a.name for a in runtime.route.arms] == arms and not runtime.route.shadows


async def _lineup(runtime: Any, arms: list[str], shadows: list[str]) -> bool:
    return ([a.name for a in runtime.route.arms] == arms and list(runtime.policy.arm_names) == arms
            and [s.name for s in runtime.route.shadows] == shadows)
