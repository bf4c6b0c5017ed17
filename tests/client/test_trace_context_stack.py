"""One W3C trace id ties request -> prediction -> outcome, on the real stack: the client's
`traceparent` (Kafka header or HTTP header) comes back on the prediction (reply and predictions
topics), a refused request's dead letter carries it, and the feedback worker keeps the
prediction's trace in its join entry: the dead letter it writes for that request's bad outcome
carries the prediction's trace id even though the outcome itself came with another one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from banditgate.client import GatewayRejected, HttpClient, KafkaClient
from banditgate.tracecontext import new_traceparent, parse_traceparent, trace_id_of
from tests.client.conftest import N_FEATURES
from tests.feedback.worker_helpers import WorkerProcess, write_config
from tests.kafka_helpers import read_records

pytestmark = pytest.mark.stack

ROW = [0.5] * N_FEATURES


def trace_of(record: Any) -> str | None:
    found = [value for name, value in record.headers or () if name == "traceparent"]
    return trace_id_of(parse_traceparent(found[0]) or "") if found else None


def by_id(records: list[Any]) -> dict[str, Any]:
    return {orjson.loads(r.value)["request_id"]: r for r in records}


async def test_one_trace_id_ties_request_prediction_and_outcome(stack, topics, reply_topic, gateway, redis_prefix,
                                                                tmp_path: Path) -> None:
    t = topics.topics
    config = write_config(tmp_path / "feedback.yaml", kafka=stack.kafka, redis=stack.redis,
                          topics=t.model_dump(), redis_prefix=redis_prefix, app_id=f"fb-{topics.prefix}",
                          routes=[{"name": "churn", "policy": "thompson",
                                   "arms": [{"name": "a", "model": "m-a", "version": 1},
                                            {"name": "b", "model": "m-b", "version": 1}]}])
    worker = WorkerProcess(config, tmp_path / "feedback.log").start()
    try:
        await worker.wait_ready()
        parent = new_traceparent()
        trace = trace_id_of(parent)
        async with KafkaClient(stack.kafka, reply_topic=reply_topic, requests_topic=t.requests,
                               outcomes_topic=t.outcomes, deadletter_topic=t.deadletter) as client:
            answer = await client.predict("churn", {"input": ROW}, request_id="traced", traceparent=parent,
                                          tracestate="vendor=1", timeout_s=30)
            plain = await client.predict("churn", {"input": ROW}, request_id="fresh", timeout_s=30)
            bad = await client.predict("churn", {"input": ROW}, request_id="spoofed",
                                       traceparent="00-" + "A" * 32 + "-" + "b" * 16 + "-01", timeout_s=30)
            with pytest.raises(GatewayRejected):
                await client.predict("churn", {"input": [0.5, 0.5]}, request_id="refused", traceparent=parent,
                                     timeout_s=30)
            # the outcome starts a trace of its own (no traceparent given): the worker must still
            # tie what it emits for this request to the prediction's trace
            await client.report_outcome("traced", reward=7.0)
        assert answer.traceparent is not None and trace_id_of(answer.traceparent) == trace  # on the reply topic
        assert plain.traceparent is not None and trace_id_of(plain.traceparent) != trace  # a fresh one was made
        assert bad.traceparent is not None and "A" * 32 not in bad.traceparent  # an invalid one is ignored
        async with HttpClient(gateway.base_url, check_inputs=False) as http:
            over_http = await http.predict("churn", {"input": ROW}, request_id="http", traceparent=parent)
        assert over_http.traceparent == parent

        predictions = by_id(await read_records(stack.kafka, t.predictions,
                                               lambda rs: {"traced", "fresh", "spoofed", "http"} <= set(by_id(rs))))
        assert trace_of(predictions["traced"]) == trace
        assert dict(predictions["traced"].headers)["tracestate"] == b"vendor=1"
        assert trace_of(predictions["http"]) == trace  # the sidecar's publication carries the HTTP header
        assert trace_of(predictions["fresh"]) not in (None, trace)

        def letters(rs: list[Any]) -> dict[str, Any]:
            return {(r.key or b"").decode(): r for r in rs}

        dead = letters(await read_records(stack.kafka, t.deadletter, lambda rs: {"refused", "traced"} <= set(letters(rs))))
        assert trace_of(dead["refused"]) == trace  # the gateway's dead letter
        assert orjson.loads(dead["traced"].value)["reason"] == "out_of_range"
        assert trace_of(dead["traced"]) == trace  # the worker's, from the prediction kept in the join
    finally:
        worker.stop()
