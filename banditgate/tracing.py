"""OpenTelemetry spans for the gateway and the feedback worker (the optional extra ``[otel]``).

Off unless ``tracing.enabled``: then :data:`OFF` is used, whose ``enabled`` attribute is the one
check a hot path makes before any tracing call (nothing else is called, nothing is imported).
On, spans are exported over OTLP/HTTP by a batching span processor (off the event loop's path),
sampled by trace id (``TraceIdRatioBased``: the gateway and the feedback worker record the same
traces, whatever the caller's sampled flag says: banditgate's client sets it on the ids it makes).

The stages of the Kafka path are ``gateway.consume`` -> ``gateway.decide`` -> ``gateway.queue``
-> ``gateway.infer`` -> ``gateway.produce`` (decide per route, queue and infer per arm). Each
fetched batch makes ``gateway.batch`` (its own trace) with the stages as children; a request that
arrives with a ``traceparent`` whose trace is sampled also gets ``gateway.request``, a child of
the caller's span, linked to its batch, with its own copies of the stages it went through (same
times, its route and arm) as children, and the prediction carries ``gateway.request`` as its
parent. A request without a sampled trace costs nothing per request: a span per request would
cost more than serving it (a few microseconds of a batch). The REST and gRPC sidecars make a
server span per inference request (:func:`server_span`), a child of the caller's ``traceparent``,
with its decide, queue and infer as children. The feedback worker makes ``feedback.batch`` with
``feedback.join`` and ``feedback.apply`` per batch; an event of a traced request (a prediction, an
outcome) gets ``feedback.prediction`` / ``feedback.outcome`` in the request's trace with its own
``feedback.join`` and ``feedback.apply`` children.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from banditgate.tracecontext import TRACEPARENT, TraceHeaders, span_id_of, trace_id_of

if TYPE_CHECKING:
    from banditgate.config import TracingConfig

OTel = Any  # Any: opentelemetry's tracer, spans, contexts and links (imported only when tracing is on)
AttributeValue = str | int | float | bool
Attributes = Mapping[str, AttributeValue]
"""Span attributes (OpenTelemetry takes these primitive values)."""
Marks = Sequence[tuple[str, float, float, Attributes]]
"""Stages that already happened: (span name, monotonic start, monotonic end, attributes)."""


class Stages:
    """When a request or batch is traced: the monotonic (start, end) of each stage its serve went
    through (``gateway.decide``, and per arm ``gateway.queue`` and ``gateway.infer``), with their
    attributes; they become spans once the times are known (:meth:`Tracing.record_marks`). Never
    made when tracing is off (the dataplane then tests one ``is None``)."""

    __slots__ = ("marks",)

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float, dict[str, AttributeValue]]] = []

    def add(self, name: str, start_s: float, end_s: float, attributes: dict[str, AttributeValue]) -> None:
        self.marks.append((name, start_s, end_s, attributes))

MAX_LINKS = 64
"""Most links a batch span keeps to the traced requests it carried (the rest are dropped)."""


class TracingUnavailable(RuntimeError):
    """Tracing is enabled but the ``[otel]`` extra is not installed (the CLI prints the one line)."""

    user_facing = True


class Tracing:
    """Spans through an OpenTelemetry tracer, or nothing (``enabled`` False: :data:`OFF`)."""

    def __init__(self, tracer: OTel = None, provider: OTel = None) -> None:
        self.enabled = tracer is not None
        self._tracer = tracer
        self._provider = provider
        if tracer is not None:
            from opentelemetry import trace
            from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

            self._trace = trace
            self._link = Link
            self._non_recording = NonRecordingSpan
            self._span_context = SpanContext
            self._flags = TraceFlags
            self._kinds = {"internal": SpanKind.INTERNAL, "consumer": SpanKind.CONSUMER,
                           "producer": SpanKind.PRODUCER, "server": SpanKind.SERVER}

    @classmethod
    def from_config(cls, config: TracingConfig, default_service: str, exporter: OTel = None) -> Tracing:
        """:data:`OFF` unless `config.enabled`; else a tracer exporting to `config.endpoint` (or to
        `exporter`, e.g. the SDK's InMemorySpanExporter in tests). Raises TracingUnavailable
        when the ``[otel]`` extra is missing."""
        if not config.enabled:
            return OFF
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
        except ImportError:
            raise TracingUnavailable("tracing.enabled needs the otel extra: pip install 'banditgate[otel]'") from None
        provider = TracerProvider(resource=Resource.create({"service.name": config.service_name or default_service}),
                                  sampler=TraceIdRatioBased(config.sample_ratio))
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise TracingUnavailable("tracing.enabled needs the otel extra: pip install 'banditgate[otel]'") from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
        else:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        # the provider is ours, not the process-global one: a library in the same process keeps its own
        return cls(provider.get_tracer("banditgate"), provider)

    # -- contexts ----------------------------------------------------------------------------------

    def context_of(self, traceparent: str | None) -> OTel:
        """An OpenTelemetry context whose parent is the (valid) `traceparent`, or None."""
        if traceparent is None:
            return None
        remote = self._span_context(int(trace_id_of(traceparent), 16), int(span_id_of(traceparent), 16),
                                    is_remote=True, trace_flags=self._flags(int(traceparent[53:55], 16)))
        return self._trace.set_span_in_context(self._non_recording(remote))

    def link_to(self, traceparent: str) -> OTel:
        """A span link to the span a (valid) traceparent names."""
        remote = self._span_context(int(trace_id_of(traceparent), 16), int(span_id_of(traceparent), 16),
                                    is_remote=True, trace_flags=self._flags(int(traceparent[53:55], 16)))
        return self._link(remote)

    def link_span(self, span: OTel) -> OTel:
        """A span link to one of our own spans."""
        return self._link(span.get_span_context())

    @staticmethod
    def traceparent_of(span: OTel) -> str:
        """The traceparent that makes the next hop a child of `span`."""
        context = span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    # -- spans -------------------------------------------------------------------------------------

    def start(self, name: str, *, parent: OTel = None, traceparent: str | None = None, kind: str = "internal",
              start_ns: int | None = None, attributes: Attributes | None = None,
              links: Sequence[OTel] = ()) -> OTel:
        """Start a span (end it with ``span.end()``): a child of span `parent`, else of the remote
        `traceparent`, else a new trace's root."""
        context = (self._trace.set_span_in_context(parent) if parent is not None
                   else self.context_of(traceparent))
        return self._tracer.start_span(name, context=context, kind=self._kinds[kind], start_time=start_ns,
                                       attributes=dict(attributes) if attributes else None,
                                       links=list(links[:MAX_LINKS]) or None)

    def record(self, name: str, *, start_ns: int, end_ns: int | None = None, **kwargs: OTel) -> OTel:
        """A span that already happened (from `start_ns` to `end_ns`, default now)."""
        span = self.start(name, start_ns=start_ns, **kwargs)
        span.end(end_time=end_ns)
        return span

    def record_marks(self, marks: Marks, parent: OTel, now_s: float, now_ns: int | None = None,
                     **extra: AttributeValue) -> None:
        """The stages in `marks` (monotonic times, `now_s` being the monotonic now) as children
        of span `parent`; `extra` attributes are added to each."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        for name, start_s, end_s, attributes in marks:
            span = self.start(name, parent=parent, start_ns=now_ns - int((now_s - start_s) * 1e9),
                              attributes={**attributes, **extra} if extra else attributes)
            span.end(end_time=now_ns - int((now_s - end_s) * 1e9))

    def shutdown(self) -> None:
        """Export what is buffered and stop (at process exit)."""
        if self._provider is not None:
            self._provider.shutdown()


OFF = Tracing()
"""Tracing switched off: ``OFF.enabled`` is False and nothing else may be called on it."""


def wall_ns(monotonic_s: float, now_monotonic_s: float) -> int:
    """Epoch nanoseconds of a past monotonic time (span start times are wall-clock)."""
    return time.time_ns() - int((now_monotonic_s - monotonic_s) * 1e9)


class ServerSpan:
    """The server span of one REST or gRPC sidecar request (see :func:`server_span`)."""

    __slots__ = ("_tracing", "grpc", "span", "stages", "trace")

    def __init__(self, tracing: Tracing, span: OTel, trace: TraceHeaders | None, grpc: bool = False) -> None:
        self._tracing = tracing
        self.grpc = grpc
        self.span = span
        self.stages = Stages()
        """Pass as ``stages=`` to ``serve_tensors``: its decide, queue and infer become children."""
        self.trace = trace
        """The trace context to carry onto the request's events: this span as their parent when
        it is recorded, else the caller's context unchanged (None when the caller sent none)."""

    def end(self, error: BaseException | None = None, status: int | str | None = None, **attributes: AttributeValue | None) -> None:
        """End the span: the stages become its children; `error` (what the request raised, if
        anything) is recorded on it with the status it answers: `status` when given (an HTTP
        status, a gRPC code name), else a GatewayError's own (500 / UNKNOWN for anything else),
        else 200 / OK; `attributes` are set on it."""
        span = self.span
        if self.stages.marks:
            self._tracing.record_marks(self.stages.marks, span, time.monotonic())
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        if self.grpc:
            span.set_attribute("rpc.grpc.status_code", status if status is not None else "OK" if error is None
                               else getattr(error, "grpc_code", "UNKNOWN"))
        else:
            span.set_attribute("http.response.status_code", status if status is not None else 200 if error is None
                               else getattr(error, "http_status", 500))
        if error is not None:
            span.record_exception(error)
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
        span.end()


def server_span(tracing: Tracing, protocol: str, method: str, target: str,
                trace: TraceHeaders | None) -> ServerSpan | None:
    """Start the server span of one sidecar request, or None when tracing is off (the only cost
    then: one attribute test).

    `protocol` is ``"http"`` or ``"grpc"``; `method` the HTTP route template (``POST
    /v2/models/{name}/infer``) or the full gRPC method (``inference.GRPCInferenceService/ModelInfer``),
    which names the span; `target` the route or model asked for; `trace` the caller's valid trace
    context (banditgate.tracecontext.from_mapping of the HTTP headers or the gRPC metadata), whose
    ``traceparent`` becomes the span's parent. Pass its ``.stages`` as ``stages=`` to
    ``serve_tensors``, carry ``.trace`` onto the events, and call ``.end(error)`` once answered."""
    if not tracing.enabled:
        return None
    traceparent = trace[0][1].decode() if trace else None
    if protocol == "grpc":
        service, _, rpc = method.partition("/")
        attributes: dict[str, AttributeValue] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
    else:
        verb, _, route = method.partition(" ")
        attributes = {"http.request.method": verb, "http.route": route}
    attributes["banditgate.target"] = target
    span = tracing.start(method, traceparent=traceparent, kind="server", attributes=attributes)
    carried = trace
    if span.is_recording():
        carried = [(TRACEPARENT, Tracing.traceparent_of(span).encode()), *(trace[1:] if trace else ())]
    return ServerSpan(tracing, span, carried, grpc=protocol == "grpc")
