"""Every dashboard panel's query returns data from a real Prometheus scraping a real gateway and
feedback worker under a little traffic; the series carry the labels the catalogue documents; every
alert rule evaluates without error; the gateway logs JSON and a start-up banner."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from banditgate.drift.reference import ReferenceProfile
from loadtests.models import build_mlp
from tests.conftest import delete_topics
from tests.feedback.worker_helpers import WorkerProcess
from tests.kafka_helpers import produce, read_topic, request_event
from tests.observability.support import ALERTS, Prometheus, base_metric, catalogue, panel_queries
from tests.processes import free_port, start_serve, write_config

pytestmark = pytest.mark.stack

N_FEATURES = 8
MODELS = {"m-a": 1, "m-b": 2, "m-c": 3}  # model -> seed
DEADLINE_S = 45.0


def model_repository(root: Path) -> Path:
    """Three one-version models, each with a drift reference profile of its training data."""
    rng = np.random.default_rng(5)
    training = rng.normal(size=(2000, N_FEATURES)).astype(np.float32)
    for name, seed in MODELS.items():
        path = build_mlp(root / name / "1" / "model.onnx", n_features=N_FEATURES, seed=seed)
        scores = ort.InferenceSession(str(path)).run(["probability"], {"input": training})[0][:, 0]
        ReferenceProfile.build(training, [f"f{i}" for i in range(N_FEATURES)], scores=scores).save(
            path.parent / "reference.json")
    # a new version of m-a: route `gate` benchmarks it at its admission gate (the admission panel)
    shutil.copytree(root / "m-a" / "1", root / "m-a" / "2")
    return root


def stack_config(stack: Any, topics: Any, repository: Path, redis_prefix: str, unique: str,
                 feedback_port: int) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"obs-{unique}", "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix, "snapshot_refresh_ms": 200},
        # polled: route `gate` finds m-a version 2 (its admission benchmark feeds the admission panel)
        "models": {"repository": str(repository), "poll_interval_s": 1, "warmup_rows": 1},
        "batching": {"max_batch_size": 64, "max_delay_us": 1000},
        "server": {"host": "127.0.0.1"},
        "feedback": {"app_id": f"obs-fb-{unique}", "web_port": feedback_port, "flush_interval_s": 0.05,
                     "quality_window_s": 60, "join_ttl_s": 600,
                     # the quality-drift panels: a short reference window, so the detectors calibrate
                     "quality_drift_reference": 20},
        "drift": {"arl0": 1000},
        "logging": {"level": "info", "json": True},
        "routes": [{"name": "churn", "policy": "thompson", "exploration_floor": 0.1, "reward_wait_s": 8,
                    "default_reward": 0,
                    "arms": [{"name": "a", "model": "m-a", "version": 1}, {"name": "b", "model": "m-b", "version": 1}],
                    "shadows": [{"name": "c", "model": "m-c", "version": 1}]},
                   # the interleaving panels: the worker serves every configured pair from the start
                   {"name": "search", "policy": "interleave", "k": 5,
                    "arms": [{"name": "x", "model": "m-b", "version": 1}, {"name": "y", "model": "m-c", "version": 1}]},
                   {"name": "gate", "policy": "thompson", "arms": [{"name": "g", "model": "m-a", "version": 1}],
                    "rollout": {"admission": {"samples": 10, "batch_samples": 3, "max_batch": 8,
                                              "busy_fraction": 1.0}}}],
    }


async def scraped(prometheus: Prometheus, selectors: list[str], timeout_s: float = 30.0) -> None:
    """Wait until Prometheus has scraped a series for every selector."""
    deadline = time.monotonic() + timeout_s
    while missing := [selector for selector in selectors if not prometheus.query(selector)]:
        assert time.monotonic() < deadline, f"never scraped: {missing}"
        await asyncio.sleep(0.5)


async def send_traffic(kafka: str, topics: Any, prometheus: Prometheus, waves: int = 3, pause_s: float = 1.5) -> None:
    """Requests (the last third drifted in one feature, a few malformed), then outcomes with labels
    and rewards for most predictions, duplicates, orphans and malformed outcomes, each in `waves`.
    The later waves go out only once Prometheus has scraped the counters the first one created, and
    `pause_s` (longer than the scrape interval) apart, so rate() sees every counter grow."""
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(360, N_FEATURES)).round(4)
    rows[240:, 0] += 4.0
    requests = [(f"r{i}".encode(), request_event(f"r{i}", "churn", row.tolist())) for i, row in enumerate(rows)]
    for wave in range(waves):
        extra = [(f"bad{wave}".encode(), request_event(f"bad{wave}", "churn", [0.0] * (N_FEATURES - 1))),
                 (b"junk", b"not json")]
        await produce(kafka, topics.requests, requests[wave::waves] + extra)
        if wave == 0:
            await scraped(prometheus, ['banditgate_requests_total{status="ok"}', 'banditgate_requests_total{status="error"}',
                                       "banditgate_end_to_end_seconds_count", "banditgate_inference_seconds_count"])
        await asyncio.sleep(pause_s)
    predictions = await read_topic(kafka, topics.predictions, len(rows), timeout_s=60, settle_s=0.3)
    assert len(predictions) >= len(rows), f"only {len(predictions)} predictions of {len(rows)}"
    now = time.time()
    outcomes: list[tuple[bytes, bytes]] = []
    for prediction in predictions[: int(len(predictions) * 0.75)]:  # the rest get the default reward
        probability = float(np.ravel(prediction["outputs"]["probability"])[0])
        label = int(rng.random() < probability)
        request_id = prediction["request_id"]
        outcomes.append((request_id.encode(), json.dumps({"request_id": request_id, "reward": float(label),
                                                          "label": label, "ts": now}).encode()))
    duplicates = outcomes[:waves]
    for wave in range(waves):
        extra = [duplicates[wave],
                 (f"lost{wave}".encode(), json.dumps({"request_id": f"lost{wave}", "reward": 1.0,
                                                      "ts": now - 3600}).encode()),  # older than join_ttl_s: orphan
                 (b"junk", b"{\"reward\": 1}")]
        await produce(kafka, topics.outcomes, outcomes[wave::waves] + extra)
        if wave == 0:
            await scraped(prometheus, ['banditgate_feedback_outcomes_total{result="joined"}',
                                       'banditgate_feedback_outcomes_total{result="orphan"}',
                                       "banditgate_feedback_dead_letters_total"])
        if wave < waves - 1:
            await asyncio.sleep(pause_s)


async def wait_for_assignment(gateway: Any, topic: str, timeout_s: float = 30.0) -> None:
    """Ready is not assigned: the consumer group's first rebalance takes a few seconds more."""
    deadline = time.monotonic() + timeout_s
    while f"{topic}[" not in gateway.log():
        assert time.monotonic() < deadline, f"no partitions of {topic} assigned:\n{gateway.log()[-2000:]}"
        await asyncio.sleep(0.2)


def has_value(result: list[dict[str, Any]]) -> bool:
    """Some series with a number (a histogram quantile over no observations is NaN: no data in Grafana)."""
    return any(math.isfinite(float(item["value"][1])) for item in result)


def unhealthy_rules(prometheus: Prometheus) -> list[str]:
    groups = prometheus.get("/api/v1/rules")["groups"]
    return [f"{rule['name']}: {rule.get('health')} {rule.get('lastError', '')}".strip()
            for group in groups for rule in group["rules"] if rule.get("health") != "ok"]


def label_mismatches(prometheus: Prometheus) -> list[str]:
    """Series whose label names differ from the catalogue's (job, instance and le aside)."""
    documented = catalogue()
    problems = set()
    for series in prometheus.get("/api/v1/series", **{"match[]": '{__name__=~"banditgate_.+"}'}):
        name = series["__name__"]
        metric = base_metric(name, set(documented))
        if metric is None:
            problems.add(f"{name}: not in docs/metrics.md")
            continue
        labels = set(series) - {"__name__", "job", "instance", "le"}
        if labels != documented[metric].labels:
            problems.add(f"{name}: labels {sorted(labels)}, documented {sorted(documented[metric].labels)}")
    return sorted(problems)


async def test_every_dashboard_query_returns_data(stack, topics, redis_prefix, unique, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("prometheus") is None:
        pytest.skip("the `prometheus` binary is not on PATH (Debian: apt-get install prometheus; .ci/run does)")
    repository = model_repository(tmp_path / "models")
    feedback_port, prometheus_port = free_port(), free_port()
    config = stack_config(stack, topics, repository, redis_prefix, unique, feedback_port)
    worker = WorkerProcess(write_config(tmp_path / "feedback.yaml", copy.deepcopy(config)),
                           tmp_path / "feedback.log").start()
    (tmp_path / "prometheus").mkdir()
    gateway = prometheus = None
    try:
        gateway = start_serve(config, tmp_path)
        jobs = {"banditgate-gateway": f"127.0.0.1:{gateway.http_port}", "banditgate-feedback": f"127.0.0.1:{feedback_port}"}
        prometheus = Prometheus(tmp_path / "prometheus", prometheus_port, jobs, [ALERTS])
        prometheus.wait_ready()
        prometheus.wait_for_targets(set(jobs))  # scraped before the traffic: rates see it arrive
        await wait_for_assignment(gateway, topics.topics.requests)
        await send_traffic(stack.kafka, topics.topics, prometheus)
        queries = panel_queries()
        pending = {query.where: query.promql() for query in queries}
        unhealthy = ["not evaluated yet"]
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and (pending or unhealthy):
            await asyncio.sleep(2)
            pending = {where: promql for where, promql in pending.items() if not has_value(prometheus.query(promql))}
            unhealthy = unhealthy_rules(prometheus)
        assert not pending, ("dashboard queries that never returned a value:\n"
                             + "\n".join(f"{where}: {promql}" for where, promql in pending.items())
                             + f"\n--- feedback log:\n{worker.output()[-2000:]}\n--- gateway log:\n{gateway.log()[-2000:]}")
        assert not unhealthy, "alert rules that do not evaluate:\n" + "\n".join(unhealthy)
        assert label_mismatches(prometheus) == []
        banner = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    finally:
        if prometheus is not None:
            prometheus.stop()
        if gateway is not None:
            assert gateway.stop() == 0, gateway.log()[-2000:]
        worker.stop(timeout_s=20)
        await delete_topics(stack.kafka, [f"obs-fb-{unique}-join-changelog"])
    messages = [line["message"] for line in banner if line.get("logger") == "banditgate.gateway"]
    assert "route churn: policy thompson, arms a=m-a:1, b=m-b:1, shadows c=m-c:1" in messages
    serving = next(m for m in messages if m.startswith("serving:"))
    for part in (f"kafka {stack.kafka}", "providers CPUExecutionProvider", f"http 127.0.0.1:{gateway.http_port}",
                 f"grpc 127.0.0.1:{gateway.grpc_port}", f"metrics http://127.0.0.1:{gateway.http_port}/metrics",
                 f"models {repository}"):
        assert part in serving, (part, serving)
