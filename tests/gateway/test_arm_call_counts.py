"""Every arm's served and failed rows reach the store (`<arm>:calls` / `<arm>:errors`), where the
guardrail's error-rate test reads them: a model that crashes on its inputs makes its arm's error
rate the worst and gets the arm drained. Found by the fault suite: the gateway never recorded
these counters, so the error-rate guardrail had nothing to judge a crashing model by."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aredis

from loadtests.models import build_mlp
from router.stats_store import ArmStatsStore
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack


async def test_failed_rows_are_counted_per_arm(stack, topics, redis_prefix, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    build_mlp(models / "good" / "1" / "model.onnx", n_features=N_FEATURES, seed=1)
    build_mlp(models / "crashes" / "1" / "model.onnx", n_features=N_FEATURES, seed=2, fail_on_negative_first=True)
    config = gateway_config(stack, topics, models, redis_prefix, routes=[
        {"name": "r", "policy": "fixed", "guardrail": {"enabled": False},
         "arms": [{"name": "ok", "model": "good", "version": 1}, {"name": "bad", "model": "crashes", "version": 1}]}])
    running = await start_gateway(config)
    try:
        rows = (-np.random.default_rng(3).uniform(0.5, 5.0, size=(400, N_FEATURES))).round(4).tolist()
        await produce(stack.kafka, topics.topics.requests,
                      [(f"c-{i}".encode(), request_event(f"c-{i}", "r", rows[i])) for i in range(400)])
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 1, timeout_s=30, settle_s=3.0)
        letters = await read_topic(stack.kafka, topics.topics.deadletter, 1, timeout_s=30, settle_s=1.0)
        await asyncio.sleep(2.5)  # one flush of the counters (every second)
        client = aredis.Redis.from_url(stack.redis)
        try:
            snapshot = await ArmStatsStore(client, prefix=redis_prefix).snapshot("r")
        finally:
            await client.aclose()
    finally:
        await running.stop()
    answered = sum(1 for p in predictions if p["arm"] == "ok")
    failed = sum(1 for letter in letters if letter["reason"] == "inference_failed")
    assert answered + failed == 400
    assert (snapshot.arm("ok").calls, snapshot.arm("ok").errors) == (answered, 0)
    assert (snapshot.arm("bad").calls, snapshot.arm("bad").errors) == (failed, failed)
