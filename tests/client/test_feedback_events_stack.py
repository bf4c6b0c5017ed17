"""Every event the feedback worker emits validates against the published schemas (issue 22; the
gateway's own events are checked in test_client_stack.py): a real `banditgate feedback` worker on
the real stack is driven to write each kind it writes - a promote alert (a shadow that beats its
primary on labels), dead letters of every reader (an outcome out of range, an outcome and a
prediction of an unknown schema version, an outcome that is not JSON, one without a
request_id), and a routing change (`banditgate rollout start`, which
publishes on the worker's own path, feedback.sinks.KafkaOut) - and every record on the alerts,
routing-changes and dead-letter topics is checked against its schema."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from banditgate.events import json_schemas
from tests.feedback.test_worker_stack import send
from tests.feedback.worker_helpers import ROUTES, WorkerProcess, outcome, prediction, wait_until, write_config
from tests.kafka_helpers import read_records

pytestmark = pytest.mark.stack

ROLLOUT_ROUTE = {"name": "roll", "policy": "thompson", "guardrail": {"enabled": False},
                 "arms": [{"name": "a", "model": "m", "version": 1}],
                 "rollout": {"shadow": {"min_outcomes": 60, "confidence": 0.9},
                             "canary": {"max_share": 0.5, "min_share": 0.3, "min_outcomes": 30, "min_calls": 30,
                                        "confidence": 0.9, "margin": 0.05, "max_error_rate": 0.5,
                                        "max_p99_latency_ms": 250}, "grace_s": 2}}


def _messages(now: float) -> list[tuple[str, bytes, bytes]]:
    rng = random.Random(9)  # noqa: S311 - test data, not secrets
    messages = []
    for i in range(400):  # shadow c is right where primary a is wrong: one promote alert
        request_id = f"q-{i}"
        label = rng.randint(0, 1)
        wrong, right = (0.9 if label == 0 else 0.1), (0.1 if label == 0 else 0.9)
        messages.append(("predictions", request_id.encode(), prediction(request_id, "churn", "a", "churn-gbm", 3,
                                                                        wrong, now)))
        messages.append(("shadow_predictions", request_id.encode(),
                         prediction(request_id, "churn", "c", "churn-gbm", 4, right, now, shadow_of="a")))
        messages.append(("outcomes", request_id.encode(), outcome(request_id, now + 1, reward=0.0, label=label)))
    rng.shuffle(messages)
    future = orjson.loads(prediction("v-1", "churn", "a", "churn-gbm", 3, 0.5, now))
    messages += [
        ("predictions", b"bad-1", prediction("bad-1", "churn", "a", "churn-gbm", 3, 0.5, now)),
        ("outcomes", b"bad-1", outcome("bad-1", now + 1, reward=7.0)),  # out_of_range
        ("outcomes", b"v-2", orjson.dumps({"request_id": "v-2", "reward": 1.0, "schema_version": 99})),
        ("predictions", b"v-1", orjson.dumps({**future, "schema_version": 99})),
        ("outcomes", b"junk", b"{not json"),
        ("outcomes", b"nokey", orjson.dumps({"reward": 1.0})),
    ]
    return messages


async def test_every_event_the_feedback_worker_emits_validates(stack, topics, redis_prefix, unique,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    t = topics.topics
    config = write_config(tmp_path / "feedback.yaml", kafka=stack.kafka, redis=stack.redis, topics=t.model_dump(),
                          redis_prefix=redis_prefix, app_id=f"fb-{unique}", routes=[*ROUTES, ROLLOUT_ROUTE])
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        await worker.wait_ready()
        await send(stack.kafka, topics, _messages(time.time()))
        argv = [sys.executable, "-m", "banditgate.cli", "rollout", "start", "roll", "--version", "2", "-c", str(config),
                "--who", "test"]
        started = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False)
        assert started.returncode == 0, started.stderr[-2000:]

        def values(records: list[Any]) -> list[Any]:
            return [orjson.loads(r.value) for r in records]

        alerts = await read_records(stack.kafka, t.alerts,
                                    lambda rs: "promote" in {a.get("kind") for a in values(rs)})
        changes = await read_records(stack.kafka, t.routing_changes, lambda rs: len(rs) >= 1)
        letters = await read_records(stack.kafka, t.deadletter, lambda rs: len(rs) >= 5)
        await wait_until(lambda: _alive(worker), 5, "the worker still running", worker)
    finally:
        worker.stop(timeout_s=20)
    schemas = json_schemas()
    kinds = {a["kind"] for a in values(alerts)}
    assert "promote" in kinds, kinds
    assert changes and letters
    for schema, records in (("alert", alerts), ("routing-change", changes), ("dead-letter", letters)):
        for value in values(records):
            jsonschema.validate(value, schemas[schema])
    reasons = {letter["reason"] for letter in values(letters)}
    assert {"out_of_range", "unknown_version", "not_json", "missing_field"} <= reasons, reasons


async def _alive(worker: WorkerProcess) -> bool:
    return worker.process is not None and worker.process.poll() is None
