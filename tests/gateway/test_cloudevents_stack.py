"""CloudEvents binary-mode headers (banditgate.cloudevents) on every event banditgate produces:
each output topic is read back from the real Kafka and every record's headers are checked
(``ce_specversion`` 1.0, ``ce_id``, ``ce_type`` from banditgate.events, ``ce_source``, an RFC 3339
``ce_time``). The gateway runs in-process on the real stack (Kafka path: predictions, shadow
predictions, replies, dead letters; sidecar: predictions, alerts, posted outcomes; the client:
requests); the feedback worker's output path (KafkaOut: dead letters, alerts; the lifecycle
driver: routing changes) sends through a real producer. Consumers do not require the headers:
the client's and the worker's readers are fed records with and without them elsewhere
(tests/client, tests/feedback), and the request the gateway reads here carries them."""

from __future__ import annotations

import asyncio
from datetime import datetime

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from banditgate.client import KafkaClient
from banditgate.cloudevents import attributes
from banditgate.events import Alert, RoutingChange
from feedback.lifecycle import LifecycleDriver
from feedback.sinks import KafkaOut
from tests.conftest import create_topics
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import read_records

pytestmark = pytest.mark.stack

ROW = [0.5] * N_FEATURES


def check(records: list, ce_type: str, source: str) -> list[dict[str, str]]:  # type: ignore[type-arg]
    """Every record carries the five attributes, with `ce_type` and `source`; ids are unique."""
    assert records
    found = [attributes(record.headers) for record in records]
    for ce in found:
        assert {"specversion", "id", "type", "source", "time"} <= set(ce), ce
        assert ce["specversion"] == "1.0" and ce["type"] == ce_type and ce["source"] == source, ce
        assert ce["id"] and ce["time"].endswith("Z")
        assert datetime.fromisoformat(ce["time"]).tzinfo is not None  # RFC 3339, UTC
    assert len({ce["id"] for ce in found}) == len(found)
    return found


async def test_every_output_topic_carries_cloudevents_headers(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    t = topics.topics
    reply_topic = f"{topics.prefix}.replies.svc"
    await create_topics(stack.kafka, [reply_topic], partitions=2)
    config = gateway_config(stack, topics, repository, redis_prefix,
                            kafka={"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                                   "topics": t.model_dump(), "reply_topics": [f"{topics.prefix}.replies.*"]})
    running = await start_gateway(config)
    try:
        async with KafkaClient(stack.kafka, reply_topic=reply_topic, requests_topic=t.requests,
                               outcomes_topic=t.outcomes, deadletter_topic=t.deadletter) as client:
            answer = await client.predict("fixed-route", {"input": ROW}, request_id="k-1", timeout_s=30)
            await client.send("fixed-route", {"input": ROW}, request_id="k-2")
            # their predictions' natural ids are those of "k-1"'s shadow on arm c (the id it had
            # before the event name went in front, and its natural id now): source + id must
            # still be unique
            await client.send("fixed-route", {"input": ROW}, request_id="k-1/c")
            await client.send("fixed-route", {"input": ROW}, request_id="c:k-1")
            await client.send("fixed-route", {"input": [0.5, 0.5]}, request_id="k-bad")  # wrong shape: dead letter
            await client.flush()
        assert answer.request_id == "k-1"
        gateway = running.gateway
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30) as http:
            response = await http.post("/v2/models/bandit-route/infer", json={
                "id": "h-1", "inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": ROW}]})
            assert response.status_code == 200, response.text
            response = await http.post("/v2/outcomes", json=[{"request_id": "k-1", "reward": 1.0},
                                                             {"request_id": "h-1", "reward": 0.0}])
            assert response.status_code == 200, response.text
        gateway._publish_alert(Alert(kind="drift", route="fixed-route", arm="a", model_version=1, metric="psi",
                                     value=0.4, threshold=0.2, ts=1.0).to_dict())
        predictions = await read_records(stack.kafka, t.predictions,
                                         lambda rs: {b"k-1", b"k-2", b"k-1/c", b"c:k-1", b"h-1"} <= {r.key for r in rs})
        shadows = await read_records(stack.kafka, t.shadow_predictions, lambda rs: len(rs) >= 4)
        replies = await read_records(stack.kafka, reply_topic, lambda rs: len(rs) >= 1)
        dead = await read_records(stack.kafka, t.deadletter, lambda rs: len(rs) >= 1)
        outcomes = await read_records(stack.kafka, t.outcomes, lambda rs: len(rs) >= 2)
        requests = await read_records(stack.kafka, t.requests,
                                      lambda rs: {b"k-1", b"k-2", b"k-bad"} <= {r.key for r in rs})
        alerts = await read_records(stack.kafka, t.alerts, lambda rs: len(rs) >= 1)
    finally:
        assert await running.stop() == 0

    kafka_path = [r for r in predictions if r.key in (b"k-1", b"k-2", b"k-1/c", b"c:k-1")]
    ids = check(kafka_path, "io.banditgate.prediction.v1", "/banditgate/gateway/fixed-route")
    # prediction:<request_id>: stable across a replay
    assert sorted(ce["id"] for ce in ids) == ["prediction:c:k-1", "prediction:k-1", "prediction:k-1/c",
                                                 "prediction:k-2"]
    check([r for r in predictions if r.key == b"h-1"], "io.banditgate.prediction.v1", "/banditgate/gateway/bandit-route")
    shadow_ids = check(shadows, "io.banditgate.shadow-prediction.v1", "/banditgate/gateway/fixed-route")
    assert {ce["id"] for ce in shadow_ids} == {"shadow-prediction:c:k-1", "shadow-prediction:c:k-2",
                                              "shadow-prediction:c:c:k-1", "shadow-prediction:c:k-1/c"}
    # one source, several event types about the same requests: source + id unique among all of them
    same_source = ids + shadow_ids
    assert len({(ce["source"], ce["id"]) for ce in same_source}) == len(same_source)
    # the reply is the same event as the prediction: the same attributes
    assert check(replies, "io.banditgate.prediction.v1", "/banditgate/gateway/fixed-route") == [
        ce for ce, r in zip(ids, kafka_path) if r.key == b"k-1"]
    letter = check(dead, "io.banditgate.dead-letter.v1", "/banditgate/gateway/fixed-route")[0]
    bad = next(r for r in requests if r.key == b"k-bad")
    assert letter["id"] == f"dead-letter:{bad.topic}/{bad.partition}/{bad.offset}"  # the input's position: stable on a replay
    check(outcomes, "io.banditgate.outcome.v1", "/banditgate/gateway")
    assert sorted(ce["id"] for ce in check([r for r in requests if r.key in (b"k-1", b"k-2")],
                                           "io.banditgate.request.v1", "/banditgate/client/fixed-route")) == [
        "request:k-1", "request:k-2"]
    check(alerts, "io.banditgate.alert.v1", "/banditgate/gateway/fixed-route")


async def test_the_feedback_workers_outputs_carry_cloudevents_headers(stack, topics) -> None:  # type: ignore[no-untyped-def]
    from banditgate.config import parse_config

    t = topics.topics
    config = parse_config({"kafka": {"bootstrap_servers": stack.kafka, "topics": t.model_dump()},
                           "routes": [{"name": "r", "arms": [{"name": "a", "model": "m"}]}]}, env={})
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        out = KafkaOut(producer, t.deadletter, t.alerts)
        letter = out.dead_letter(b"req-1", "outcome names no known request", "orphan", t.outcomes, 0, 7, b"{}",
                                 [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")])
        alert = Alert(kind="quality", route="r", arm="a", model_version=1, metric="accuracy", value=0.5,
                      threshold=0.7, ts=2.0)
        await out.send_all([letter, out.alert(alert)])
        change = RoutingChange(seq=3, route="r", model="m", version=2, arm="cand", from_stage="shadow",
                               to_stage="canary", actor="rule:shadow", reason="won", before={}, after={}, ts=3.0,
                               from_seq=2)
        redis = Redis.from_url(stack.redis)
        try:
            driver = LifecycleDriver(config, redis, out)
            await asyncio.wait_for(driver.send_queued([{"topic": "routing_changes", "value": change.to_dict()}]), 30)
        finally:
            await redis.aclose()
    finally:
        await producer.stop()
    dead = await read_records(stack.kafka, t.deadletter, lambda rs: len(rs) >= 1)
    alerts = await read_records(stack.kafka, t.alerts, lambda rs: len(rs) >= 1)
    changes = await read_records(stack.kafka, t.routing_changes, lambda rs: len(rs) >= 1)
    check(dead, "io.banditgate.dead-letter.v1", "/banditgate/feedback")
    assert dead[0].headers[0] == ("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")  # still carried first
    check(alerts, "io.banditgate.alert.v1", "/banditgate/feedback/r")
    assert check(changes, "io.banditgate.routing-change.v1", "/banditgate/feedback/r")[0]["id"] == "routing-change:r/3"


async def test_kafka_cloudevents_false_leaves_only_the_trace_context(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    """``kafka.cloudevents: false``: the gateway (Kafka path and sidecar), the client
    (``cloudevents=False``) and the feedback worker's outputs put no ``ce_`` header on anything;
    the trace context still goes with every record that had one."""
    from banditgate.config import parse_config

    t = topics.topics
    reply_topic = f"{topics.prefix}.replies.svc"
    await create_topics(stack.kafka, [reply_topic], partitions=2)
    config = gateway_config(stack, topics, repository, redis_prefix,
                            kafka={"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                                   "topics": t.model_dump(), "reply_topics": [f"{topics.prefix}.replies.*"],
                                   "cloudevents": False})
    assert config.kafka.cloudevents is False
    running = await start_gateway(config)
    try:
        async with KafkaClient(stack.kafka, reply_topic=reply_topic, requests_topic=t.requests,
                               outcomes_topic=t.outcomes, deadletter_topic=t.deadletter, cloudevents=False) as client:
            await client.predict("fixed-route", {"input": ROW}, request_id="o-1", timeout_s=30)
            await client.send("fixed-route", {"input": [0.5, 0.5]}, request_id="o-bad")  # dead letter
            await client.flush()
            await client.report_outcome("o-1", reward=1.0)
        gateway = running.gateway
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30) as http:
            response = await http.post("/v2/models/bandit-route/infer", json={
                "id": "h-1", "inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": ROW}]})
            assert response.status_code == 200, response.text
            response = await http.post("/v2/outcomes", json=[{"request_id": "h-1", "reward": 0.0}])
            assert response.status_code == 200, response.text
        gateway._publish_alert(Alert(kind="drift", route="fixed-route", arm="a", model_version=1, metric="psi",
                                     value=0.4, threshold=0.2, ts=1.0).to_dict())
        records = {
            "predictions": await read_records(stack.kafka, t.predictions, lambda rs: len(rs) >= 2),
            "shadows": await read_records(stack.kafka, t.shadow_predictions, lambda rs: len(rs) >= 1),
            "replies": await read_records(stack.kafka, reply_topic, lambda rs: len(rs) >= 1),
            "dead": await read_records(stack.kafka, t.deadletter, lambda rs: len(rs) >= 1),
            "outcomes": await read_records(stack.kafka, t.outcomes, lambda rs: len(rs) >= 2),
            "requests": await read_records(stack.kafka, t.requests, lambda rs: len(rs) >= 2),
            "alerts": await read_records(stack.kafka, t.alerts, lambda rs: len(rs) >= 1),
        }
    finally:
        assert await running.stop() == 0
    for name, found in records.items():
        assert found, name
        for record in found:
            assert not attributes(record.headers), (name, record.headers)
    # the trace context is still there (the client makes one for every request; the gateway carries it on)
    assert all(dict(r.headers).get("traceparent") for r in records["requests"] + records["replies"])

    worker_config = parse_config({"kafka": {"bootstrap_servers": stack.kafka, "topics": t.model_dump(),
                                            "cloudevents": False},
                                  "routes": [{"name": "r", "arms": [{"name": "a", "model": "m"}]}]}, env={})
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        out = KafkaOut(producer, t.deadletter, t.alerts, cloudevents=False)
        await out.send_all([out.dead_letter(b"req-9", "orphan", "orphan", t.outcomes, 0, 9, b"{}"),
                            out.alert(Alert(kind="quality", route="r", arm="a", model_version=1, metric="accuracy",
                                            value=0.5, threshold=0.7, ts=2.0))])
        change = RoutingChange(seq=4, route="r", model="m", version=2, arm="cand", from_stage="shadow",
                               to_stage="canary", actor="rule:shadow", reason="won", before={}, after={}, ts=3.0,
                               from_seq=3)
        redis = Redis.from_url(stack.redis)
        try:
            driver = LifecycleDriver(worker_config, redis, out)
            await asyncio.wait_for(driver.send_queued([{"topic": "routing_changes", "value": change.to_dict()}]), 30)
        finally:
            await redis.aclose()
    finally:
        await producer.stop()
    dead = await read_records(stack.kafka, t.deadletter, lambda rs: any(r.key == b"req-9" for r in rs))
    alerts = await read_records(stack.kafka, t.alerts, lambda rs: len(rs) >= 2)
    changes = await read_records(stack.kafka, t.routing_changes, lambda rs: len(rs) >= 1)
    for record in [*dead, *alerts, *changes]:
        assert not attributes(record.headers), record.headers
