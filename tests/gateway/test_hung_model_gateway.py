"""One arm's model hangs (a real ONNX Loop that never ends on its inputs) in a running gateway
against the real broker and Redis: the other route keeps answering every request, the hung arm's
requests are dead-lettered `model_unavailable`, the hung model reports not ready while the gateway
and the other models stay ready, and the guardrail drains the hung arm.

Before isolation the hung runs kept both pool threads for good: every model's batches timed out
(`inference_failed`, the other route included) and the hung model was reported ready.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis.asyncio as aredis

from loadtests.faults.harness import http_status
from loadtests.faults.traffic import http_post, infer_body
from loadtests.models import build_mlp
from router.stats_store import ArmStatsStore
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack

N = 300  # requests per route


async def _drained(stack, redis_prefix: str, route: str, arm: str, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    client = aredis.Redis.from_url(stack.redis)
    store = ArmStatsStore(client, prefix=redis_prefix)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if (await store.snapshot(route)).arm(arm).state == "drained":
                return True
            await asyncio.sleep(0.25)
        return False
    finally:
        await client.aclose()


async def test_a_hung_model_is_isolated_failed_fast_reported_and_drained(stack, topics, redis_prefix,  # type: ignore[no-untyped-def]
                                                                         tmp_path: Path) -> None:
    models = tmp_path / "models"
    build_mlp(models / "m-ok" / "1" / "model.onnx", n_features=N_FEATURES, seed=1)
    build_mlp(models / "m-hang" / "1" / "model.onnx", n_features=N_FEATURES, seed=2, hang_on_negative_first=True)
    build_mlp(models / "m-other" / "1" / "model.onnx", n_features=N_FEATURES, seed=3)
    config = gateway_config(
        stack, topics, models, redis_prefix,
        models={"repository": str(models), "poll_interval_s": 0, "warmup_rows": 2, "inference_timeout_s": 0.3,
                "unavailable_retry_s": 0.5, "unavailable_retry_max_s": 2.0},
        batching={"max_batch_size": 64, "max_delay_us": 1000, "max_queue_rows": 4096, "inference_threads": 2},
        routes=[{"name": "hung-route", "policy": "fixed", "guardrail": {"min_outcomes": 20},
                 "arms": [{"name": "ok", "model": "m-ok", "version": 1},
                          {"name": "stuck", "model": "m-hang", "version": 1}]},
                {"name": "other-route", "policy": "fixed",
                 "arms": [{"name": "solo", "model": "m-other", "version": 1}]}])
    running = await start_gateway(config)
    try:
        rng = np.random.default_rng(5)
        hanging = (-rng.uniform(0.5, 5.0, size=(N, N_FEATURES))).round(4).tolist()  # first feature < 0
        healthy = rng.uniform(0.5, 5.0, size=(N, N_FEATURES)).round(4).tolist()
        events = []
        for i in range(N):
            events.append((f"h-{i}".encode(), request_event(f"h-{i}", "hung-route", hanging[i])))
            events.append((f"o-{i}".encode(), request_event(f"o-{i}", "other-route", healthy[i])))
        await produce(stack.kafka, topics.topics.requests, events)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, N + 1, timeout_s=60, settle_s=3.0)
        letters = await read_topic(stack.kafka, topics.topics.deadletter, 1, timeout_s=30, settle_s=2.0)
        port = running.gateway.http_port
        assert port is not None
        model_ready = {name: await http_status(port, f"/v2/models/{name}/ready")
                       for name in ("m-hang", "m-ok", "m-other", "hung-route", "other-route")}
        gateway_ready = await http_status(port, "/v2/health/ready")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:  # the sidecar refuses the unavailable model at once: 503 with when to come back
            infer_status, infer_headers, _ = await http_post(reader, writer, "/v2/models/m-hang/infer",
                                                             infer_body("http-1", hanging[0]))
        finally:
            writer.close()
        drained = await _drained(stack, redis_prefix, "hung-route", "stuck", timeout_s=30)
    finally:
        await running.stop()
    answered = {p["request_id"]: p for p in predictions}
    dead = {orjson.loads(letter["payload"])["request_id"]: letter["reason"] for letter in letters}
    assert all(f"o-{i}" in answered for i in range(N))  # the other route answered every request
    assert all(p["arm"] == "ok" for p in predictions if p["route"] == "hung-route")
    assert set(dead) == {f"h-{i}" for i in range(N)} - set(answered)  # nothing lost, nothing twice
    assert dead and set(dead.values()) == {"model_unavailable"}
    assert model_ready == {"m-hang": 503, "m-ok": 200, "m-other": 200, "hung-route": 200, "other-route": 200}
    assert gateway_ready == 200
    assert infer_status == 503 and int(infer_headers["retry-after"]) >= 1
    assert drained
