"""Tracing against hostile callers and failing exporters (banditgate.tracing, the gateway's
kafka_trace.BatchTrace, the Kafka loop, the REST server span), with the SDK's InMemorySpanExporter:

* a caller picks its own trace ids, so ids below the sampling bound would have every request
  recorded: per-request spans are capped per batch and per second, the rest counted;
* the sampling decision is made before any SDK call, with the SDK's own bound;
* an unauthenticated REST caller makes no span (and picks no parent);
* ending a span never raises (an exporter or processor error must not replace the request's own);
* a cancelled batch still ends its spans.
No servers: the Kafka loop's producer and delivery are stand-ins."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from prometheus_client import CollectorRegistry

from banditgate import tracing as tracing_module
from banditgate.config import TracingConfig, parse_config
from banditgate.tracecontext import TRACEPARENT, new_traceparent, parse_traceparent
from banditgate.tracing import SpanBudget, Tracing, sampling_bound, server_span
from gateway.errors import Forbidden, Unauthorized
from gateway.metrics import GatewayMetrics
from gateway.serving import Pending
from gateway.transport import kafka_loop
from gateway.transport.http import SidecarContext, infer_rest_traced
from gateway.transport.kafka_trace import BatchTrace


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracing(exporter: InMemorySpanExporter, clock: Clock | None = None, **settings: float) -> Tracing:
    config = TracingConfig(enabled=True, **settings)  # type: ignore[arg-type]
    return Tracing.from_config(config, "banditgate-gateway", exporter=exporter, clock=clock or Clock())


def hostile(i: int) -> str:
    """A traceparent whose trace id's lower 64 bits are zero: sampled at any ratio above 0."""
    return f"00-{i + 1:016x}{'0' * 16}-{i + 1:016x}-00"


def pending(i: int) -> Pending:
    return Pending(f"r{i}", {}, None, 0.0, 0.0)


def request_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == "gateway.request"]


class Raising(SpanProcessor):
    """A span processor (as an exporter would be called) that fails on every span's end."""

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("exporter is down")


# -- the budget and the sampling pre-check (pure) -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1000.0), st.lists(st.floats(0.0, 2.0), max_size=300))
def test_the_budget_never_grants_more_than_its_capacity_plus_its_rate(rate: float, steps: list[float]) -> None:
    budget = SpanBudget(rate, now_s=0.0)
    now, granted = 0.0, 0
    for step in steps:
        now += step
        granted += budget.take(now)
        assert granted <= budget.capacity + rate * now + 1e-9


def test_the_budget_refills_and_a_clock_going_back_refills_nothing() -> None:
    budget = SpanBudget(10.0, now_s=0.0)
    assert sum(budget.take(0.0) for _ in range(20)) == 10
    assert sum(budget.take(0.5) for _ in range(20)) == 5
    assert sum(budget.take(0.1) for _ in range(20)) == 0
    assert SpanBudget(0.0).take(1e9) is False
    with pytest.raises(ValueError, match="finite"):
        SpanBudget(float("nan"))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, (1 << 128) - 1), st.sampled_from([0.0, 1e-9, 0.01, 0.25, 0.5, 0.999, 1.0]))
def test_the_pre_check_decides_as_the_sdk_sampler(trace_id: int, ratio: float) -> None:
    sdk = TraceIdRatioBased(ratio)
    assert sampling_bound(ratio) == sdk.bound
    traceparent = f"00-{trace_id:032x}-{1:016x}-01"
    on = Tracing(object(), sample_ratio=ratio)
    assert on.sampled(traceparent) == sdk.should_sample(None, trace_id, "x").decision.is_sampled()


def test_an_unsampled_traced_request_costs_no_sdk_call() -> None:
    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=0.5)
    batch = BatchTrace(on, 10)
    calls = []
    real = on._tracer.start_span
    on._tracer.start_span = lambda *a, **k: calls.append(a) or real(*a, **k)
    unsampled = f"00-{'f' * 32}-{1:016x}-01"  # lower 64 bits at the top: never under a bound < 2**64
    trace = [(TRACEPARENT, unsampled.encode())]
    assert batch.request(trace, pending(0), "r", None) is trace
    assert calls == []
    assert on.dropped == {"rate_limited": 0, "batch_limited": 0, "failed": 0}


# -- caps ---------------------------------------------------------------------------------------------


def test_hostile_trace_ids_get_spans_only_up_to_the_caps_and_keep_their_context() -> None:
    exporter, clock = InMemorySpanExporter(), Clock()
    on = tracing(exporter, clock, sample_ratio=0.01, max_request_spans_per_s=5, max_request_spans_per_batch=3)
    metrics = GatewayMetrics(CollectorRegistry())
    on.count_into(metrics.trace_spans_dropped)
    carried = []
    for batch_number in range(3):  # one instant: 3 batches of 10, the second second's worth refused
        batch = BatchTrace(on, 10, clock)
        for i in range(10):
            trace = [(TRACEPARENT, hostile(batch_number * 10 + i).encode())]
            carried.append((trace, batch.request(trace, pending(i), "r", None)))
        batch.end()
    assert len(request_spans(exporter)) == 5  # 3 in the first batch, then the bucket's other 2
    assert on.dropped == {"batch_limited": 7, "rate_limited": 18, "failed": 0}
    assert metrics.trace_spans_dropped.labels("batch_limited")._value.get() == 7
    assert metrics.trace_spans_dropped.labels("rate_limited")._value.get() == 18
    # refused: the caller's context goes on unchanged; admitted: the request's span is the parent
    assert sum(out is trace for trace, out in carried) == 25
    clock.now += 1.0  # a second later, 5 more
    batch = BatchTrace(on, 10, clock)
    for i in range(10):
        batch.request([(TRACEPARENT, hostile(100 + i).encode())], pending(i), "r", None)
    batch.end()
    assert len(request_spans(exporter)) == 8  # capped per batch again


def test_sidecar_server_spans_are_capped_per_second_with_or_without_a_callers_context() -> None:
    exporter, clock = InMemorySpanExporter(), Clock()
    on = tracing(exporter, clock, sample_ratio=1.0, max_request_spans_per_s=4)
    served = [server_span(on, "http", "POST /v2/models/{name}/infer", "r",
                          [(TRACEPARENT, hostile(i).encode())] if i % 2 else None) for i in range(10)]
    for traced in served:
        if traced is not None:
            traced.end()
    assert sum(traced is not None for traced in served) == 4
    assert len(exporter.get_finished_spans()) == 4 and on.dropped["rate_limited"] == 6
    # a root span's trace id is the one drawn (and pre-checked) before the SDK call
    assert all(parse_traceparent(t.trace[0][1]) is not None for t in served if t is not None)


# -- authentication before the span ------------------------------------------------------------------


def test_an_unauthenticated_rest_caller_makes_no_span() -> None:
    exporter = InMemorySpanExporter()
    config = parse_config({"server": {"infer_tokens": ["s3cret-token-0123456789"]},
                           "routes": [{"name": "r", "arms": [{"name": "a", "model": "m"}]}]}, env={})
    ctx = SidecarContext(config=config, dataplane=None, publish=lambda topic, events: None,  # type: ignore[arg-type]
                         produce_outcomes=None, is_ready=lambda: True,  # type: ignore[arg-type]
                         tracing=tracing(exporter, sample_ratio=1.0))
    for authorization, refused in ((None, Unauthorized), (b"Bearer wrong", Forbidden)):
        headers = [(b"traceparent", new_traceparent().encode())]
        if authorization is not None:
            headers.append((b"authorization", authorization))

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"{}", "more_body": False}  # pragma: no cover - never read

        with pytest.raises(refused):
            asyncio.run(infer_rest_traced(ctx, {"headers": headers}, receive, "r", None))
    assert exporter.get_finished_spans() == ()
    assert ctx.tracing.dropped["rate_limited"] == 0  # refused before the budget was asked


# -- ending never raises ---------------------------------------------------------------------------


def test_ending_spans_never_replaces_the_error_and_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=1.0)
    on._provider.add_span_processor(Raising())
    metrics = GatewayMetrics(CollectorRegistry())
    on.count_into(metrics.trace_spans_dropped)
    caplog.set_level(logging.WARNING, logger="banditgate.tracing")
    for _ in range(2):
        traced = server_span(on, "grpc", "inference.GRPCInferenceService/ModelInfer", "r",
                             [(TRACEPARENT, new_traceparent().encode())])
        assert traced is not None
        traced.stages.add("gateway.infer", 0.0, 0.1, {})
        traced.end(ValueError("the request's own error"))  # must not raise
        traced.end()  # once only
        batch = BatchTrace(on, 1)
        batch.request([(TRACEPARENT, new_traceparent().encode())], pending(0), "r", None)
        batch.consumed(1, 0)
        batch.end(ConnectionError("publication failed"))
        batch.end()
    # the exporter still got every span (the failing processor is another one), each ended once
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("inference.GRPCInferenceService/ModelInfer") == 2 and names.count("gateway.batch") == 2
    assert on.dropped["failed"] == len(names)
    assert metrics.trace_spans_dropped.labels("failed")._value.get() == len(names)
    logged = [r.getMessage().split(" span failed")[0] for r in caplog.records if " span failed" in r.getMessage()]
    assert sorted(logged) == ["tracing: a gateway.batch", "tracing: a gateway.request",
                              "tracing: a server"]  # once per kind, not once per span


# -- cancellation ------------------------------------------------------------------------------------


def test_a_batch_cancelled_while_waiting_for_delivery_ends_its_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    config = parse_config({"routes": [{"name": "r", "arms": [{"name": "a", "model": "m"}]}]}, env={})
    loop = kafka_loop.KafkaLoop(config, None, GatewayMetrics(CollectorRegistry()),  # type: ignore[arg-type]
                                tracing=tracing(exporter, sample_ratio=1.0))

    async def serve(records: list[object], out: object, traced: BatchTrace | None = None) -> None:
        assert traced is not None
        traced.consumed(0, 0)

    async def never_delivered(sent: list[object]) -> list[object]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover

    monkeypatch.setattr(loop, "_serve_records", serve)
    monkeypatch.setattr(kafka_loop, "delivered", never_delivered)

    async def run() -> None:
        task = asyncio.ensure_future(loop._process_with({}, object()))  # type: ignore[arg-type]
        for _ in range(5):
            await asyncio.sleep(0)
        assert exporter.get_finished_spans() == ()  # waiting for delivery
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    batch = [s for s in exporter.get_finished_spans() if s.name == "gateway.batch"]
    assert len(batch) == 1 and str(batch[0].events[0].attributes["exception.type"]).endswith("CancelledError")


# -- a failing SDK, a hostile payload, an absent collector ---------------------------------------------


class RaisingOnStart(SpanProcessor):
    def on_start(self, span: object, parent_context: object = None) -> None:
        raise RuntimeError("processor is broken")


def test_a_span_that_fails_to_start_is_counted_and_the_batch_goes_on() -> None:
    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=1.0)
    on._provider.add_span_processor(RaisingOnStart())
    batch = BatchTrace(on, 1)  # raised RuntimeError before
    trace = [(TRACEPARENT, new_traceparent().encode())]
    assert batch.request(trace, pending(0), "r", None) is trace  # no span: the context goes on unchanged
    batch.consumed(1, 0)
    batch.end()
    assert on.dropped["failed"] == 2 and exporter.get_finished_spans() == ()


def test_what_a_caller_sent_is_cut_in_span_attributes() -> None:
    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=1.0)
    traced = server_span(on, "http", "POST /v2/models/{name}/infer", "r" * 100_000, None)
    assert traced is not None
    traced.end(ValueError("x" * 100_000))
    (span,) = exporter.get_finished_spans()
    assert len(span.attributes["banditgate.target"]) == 4096
    assert len(span.events[0].attributes["exception.message"]) == 4096


def test_the_stage_spans_of_an_unsampled_batch_are_not_made() -> None:
    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=0.0)
    calls = []
    real = on._tracer.start_span
    on._tracer.start_span = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    batch = BatchTrace(on, 1)
    batch.consumed(1, 0)
    batch.producing(1)
    batch.end()
    assert calls == ["gateway.batch"]  # not consume and produce as well


class BlockingExporter(InMemorySpanExporter):
    """An exporter whose shutdown hangs (a collector that does not answer) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.finished = False

    def shutdown(self) -> None:
        self.release.wait(10)
        self.finished = True


def test_stopping_does_not_wait_for_a_collector_that_is_away(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = BlockingExporter()
    on = tracing(exporter, sample_ratio=1.0)
    monkeypatch.setattr(tracing_module, "SHUTDOWN_TIMEOUT_S", 0.2)
    started = time.monotonic()
    asyncio.run(on.stop())  # held the event loop until the exporter returned before
    assert time.monotonic() - started < 2.0
    assert not exporter.finished
    exporter.release.set()
    # and the provider does not register the SDK's exit hook, which would wait for it again at exit
    assert on._provider._atexit_handler is None


def test_a_root_span_ignores_a_span_made_current_elsewhere_and_leaves_no_drawn_id() -> None:
    """An auto-instrumentation or an embedding application may have made a span current: a sidecar
    call without a traceparent still starts its own trace, with the id drawn for it, and that id is
    never taken by the next, unrelated root span (gateway.batch)."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace

    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=1.0)
    ambient = otel_trace.NonRecordingSpan(otel_trace.SpanContext(
        0xABC, 0xDEF, is_remote=True, trace_flags=otel_trace.TraceFlags(1)))
    token = otel_context.attach(otel_trace.set_span_in_context(ambient))
    try:
        served = server_span(on, "http", "POST /v2/models/{name}/infer", "r", None)
        assert served is not None
        served.end()
        batch = BatchTrace(on, 1)
        batch.end()
    finally:
        otel_context.detach(token)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    server, root = spans["POST /v2/models/{name}/infer"], spans["gateway.batch"]
    assert server.parent is None and server.context.trace_id != 0xABC  # its own trace, not the ambient one
    assert root.parent is None and root.context.trace_id not in (0xABC, server.context.trace_id)


def test_the_batch_cap_does_not_apply_to_sidecar_calls() -> None:
    """max_request_spans_per_batch: 0 turns off the Kafka requests' spans, not the sidecars' (a
    REST or gRPC call is in no fetched batch)."""
    exporter = InMemorySpanExporter()
    on = tracing(exporter, sample_ratio=1.0, max_request_spans_per_batch=0)
    served = server_span(on, "grpc", "inference.GRPCInferenceService/ModelInfer", "r", None)
    assert served is not None
    served.end()
    assert on.dropped["batch_limited"] == 0
    assert not on.admit(new_traceparent(sampled=True), in_batch=0)  # a Kafka request is refused
