"""OpenTelemetry spans for the gateway and the feedback worker (the optional extra ``[otel]``).

Off unless ``tracing.enabled``: then :data:`OFF` is used, whose ``enabled`` attribute is the one
check a hot path makes before any tracing call (nothing else is called, nothing is imported).
On, spans are exported over OTLP/HTTP by a batching span processor (off the event loop's path),
sampled by trace id (``TraceIdRatioBased``: the gateway and the feedback worker record the same
traces, whatever the caller's sampled flag says: banditgate's client sets it on the ids it makes).

Spans are per batch where a span per request would cost more than the work (a request is served
in a few microseconds of a batch): the gateway makes ``gateway.batch`` with ``gateway.consume``,
``gateway.infer`` (one per route: decide, queue and infer) and ``gateway.produce`` as children;
a request that arrives with a sampled ``traceparent`` also gets a ``gateway.request`` span in its
own trace, linked to its batch, and the prediction carries that span as its parent. The feedback
worker makes ``feedback.join`` and ``feedback.apply`` per batch and ``feedback.outcome`` per
outcome of a traced request (child of the outcome's context, else of the prediction's).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from banditgate.tracecontext import span_id_of, trace_id_of

if TYPE_CHECKING:
    from banditgate.config import TracingConfig

MAX_LINKS = 64
"""Most links a batch span keeps to the traced requests it carried (the rest are dropped)."""


class TracingUnavailable(RuntimeError):
    """Tracing is enabled but the ``[otel]`` extra is not installed (the CLI prints the one line)."""

    user_facing = True


class Tracing:
    """Spans through an OpenTelemetry tracer, or nothing (``enabled`` False: :data:`OFF`)."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
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
    def from_config(cls, config: TracingConfig, default_service: str, exporter: Any = None) -> Tracing:
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

    def context_of(self, traceparent: str | None) -> Any:
        """An OpenTelemetry context whose parent is the (valid) `traceparent`, or None."""
        if traceparent is None:
            return None
        remote = self._span_context(int(trace_id_of(traceparent), 16), int(span_id_of(traceparent), 16),
                                    is_remote=True, trace_flags=self._flags(int(traceparent[53:55], 16)))
        return self._trace.set_span_in_context(self._non_recording(remote))

    def link_to(self, traceparent: str) -> Any:
        """A span link to the span a (valid) traceparent names."""
        remote = self._span_context(int(trace_id_of(traceparent), 16), int(span_id_of(traceparent), 16),
                                    is_remote=True, trace_flags=self._flags(int(traceparent[53:55], 16)))
        return self._link(remote)

    def link_span(self, span: Any) -> Any:
        """A span link to one of our own spans."""
        return self._link(span.get_span_context())

    @staticmethod
    def traceparent_of(span: Any) -> str:
        """The traceparent that makes the next hop a child of `span`."""
        context = span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    # -- spans -------------------------------------------------------------------------------------

    def start(self, name: str, *, parent: Any = None, traceparent: str | None = None, kind: str = "internal",
              start_ns: int | None = None, attributes: Mapping[str, Any] | None = None,
              links: Sequence[Any] = ()) -> Any:
        """Start a span (end it with ``span.end()``): a child of span `parent`, else of the remote
        `traceparent`, else a new trace's root."""
        context = (self._trace.set_span_in_context(parent) if parent is not None
                   else self.context_of(traceparent))
        return self._tracer.start_span(name, context=context, kind=self._kinds[kind], start_time=start_ns,
                                       attributes=dict(attributes) if attributes else None,
                                       links=list(links[:MAX_LINKS]) or None)

    def record(self, name: str, *, start_ns: int, end_ns: int | None = None, **kwargs: Any) -> Any:
        """A span that already happened (from `start_ns` to `end_ns`, default now)."""
        span = self.start(name, start_ns=start_ns, **kwargs)
        span.end(end_time=end_ns)
        return span

    def shutdown(self) -> None:
        """Export what is buffered and stop (at process exit)."""
        if self._provider is not None:
            self._provider.shutdown()


OFF = Tracing()
"""Tracing switched off: ``OFF.enabled`` is False and nothing else may be called on it."""


def wall_ns(monotonic_s: float, now_monotonic_s: float) -> int:
    """Epoch nanoseconds of a past monotonic time (span start times are wall-clock)."""
    return time.time_ns() - int((now_monotonic_s - monotonic_s) * 1e9)
