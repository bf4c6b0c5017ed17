"""Quality drift on the real stack: a `banditgate feedback` worker runs the Bernoulli CUSUM per
model version on joined labels, serves it as gauges and publishes one `quality` alert when an
arm's error rate rises; an arm whose error rate stays put raises none."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from tests.feedback.test_worker_stack import send
from tests.feedback.worker_helpers import counts, outcome, prediction, wait_until
from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.stack

MODELS = {"a": ("churn-gbm", 3), "b": ("churn-mlp", 1)}


def phase(rng: random.Random, start: int, count: int, error_rates: dict[str, float], now: float) -> list:
    """`count` labelled requests per arm, each arm's prediction wrong with its error rate."""
    messages = []
    for i in range(start, start + count):
        for arm, rate in error_rates.items():
            request_id = f"{arm}-{i}"
            label = rng.randint(0, 1)
            wrong = rng.random() < rate
            probability = 0.8 if (label == 1) != wrong else 0.2
            model, version = MODELS[arm]
            messages.append(("predictions", request_id.encode(),
                             prediction(request_id, "churn", arm, model, version, probability, now)))
            messages.append(("outcomes", request_id.encode(), outcome(request_id, now + 1.0, label=label)))
    return messages


async def test_an_error_rate_rise_alerts_once_and_a_stationary_arm_stays_quiet(stack, topics, redis, redis_prefix,
                                                                               start_worker) -> None:
    """Both arms learn their error rate (0.10) from their first 500 labels; then arm a's rises to
    0.45 for 600 labels while arm b's stays at 0.10. At ARL0 100 000 the chance that b's 700
    monitored labels raise a false alarm is under 1 %; a's rise crosses the threshold (about 19)
    after about 150 (increments average 0.13 at an error rate of 0.45)."""
    worker = start_worker(quality_drift_reference=500, quality_drift_arl0=100_000)
    await worker.wait_ready()
    rng = random.Random(21)
    now = time.time()
    await send(stack.kafka, topics, phase(rng, 0, 600, {"a": 0.1, "b": 0.1}, now))
    await wait_until(lambda: _joined(redis, redis_prefix, 1200), 60, "1 200 joined outcomes", worker)
    await send(stack.kafka, topics, phase(rng, 600, 600, {"a": 0.45, "b": 0.1}, now))
    await wait_until(lambda: _joined(redis, redis_prefix, 2400), 60, "2 400 joined outcomes", worker)
    alerts = await read_topic(stack.kafka, topics.topics.alerts, 1, timeout_s=30, settle_s=3.0)
    assert len(alerts) == 1, alerts
    alert = alerts[0]
    assert (alert["kind"], alert["state"], alert["route"], alert["arm"], alert["model_version"], alert["metric"]) == (
        "quality", "firing", "churn", "a", 3, "label_error_rate")
    details = alert["details"]
    assert details["signal"] == "label_error" and details["role"] == "primary" and details["model"] == "churn-gbm"
    assert "feature" in details and details["feature"] is None and details["episode"]
    assert 0.05 < details["p0"] < 0.2 and alert["value"] > 0.25 and details["statistic"] > details["cusum_threshold"]
    port = int(worker.output().split("metrics on port ")[1].split()[0])
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    labels = 'model="{m}",role="primary",route="churn",signal="label_error",version="{v}"'
    a, b = labels.format(m="churn-gbm", v=3), labels.format(m="churn-mlp", v=1)
    assert f'banditgate_quality_drift_alarm{{arm="a",{a}}} 1.0' in text
    assert f'banditgate_quality_drift_alarm{{arm="b",{b}}} 0.0' in text
    assert f'banditgate_quality_drift_outcomes{{arm="b",{b}}} 1200.0' in text
    assert f'banditgate_quality_drift_threshold{{arm="b",{b}}}' in text
    assert 'banditgate_feedback_alerts_total{kind="quality",route="churn"} 1.0' in text


async def _joined(redis, prefix: str, expected: int) -> bool:
    return (await counts(redis, prefix, "churn")).get("joined", 0) >= expected
