"""Drift monitors in the gateway: a shifted feature raises a drift alert after the shift, not before,
and one alert per episode however often its statistic crosses the threshold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from banditgate.drift.reference import ReferenceProfile
from loadtests.models import build_mlp
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack


async def test_feature_shift_raises_a_drift_alert_only_after_it(stack, topics, tmp_path: Path, redis_prefix) -> None:
    repo = tmp_path / "models"
    model_path = build_mlp(repo / "m" / "1" / "model.onnx", n_features=N_FEATURES, seed=4)
    rng = np.random.default_rng(11)
    training = rng.normal(size=(5000, N_FEATURES)).astype(np.float32)
    session = ort.InferenceSession(str(model_path))
    scores = session.run(["probability"], {"input": training})[0][:, 0]
    ReferenceProfile.build(training, [f"f{i}" for i in range(N_FEATURES)], scores=scores).save(
        model_path.parent / "reference.json")
    config = gateway_config(stack, topics, repo, redis_prefix,
                            routes=[{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "m", "version": 1}]}],
                            drift={"arl0": 1_000_000})
    running = await start_gateway(config)
    try:
        # a reference.json without stored thresholds (as written before `banditgate profile` stored
        # them): the gateway is ready at once and calibrates in the background; batches served
        # before its monitors exist are not watched, so the test waits for them
        await monitors_built(running.gateway.registry)
        before = rng.normal(size=(3000, N_FEATURES)).round(4)
        await produce(stack.kafka, topics.topics.requests,
                      [(f"b-{i}".encode(), request_event(f"b-{i}", "r", before[i].tolist())) for i in range(3000)])
        await read_topic(stack.kafka, topics.topics.predictions, 3000, timeout_s=60)
        quiet = await read_topic(stack.kafka, topics.topics.alerts, 0, timeout_s=3, settle_s=2)
        after = rng.normal(size=(3000, N_FEATURES)).round(4)
        after[:, 2] += 1.5  # covariate drift in one feature
        await produce(stack.kafka, topics.topics.requests,
                      [(f"a-{i}".encode(), request_event(f"a-{i}", "r", after[i].tolist())) for i in range(3000)])
        await read_topic(stack.kafka, topics.topics.predictions, 6000, timeout_s=60)
        alerts = await read_topic(stack.kafka, topics.topics.alerts, 1, timeout_s=30, settle_s=3)
        metrics = generate_latest(running.gateway.registry).decode()
    finally:
        assert await running.stop() == 0
    assert [(a["details"]["feature"], a["value"], a["threshold"], a["details"]["index"]) for a in quiet] == []  # stationary: P(false alarm in 3 000 rows) ~ 0.6% at ARL0 1e6 per family and for the score
    features = {a["details"]["feature"] for a in alerts if a["metric"] == "feature_drift"}
    assert "f2" in features
    alert = next(a for a in alerts if a["details"]["feature"] == "f2")
    assert alert["kind"] == "drift" and alert["route"] == "r" and alert["model_version"] == 1
    assert alert["value"] > alert["threshold"] > 0
    # a persisting shift: the CUSUM restarts and crosses again and again, but its episode alerts once
    assert alert["state"] == "firing" and alert["details"]["model"] == "m"
    episodes = [(a["metric"], a["details"]["feature"]) for a in alerts if a["state"] == "firing"]
    assert len(episodes) == len(set(episodes)), episodes
    crossings = _sample(metrics, 'banditgate_drift_alarms_total{feature="f2",model="m",version="1"}')
    assert crossings > 1 and _sample(metrics, 'banditgate_drift_episodes_open{feature="f2",model="m",version="1"}') == 1


async def monitors_built(registry: object, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while "banditgate_drift_threshold{" not in generate_latest(registry).decode():  # type: ignore[arg-type]
        assert asyncio.get_running_loop().time() < deadline, "the drift monitors were never built"
        await asyncio.sleep(0.2)


def _sample(text: str, series: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(series + " ")]
    assert lines, [line for line in text.splitlines() if line.startswith(series.split("{")[0])]
    return float(lines[0].split()[-1])
