"""OpenTelemetry spans (banditgate.tracing) with the SDK's in-memory exporter: one trace covers
request -> prediction -> outcome, with the stages of each process as spans in it (consume ->
decide -> queue -> infer -> produce in the gateway, join -> apply in the feedback worker). The
client's request goes through a real in-process gateway on the real Kafka; the prediction and
outcome records it leads to (read back from Kafka, headers and all) go through the feedback
worker's join (its Redis and changelog are the fakes of tests/feedback/test_join_budget_processor.py:
what is checked here is the spans, not the effects). The REST and gRPC sidecars' server spans are
children of the caller's traceparent (header / metadata)."""

from __future__ import annotations

import asyncio
import urllib.request

import numpy as np
import orjson
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

import grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from banditgate.client import KafkaClient
from banditgate.config import TracingConfig
from banditgate.tracecontext import new_traceparent, parse_traceparent, span_id_of, trace_id_of
from banditgate.tracing import Tracing
from feedback.agents import JoinProcessor
from feedback.join import JoinRules, RouteRules
from feedback.metrics import FeedbackMetrics
from feedback.state import JoinBudget, JoinTable
from gateway.app import Gateway
from tests.feedback.test_join_budget_processor import Changelog, Ledger, Out
from tests.gateway.support import N_FEATURES, RunningGateway, gateway_config
from tests.kafka_helpers import read_records

pytestmark = pytest.mark.stack

ROW = [0.5] * N_FEATURES
GATEWAY_STAGES = ["gateway.consume", "gateway.decide", "gateway.queue", "gateway.infer", "gateway.produce"]


async def traced_gateway(config, exporter: InMemorySpanExporter) -> RunningGateway:  # type: ignore[no-untyped-def]
    gateway = Gateway(config, registry=CollectorRegistry(),
                      tracing=Tracing.from_config(TracingConfig(enabled=True, sample_ratio=1.0), "banditgate-gateway",
                                                  exporter=exporter))
    await gateway.start()
    return RunningGateway(gateway, asyncio.get_running_loop().create_task(gateway.run()))


def children(spans, parent) -> list:  # type: ignore[no-untyped-def]
    """The spans whose parent is `parent`, by start time."""
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
                  key=lambda s: s.start_time)


def header(record, name: str) -> str | None:  # type: ignore[no-untyped-def]
    found = [value for key, value in record.headers or () if key == name]
    return found[0].decode() if found else None


async def test_one_trace_covers_request_prediction_and_outcome(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    # one exporter per process: the gateway's stop shuts its tracer provider down, and its exporter with it
    exporter, worker_exporter = InMemorySpanExporter(), InMemorySpanExporter()
    on = TracingConfig(enabled=True, sample_ratio=1.0)
    t = topics.topics
    running = await traced_gateway(gateway_config(stack, topics, repository, redis_prefix), exporter)
    parent = new_traceparent()
    try:
        async with KafkaClient(stack.kafka, requests_topic=t.requests, outcomes_topic=t.outcomes,
                               deadletter_topic=t.deadletter) as client:
            await client.send("bandit-route", {"input": ROW}, request_id="traced", traceparent=parent)
            await client.send("bandit-route", {"input": ROW}, request_id="other", traceparent=new_traceparent())
            await client.flush()
            predictions = await read_records(stack.kafka, t.predictions, lambda rs: len(rs) >= 2)
            prediction = next(r for r in predictions if r.key == b"traced")
            carried = parse_traceparent(header(prediction, "traceparent"))
            assert carried is not None and trace_id_of(carried) == trace_id_of(parent)
            # the client continues the prediction's trace with the outcome; "other"'s outcome starts its own
            await client.report_outcome("traced", reward=1.0, traceparent=carried)
            await client.report_outcome("other", reward=0.0)
        outcomes = await read_records(stack.kafka, t.outcomes, lambda rs: len(rs) >= 2)
    finally:
        await running.stop()
    # the gateway's stop shut its tracer provider down (the last spans exported), once its Kafka work was done
    assert exporter._stopped  # noqa: SLF001 - InMemorySpanExporter says so only there

    rules = JoinRules(ttl_s=3600.0, routes={"bandit-route": RouteRules()})
    table = JoinTable({}, Changelog(), "changelog", rules, budget=JoinBudget(partitions=16))
    table.sync_partitions(range(16))
    processor = JoinProcessor(table=table, redis=Ledger(), out=Out(), rules=rules, topics=t,  # type: ignore[arg-type]
                              metrics=FeedbackMetrics(CollectorRegistry()),
                              tracing=Tracing.from_config(on, "banditgate-feedback", exporter=worker_exporter))
    await (await processor.submit(predictions))
    await (await processor.submit(outcomes))

    spans = [*exporter.get_finished_spans(), *worker_exporter.get_finished_spans()]
    trace = int(trace_id_of(parent), 16)
    in_trace = [s for s in spans if s.context.trace_id == trace]
    named = {s.name: s for s in in_trace if s.name in ("gateway.request", "feedback.prediction", "feedback.outcome")}
    assert set(named) == {"gateway.request", "feedback.prediction", "feedback.outcome"}, sorted(s.name for s in in_trace)
    request, predicted, outcome = named["gateway.request"], named["feedback.prediction"], named["feedback.outcome"]
    assert request.parent is not None and request.parent.span_id == int(span_id_of(parent), 16)  # the client's
    assert span_id_of(carried) == f"{request.context.span_id:016x}"  # the prediction names the request's span
    assert predicted.parent is not None and predicted.parent.span_id == request.context.span_id
    assert outcome.parent is not None and outcome.parent.span_id == request.context.span_id
    assert {s.resource.attributes["service.name"] for s in in_trace} == {"banditgate-gateway", "banditgate-feedback"}
    # the request's stages, in the request's trace, in order, within its span; the arm that answered
    stages = [s for s in children(spans, request) if s.name.startswith("gateway.")]
    assert [s.name for s in stages] == GATEWAY_STAGES
    assert all(request.start_time <= s.start_time <= s.end_time <= request.end_time for s in stages)
    assert stages[3].attributes["banditgate.arm"] == request.attributes["banditgate.arm"]
    assert stages[3].attributes["banditgate.route"] == "bandit-route"
    # the worker's join and apply, in the same trace, under the prediction and under the outcome
    for event in (predicted, outcome):
        assert [s.name for s in children(spans, event)] == ["feedback.join", "feedback.apply"]
    # the batch spans: one trace per batch with the same stages, and the request linked to it
    batch = next(s for s in spans if s.name == "gateway.batch" and s.context.span_id in
                 {link.context.span_id for link in request.links})
    assert {s.name for s in children(spans, batch)} == set(GATEWAY_STAGES)
    worker_batch = next(s for s in spans if s.name == "feedback.batch" and s.context.span_id in
                        {link.context.span_id for link in outcome.links})
    assert [s.name for s in children(spans, worker_batch)] == ["feedback.join", "feedback.apply"]
    # an outcome in a trace of its own still links to its prediction, kept in the join entry
    other = next(s for s in spans if s.name == "feedback.outcome" and s.context.trace_id != trace)
    other_request = next(s for s in spans if s.name == "gateway.request" and s.attributes["banditgate.request_id"]
                         == "other")
    assert other_request.context.span_id in {link.context.span_id for link in other.links}


async def test_sidecar_requests_get_server_spans_under_the_callers_traceparent(stack, topics, repository,  # type: ignore[no-untyped-def]
                                                                               redis_prefix) -> None:
    from banditgate.proto import grpc_predict_v2_pb2 as pb2
    from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc

    exporter = InMemorySpanExporter()
    running = await traced_gateway(gateway_config(stack, topics, repository, redis_prefix), exporter)
    rest_parent, grpc_parent = new_traceparent(), new_traceparent()
    try:
        gateway = running.gateway
        body = orjson.dumps({"id": "rest-traced", "inputs": [{"name": "input", "shape": [1, N_FEATURES],
                                                               "datatype": "FP32", "data": ROW}]})
        request = urllib.request.Request(f"http://127.0.0.1:{gateway.http_port}/v2/models/bandit-route/infer",
                                         data=body, headers={"traceparent": rest_parent,
                                                             "content-type": "application/json"})
        response = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read())  # noqa: S310
        assert orjson.loads(response)["parameters"]["request_id"] == "rest-traced"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, N_FEATURES])
            await stub.ModelInfer(pb2.ModelInferRequest(
                model_name="bandit-route", id="grpc-traced", inputs=[tensor],
                raw_input_contents=[np.asarray([ROW], dtype=np.float32).tobytes()]),
                metadata=(("traceparent", grpc_parent),))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(pb2.ModelInferRequest(model_name="no-such-route", id="grpc-refused",
                                                            inputs=[tensor]), metadata=(("traceparent", grpc_parent),))
        predictions = await read_records(stack.kafka, topics.topics.predictions, lambda rs: len(rs) >= 2)
    finally:
        await running.stop()

    spans = exporter.get_finished_spans()
    for parent, name, request_id in ((rest_parent, "POST /v2/models/{name}/infer", "rest-traced"),
                                     (grpc_parent, "inference.GRPCInferenceService/ModelInfer", "grpc-traced")):
        server = next(s for s in spans if s.name == name and s.context.trace_id == int(trace_id_of(parent), 16))
        assert server.parent is not None and server.parent.span_id == int(span_id_of(parent), 16)
        assert [s.name for s in children(spans, server)] == ["gateway.decide", "gateway.queue", "gateway.infer"]
        record = next(r for r in predictions if r.key == request_id.encode())
        carried = parse_traceparent(header(record, "traceparent"))  # the prediction names the server span
        assert carried is not None and span_id_of(carried) == f"{server.context.span_id:016x}"
    assert next(s for s in spans if s.name.startswith("POST")).attributes["http.response.status_code"] == 200
    failed = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer"
              and s.attributes["banditgate.target"] == "no-such-route"]
    assert len(failed) == 1 and failed[0].attributes["rpc.grpc.status_code"] == refused.value.code().name
