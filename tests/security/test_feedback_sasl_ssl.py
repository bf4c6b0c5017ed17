"""The feedback worker (faust) over the same secured servers as the gateway: its broker credentials
(SCRAM over TLS with a client certificate) and its Redis writes (TLS, ACL user on `bg:*`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import yaml

from banditgate.config import parse_config
from banditgate.connections import kafka_client_kwargs, redis_client
from router.stats_store import ArmStatsStore
from tests.security.conftest import (
    KAFKA_PASSWORD,
    REDIS_PASSWORD,
    REPO,
    gateway_data,
    kafka_security,
    produce_values,
    redis_section,
)

pytestmark = pytest.mark.stack


async def test_sasl_ssl_feedback_worker_updates_tls_acl_redis(secure_kafka, secure_redis, secure_topics, pki,  # type: ignore[no-untyped-def]
                                                             tmp_path: Path) -> None:
    pytest.importorskip("feedback.app")
    route = f"fb{uuid.uuid4().hex[:6]}"
    data = gateway_data(secure_kafka.sasl_ssl, secure_topics, tmp_path / "models", redis_section(secure_redis, pki),
                        kafka_security(pki, mechanism="SCRAM-SHA-256", cert_file=str(pki.client_cert),
                                       key_file=str(pki.client_key)))
    data["routes"][0]["name"] = route
    data["feedback"] = {"app_id": f"fb-sec-{uuid.uuid4().hex[:6]}", "web_port": 0, "flush_interval_s": 0.05,
                        "partitions": 2, "quality_window_s": 60}
    data["logging"] = {"level": "info"}
    config_path = tmp_path / "feedback.yaml"
    config_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "BANDITGATE_KAFKA_PASSWORD": KAFKA_PASSWORD, "BANDITGATE_REDIS_PASSWORD": REDIS_PASSWORD}
    log_path = tmp_path / "feedback.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "banditgate.cli", "feedback", "-c", str(config_path)],  # noqa: S603
                                  cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    config = parse_config(data, env={"BANDITGATE_KAFKA_PASSWORD": KAFKA_PASSWORD,
                                     "BANDITGATE_REDIS_PASSWORD": REDIS_PASSWORD})
    client = redis_client(config.redis)
    try:
        now = time.time()
        predictions = [(f"fq-{i}".encode(), orjson.dumps({
            "request_id": f"fq-{i}", "route": route, "arm": "a", "model": "m-a", "model_version": 1,
            "policy": "thompson", "propensity": 0.5, "outputs": {"probability": [0.7]}, "ts_request": now - 0.01,
            "ts_predicted": now, "latency_ms": 2.0})) for i in range(12)]
        outcomes = [(f"fq-{i}".encode(), orjson.dumps({"request_id": f"fq-{i}", "reward": float(i % 2), "ts": now}))
                    for i in range(12)]
        kafka = kafka_client_kwargs(config.kafka)
        await produce_values(kafka, secure_topics.predictions, predictions)
        await produce_values(kafka, secure_topics.outcomes, outcomes)
        store = ArmStatsStore(client, prefix="bg")
        deadline = time.monotonic() + 90
        weight = 0.0
        while time.monotonic() < deadline and weight < 12:
            assert worker.poll() is None, log_path.read_text(errors="replace")[-4000:]
            weight = (await store.snapshot(route)).arm("a").stats.weight
            await asyncio.sleep(0.5)
        assert weight == pytest.approx(12), log_path.read_text(errors="replace")[-4000:]
    finally:
        await client.aclose()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    output = log_path.read_text(errors="replace")
    assert KAFKA_PASSWORD not in output and REDIS_PASSWORD not in output
