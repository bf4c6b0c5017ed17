"""OpenTelemetry spans (banditgate.tracing) with the SDK's in-memory exporter: one trace covers
request -> prediction -> outcome. The client's request goes through a real in-process gateway on
the real Kafka; the prediction and outcome records it leads to (read back from Kafka, headers and
all) go through the feedback worker's join (its Redis and changelog are the fakes of
tests/feedback/test_join_budget_processor.py: what is checked here is the spans, not the effects)."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

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
from tests.feedback.test_join_budget_processor import Changelog, Ledger, Out
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import read_records

pytestmark = pytest.mark.stack

ROW = [0.5] * N_FEATURES


def header(record, name: str) -> str | None:  # type: ignore[no-untyped-def]
    found = [value for key, value in record.headers or () if key == name]
    return found[0].decode() if found else None


async def test_one_trace_covers_request_prediction_and_outcome(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    # one exporter per process: the gateway's stop shuts its tracer provider down, and its exporter with it
    exporter, worker_exporter = InMemorySpanExporter(), InMemorySpanExporter()
    on = TracingConfig(enabled=True, sample_ratio=1.0)
    t = topics.topics
    running = await start_gateway(gateway_config(stack, topics, repository, redis_prefix))
    running.gateway.kafka.tracing = Tracing.from_config(on, "banditgate-gateway", exporter=exporter)
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
    in_trace = {s.name: s for s in spans if s.context.trace_id == trace}
    assert {"gateway.request", "feedback.outcome"} <= set(in_trace), sorted(in_trace)
    request, outcome = in_trace["gateway.request"], in_trace["feedback.outcome"]
    assert request.parent is not None and request.parent.span_id == int(span_id_of(parent), 16)  # the client's
    assert span_id_of(carried) == f"{request.context.span_id:016x}"  # the prediction names the request's span
    assert outcome.parent is not None and outcome.parent.span_id == request.context.span_id
    assert {s.resource.attributes["service.name"] for s in in_trace.values()} == {"banditgate-gateway",
                                                                                  "banditgate-feedback"}
    # the batch spans: one trace per batch, with the stages as children, and the request linked to it
    batch = next(s for s in spans if s.name == "gateway.batch" and s.context.span_id in
                 {link.context.span_id for link in request.links})
    stages = {s.name for s in spans if s.parent is not None and s.parent.span_id == batch.context.span_id}
    assert {"gateway.consume", "gateway.infer", "gateway.produce"} <= stages
    assert {"feedback.join", "feedback.apply"} <= {s.name for s in spans}
    # an outcome in a trace of its own still links to its prediction, kept in the join entry
    other = next(s for s in spans if s.name == "feedback.outcome" and s.context.trace_id != trace)
    other_request = next(s for s in spans if s.name == "gateway.request" and s.attributes["banditgate.request_id"]
                         == "other")
    assert other_request.context.span_id in {link.context.span_id for link in other.links}
