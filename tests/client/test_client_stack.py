"""banditgate.client against the real stack and a real `banditgate serve`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from banditgate.client import GatewayRejected, HttpClient, InvalidRequest, KafkaClient, PredictionTimeout
from banditgate.events import json_schemas
from tests.client.conftest import N_FEATURES
from tests.kafka_helpers import read_topic
from tests.processes import start_serve

pytestmark = pytest.mark.stack

ROW = [0.5] * N_FEATURES


def _client(stack, topics, reply_topic: str | None) -> KafkaClient:  # type: ignore[no-untyped-def]
    t = topics.topics
    return KafkaClient(stack.kafka, reply_topic=reply_topic, requests_topic=t.requests, outcomes_topic=t.outcomes,
                       deadletter_topic=t.deadletter)


def test_the_client_imports_no_server_code() -> None:
    code = ("import sys, banditgate.client; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gateway', 'feedback', 'faust', 'onnxruntime', 'starlette', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout  # noqa: S603 - fixed argv
    assert out == "[]\n"


async def test_predict_by_request_reply_and_every_event_validates(stack, topics, reply_topic, gateway) -> None:
    async with _client(stack, topics, reply_topic) as client:
        answers = await asyncio.gather(*(client.predict("churn", {"input": ROW}, request_id=f"r{i}", timeout_s=30)
                                         for i in range(20)))
        assert [a.request_id for a in answers] == [f"r{i}" for i in range(20)]
        for a in answers:
            assert a.arm in ("a", "b") and a.model in ("m-a", "m-b") and 0 < a.propensity <= 1
            assert isinstance(a.outputs["probability"], np.ndarray) and a.event["schema_version"] == 1
        await client.report_outcome("r0", reward=1.0)
    schemas = json_schemas()
    predictions = await read_topic(stack.kafka, topics.topics.predictions, 20, timeout_s=30)
    assert {p["request_id"] for p in predictions} == {f"r{i}" for i in range(20)}  # the feedback join needs them
    for p in predictions:
        jsonschema.validate(p, schemas["prediction"])
    assert {a.request_id: a.event for a in answers} == {p["request_id"]: p for p in predictions}  # the same event
    outcomes = await read_topic(stack.kafka, topics.topics.outcomes, 1, timeout_s=30)
    jsonschema.validate(outcomes[0], schemas["outcome"])


async def test_a_dead_lettered_request_raises_the_gateways_reason(stack, topics, reply_topic, gateway) -> None:
    async with _client(stack, topics, reply_topic) as client:
        with pytest.raises(GatewayRejected) as caught:
            await client.predict("churn", {"input": [0.5, 0.5]}, timeout_s=30)  # wrong shape: the gateway's check
        assert caught.value.reason == "bad_input"
        with pytest.raises(InvalidRequest) as invalid:
            await client.predict("churn", {"input": [float("nan")] * N_FEATURES})
        assert invalid.value.reason == "not_finite"
    letters = await read_topic(stack.kafka, topics.topics.deadletter, 1, timeout_s=30)
    jsonschema.validate(letters[0], json_schemas()["dead-letter"])


async def test_a_reply_topic_the_gateway_does_not_allow_is_refused(stack, topics, gateway) -> None:
    from tests.conftest import create_topics

    other = f"{topics.prefix}.elsewhere"
    await create_topics(stack.kafka, [other], partitions=1)
    async with _client(stack, topics, other) as client:
        with pytest.raises(GatewayRejected) as caught:
            await client.predict("churn", {"input": ROW}, timeout_s=30)
    assert caught.value.reason == "reply_refused"


async def test_timeout_and_a_gateway_started_while_the_request_waits(stack, topics, reply_topic, config,
                                                                     tmp_path: Path) -> None:
    async with _client(stack, topics, reply_topic) as client:
        with pytest.raises(PredictionTimeout):
            await client.predict("churn", {"input": ROW}, request_id="early", timeout_s=1.0)  # no gateway yet
        waiting = asyncio.ensure_future(client.predict("churn", {"input": ROW}, request_id="late", timeout_s=90))
        await asyncio.sleep(0.5)
        serve = await asyncio.to_thread(start_serve, config, tmp_path)  # served from the committed offsets
        try:
            answer = await waiting
            assert answer.request_id == "late"
        finally:
            serve.stop()


async def test_predict_and_outcomes_over_http(stack, topics, gateway) -> None:
    async with HttpClient(gateway.base_url) as client:
        answer = await client.predict("churn", {"input": np.full(N_FEATURES, 0.5, dtype=np.float32)},
                                      request_id="h1")
        assert answer.arm in ("a", "b") and answer.outputs["probability"].shape == (1,)
        with pytest.raises(InvalidRequest) as caught:
            await client.predict("churn", {"input": [0.5, 0.5]})
        assert caught.value.reason == "bad_input"
        with pytest.raises(GatewayRejected) as rejected:
            await client.predict("nope", {"input": ROW})
        assert rejected.value.reason == "unknown_route"
        await client.report_outcome("h1", reward=1.0)
        schemas = json.loads(await asyncio.to_thread(_get, gateway.base_url + "/v2/schemas"))["schemas"]
        assert schemas == json_schemas()


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        return response.read()
