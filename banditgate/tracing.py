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

A caller chooses its own trace ids, so the ratio alone does not bound the per-request spans (a
caller who picks ids below the sampling bound has every request recorded). Before any SDK call a
per-request span passes :meth:`Tracing.admit`: the sampling decision made here with the SDK's own
bound (an unsampled request costs no SDK call), then the batch's cap
(``tracing.max_request_spans_per_batch``), then a per-process token bucket
(``tracing.max_request_spans_per_s``, :class:`SpanBudget`). A request refused there keeps its
trace context (it still travels onto its events) but gets no span; the refusals are counted
(``banditgate_trace_spans_dropped_total`` / ``banditgate_feedback_trace_spans_dropped_total``,
:meth:`Tracing.count_into`). Ending a span never raises (:meth:`Tracing.close`): an SDK or
exporter error there is counted, logged once a minute per kind, and never replaces the error the
span was ended with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from banditgate.tracecontext import TRACEPARENT, TraceHeaders, span_id_of, trace_id_of

if TYPE_CHECKING:
    from prometheus_client import Counter

    from banditgate.config import TracingConfig

log = logging.getLogger(__name__)

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

DROP_REASONS = ("rate_limited", "batch_limited", "failed")
"""Why a span was dropped: over ``max_request_spans_per_s``, over ``max_request_spans_per_batch``,
or starting or ending it raised (an SDK, span processor or exporter error)."""

MAX_ATTRIBUTE_CHARS = 4096
"""Longest span, event or link attribute value kept (longer ones are cut by the SDK): a request's
target, an error's message and stack trace may carry what a caller sent."""
SHUTDOWN_TIMEOUT_S = 5.0
"""Longest a process's stop waits for the last spans to be exported (the collector may be away)."""

_LOWER_64 = (1 << 64) - 1
_FAILURE_LOG_INTERVAL_S = 60.0
_FAILURE_KINDS_MAX = 64


def sampling_bound(ratio: float) -> int:
    """The bound OpenTelemetry's ``TraceIdRatioBased(ratio)`` compares a trace id's lower 64 bits
    with (sampled when below it): ``round(ratio * 2**64)``.

    >>> sampling_bound(0.0), sampling_bound(1.0) == 1 << 64, sampling_bound(0.5) == 1 << 63
    (0, True, True)
    """
    return round(ratio * (1 << 64))


def is_sampled_id(trace_id: int, bound: int) -> bool:
    """Whether ``TraceIdRatioBased`` with `bound` (:func:`sampling_bound`) samples `trace_id`."""
    return (trace_id & _LOWER_64) < bound


class SpanBudget:
    """A token bucket (pure; the caller passes the monotonic time): at most `rate_per_s` spans a
    second on average, `capacity` (default one second's worth, at least one) at once. Over any
    interval [t0, t1] it grants at most ``capacity + rate_per_s * (t1 - t0)``; a clock that goes
    back refills nothing.

    >>> budget = SpanBudget(2.0, now_s=0.0)
    >>> [budget.take(0.0) for _ in range(3)], budget.take(0.5), budget.take(0.5)
    ([True, True, False], True, False)
    """

    __slots__ = ("_last_s", "_tokens", "capacity", "rate_per_s")

    def __init__(self, rate_per_s: float, capacity: float | None = None, now_s: float = 0.0) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s >= 0):
            raise ValueError(f"rate_per_s must be a finite number >= 0, not {rate_per_s!r}")
        if capacity is None:
            capacity = max(1.0, rate_per_s) if rate_per_s > 0 else 0.0
        if not (math.isfinite(capacity) and capacity >= 0):
            raise ValueError(f"capacity must be a finite number >= 0, not {capacity!r}")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._tokens = capacity
        self._last_s = now_s

    def take(self, now_s: float) -> bool:
        """Take one token at monotonic time `now_s`: True if there was one."""
        elapsed = now_s - self._last_s
        if elapsed > 0:
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate_per_s)
            self._last_s = now_s
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class TracingUnavailable(RuntimeError):
    """Tracing is enabled but the ``[otel]`` extra is not installed (the CLI prints the one line)."""

    user_facing = True


class Tracing:
    """Spans through an OpenTelemetry tracer, or nothing (``enabled`` False: :data:`OFF`)."""

    def __init__(self, tracer: OTel = None, provider: OTel = None, *, sample_ratio: float = 1.0,
                 max_request_spans_per_s: float = 100.0, max_request_spans_per_batch: int = 16,
                 clock: Callable[[], float] = time.monotonic, ids: OTel = None) -> None:
        self.enabled = tracer is not None
        self._tracer = tracer
        self._provider = provider
        self._bound = sampling_bound(sample_ratio)
        """The sampler's bound (``from_config`` gives the provider ``TraceIdRatioBased`` of the same ratio)."""
        self._clock = clock
        self._budget = SpanBudget(max_request_spans_per_s, now_s=clock())
        self.max_request_spans_per_batch = max_request_spans_per_batch
        self._ids = ids
        """The provider's id generator (:func:`_drawn_ids`): the trace id of a root span drawn here."""
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        """Spans dropped so far, by reason (also counted in the metric :meth:`count_into` gives)."""
        self._counters: dict[str, Counter] = {}
        self._failures_logged: dict[str, float] = {}
        if tracer is not None:
            from opentelemetry import trace
            from opentelemetry.context import Context
            from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

            self._root_context = Context()

            self._trace = trace
            self._link = Link
            self._non_recording = NonRecordingSpan
            self._span_context = SpanContext
            self._flags = TraceFlags
            self._kinds = {"internal": SpanKind.INTERNAL, "consumer": SpanKind.CONSUMER,
                           "producer": SpanKind.PRODUCER, "server": SpanKind.SERVER}

    @classmethod
    def from_config(cls, config: TracingConfig, default_service: str, exporter: OTel = None,
                    clock: Callable[[], float] = time.monotonic) -> Tracing:
        """:data:`OFF` unless `config.enabled`; else a tracer exporting to `config.endpoint` (or to
        `exporter`, e.g. the SDK's InMemorySpanExporter in tests; `clock`: the monotonic clock of
        the span budget). Raises TracingUnavailable when the ``[otel]`` extra is missing."""
        if not config.enabled:
            return OFF
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import SpanLimits, TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
        except ImportError:
            raise TracingUnavailable("tracing.enabled needs the otel extra: pip install 'banditgate[otel]'") from None
        ids = _drawn_ids()
        provider = TracerProvider(resource=Resource.create({"service.name": config.service_name or default_service}),
                                  sampler=TraceIdRatioBased(config.sample_ratio), id_generator=ids,
                                  span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS),
                                  # our processes stop it themselves, bounded (Tracing.stop): the SDK's
                                  # exit hook would wait up to the exporter's 30 s for a collector that is away
                                  shutdown_on_exit=False)
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise TracingUnavailable("tracing.enabled needs the otel extra: pip install 'banditgate[otel]'") from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
        else:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        # the provider is ours, not the process-global one: a library in the same process keeps its own
        return cls(provider.get_tracer("banditgate"), provider, sample_ratio=config.sample_ratio,
                   max_request_spans_per_s=config.max_request_spans_per_s,
                   max_request_spans_per_batch=config.max_request_spans_per_batch, clock=clock, ids=ids)

    # -- admission and failures (only called when enabled) -----------------------------------------

    def count_into(self, counter: Counter) -> None:
        """Count dropped spans in `counter` (a counter with one label, ``reason``) from now on."""
        self._counters = {reason: counter.labels(reason) for reason in DROP_REASONS}
        for reason, count in self.dropped.items():
            if count:
                self._counters[reason].inc(count)

    def drop(self, reason: str, count: int = 1) -> None:
        """Count `count` spans not made (or not ended cleanly) for `reason` (one of DROP_REASONS)."""
        self.dropped[reason] += count
        counter = self._counters.get(reason)
        if counter is not None:
            counter.inc(count)

    def sampled(self, traceparent: str) -> bool:
        """Whether the sampler records the trace of a (valid) `traceparent`: decided here, with
        the sampler's own bound, without calling into the SDK."""
        return int(traceparent[19:35], 16) < self._bound

    def admit(self, traceparent: str, in_batch: int | None = 0) -> bool:
        """Whether a request with this (valid) caller `traceparent` gets its own spans: its trace
        is sampled, its batch has made fewer than ``max_request_spans_per_batch`` (`in_batch`: how
        many it made), and the process's token bucket has a token. A sampled request refused for
        either cap is counted (``batch_limited`` / ``rate_limited``); an unsampled one is not."""
        return self.sampled(traceparent) and self._take(in_batch)

    def admit_root(self, in_batch: int | None = 0) -> int | None:
        """A trace id for a new root span of a request (a sidecar call without a ``traceparent``)
        when it is to be recorded (sampled, and under both caps as in :meth:`admit`), else None.
        Pass it to :meth:`start` as `trace_id`."""
        trace_id = random.getrandbits(128)  # a trace id, drawn as the SDK's RandomIdGenerator draws it
        if trace_id == 0 or not is_sampled_id(trace_id, self._bound):
            return None
        return trace_id if self._take(in_batch) else None

    def _take(self, in_batch: int | None) -> bool:
        # in_batch None: a sidecar call, which is in no fetched batch (only the token bucket applies)
        if in_batch is not None and in_batch >= self.max_request_spans_per_batch:
            self.drop("batch_limited")
            return False
        if not self._budget.take(self._clock()):
            self.drop("rate_limited")
            return False
        return True

    def failed(self, where: str, error: Exception) -> None:
        """Starting or ending a span raised `error` (the SDK, a span processor or the exporter):
        counted (``failed``), logged at most once a minute per (where, error type)."""
        self.drop("failed")
        kind = f"{where}: {type(error).__name__}"
        now = self._clock()
        last = self._failures_logged.get(kind)
        if last is not None and now - last < _FAILURE_LOG_INTERVAL_S:
            return
        if last is None and len(self._failures_logged) >= _FAILURE_KINDS_MAX:
            self._failures_logged.clear()  # bounded: a handful of kinds in practice
        self._failures_logged[kind] = now
        log.warning("tracing: a %s span failed (%s: %s); the span is dropped, the request is not affected "
                    "(this kind is logged once a minute; banditgate_trace_spans_dropped_total{reason=\"failed\"} "
                    "counts every one)", where, type(error).__name__, str(error)[:200])

    def close(self, span: OTel, where: str, marks: Marks = (), now_s: float = 0.0, now_ns: int | None = None,
              error: BaseException | None = None, end_ns: int | None = None) -> None:
        """End `span` (at `end_ns`, default now) after making its stage children from `marks` (as
        :meth:`record_marks`) and recording `error` on it. Never raises: it runs while an error is
        being raised, which it must not replace; what fails is counted and logged (:meth:`failed`)
        and the span is still ended."""
        if marks and span.is_recording():  # an unsampled batch's stages would be unsampled too
            try:
                self.record_marks(marks, span, now_s, now_ns)
            except Exception as exc:  # noqa: BLE001 - counted and logged in failed()
                self.failed(where, exc)
        if error is not None:
            try:
                span.record_exception(error)
            except Exception as exc:  # noqa: BLE001 - counted and logged in failed()
                self.failed(where, exc)
        try:
            span.end(end_time=end_ns)
        except Exception as exc:  # noqa: BLE001 - counted and logged in failed()
            self.failed(where, exc)

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
              links: Sequence[OTel] = (), trace_id: int | None = None) -> OTel:
        """Start a span (end it with :meth:`close`): a child of span `parent`, else of the remote
        `traceparent`, else a new trace's root (whose trace id is `trace_id` when given: one
        :meth:`admit_root` drew)."""
        drawn = trace_id is not None and self._ids is not None
        try:
            context = (self._trace.set_span_in_context(parent) if parent is not None
                       else self.context_of(traceparent))
            if context is None:
                # a root: an explicit empty context, so that a span some other code made current
                # (an auto-instrumentation, an embedding application) does not become its parent
                # and the id drawn for it is the one the SDK takes
                context = self._root_context
                if drawn:
                    self._ids.local.drawn = trace_id
            return self._tracer.start_span(name, context=context, kind=self._kinds[kind], start_time=start_ns,
                                           attributes=dict(attributes) if attributes else None,
                                           links=list(links[:MAX_LINKS]) or None)
        except Exception as exc:  # noqa: BLE001 - counted and logged in failed(); the request goes on
            # a span processor's on_start (or the SDK) failed: a span that records nothing stands in
            # (its end does nothing; the callers see is_recording() False, as for an unsampled one)
            self.failed(name, exc)
            return self._trace.INVALID_SPAN
        finally:
            if drawn:
                self._ids.local.drawn = None  # never left for an unrelated root span

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
        """Export what is buffered and stop (blocks until the exporter is done: see :meth:`stop`)."""
        if self._provider is not None:
            self._provider.shutdown()

    async def stop(self, timeout_s: float | None = None) -> None:
        """:meth:`shutdown` off the event loop, waiting at most `timeout_s` (default
        SHUTDOWN_TIMEOUT_S): with the collector away, the exporter would hold the loop for its
        timeout and retries. What is not exported by then is dropped (logged); never raises."""
        if self._provider is None:
            return
        timeout_s = SHUTDOWN_TIMEOUT_S if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def run() -> None:
            try:
                self.shutdown()
            except Exception as exc:  # noqa: BLE001 - logged: a stopping process has nothing else to do with it
                log.warning("tracing: shutting the exporter down failed (%s: %s)", type(exc).__name__, str(exc)[:200])
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(done.set)

        # a daemon thread: one the collector holds does not hold the process's exit either
        threading.Thread(target=run, name="banditgate-tracing-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            log.warning("tracing: the last spans were not exported within %.1fs (is the collector reachable?); "
                        "they are dropped", timeout_s)


OFF = Tracing()
"""Tracing switched off: ``OFF.enabled`` is False and nothing else may be called on it."""


def _drawn_ids() -> OTel:
    """The SDK's random id generator, except that a root span's trace id is the one
    :meth:`Tracing.admit_root` drew (so the sampling decision made before the SDK call is the
    one the SDK makes). Per thread: only the thread that drew the id takes it."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class DrawnIds(RandomIdGenerator):
        def __init__(self) -> None:
            self.local = threading.local()

        def generate_trace_id(self) -> int:
            drawn: int | None = getattr(self.local, "drawn", None)
            if drawn is not None:
                self.local.drawn = None
                return drawn
            return super().generate_trace_id()

    return DrawnIds()


def wall_ns(monotonic_s: float, now_monotonic_s: float) -> int:
    """Epoch nanoseconds of a past monotonic time (span start times are wall-clock)."""
    return time.time_ns() - int((now_monotonic_s - monotonic_s) * 1e9)


class ServerSpan:
    """The server span of one REST or gRPC sidecar request (see :func:`server_span`)."""

    __slots__ = ("_ended", "_tracing", "grpc", "span", "stages", "trace")

    def __init__(self, tracing: Tracing, span: OTel, trace: TraceHeaders | None, grpc: bool = False) -> None:
        self._tracing = tracing
        self._ended = False
        self.grpc = grpc
        self.span = span
        self.stages = Stages()
        """Pass as ``stages=`` to ``serve_tensors``: its decide, queue and infer become children."""
        self.trace = trace
        """The trace context to carry onto the request's events: this span as their parent."""

    def end(self, error: BaseException | None = None, status: int | str | None = None, **attributes: AttributeValue | None) -> None:
        """End the span (once; a later call does nothing): the stages become its children;
        `error` (what the request raised, if anything) is recorded on it with the status it
        answers: `status` when given (an HTTP status, a gRPC code name), else a GatewayError's
        own (500 / UNKNOWN for anything else), else 200 / OK; `attributes` are set on it. Never
        raises (Tracing.close): it runs while the request's own error is being raised."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        tracing = self._tracing
        try:
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
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:200]))
        except Exception as exc:  # noqa: BLE001 - counted and logged in failed(); the span is still ended
            tracing.failed("server", exc)
        marks = self.stages.marks
        tracing.close(span, "server", marks, time.monotonic() if marks else 0.0, error=error)


def server_span(tracing: Tracing, protocol: str, method: str, target: str,
                trace: TraceHeaders | None) -> ServerSpan | None:
    """Start the server span of one sidecar request, or None when tracing is off (the only cost
    then: one attribute test), when its trace is not sampled, or when it is over
    ``tracing.max_request_spans_per_s`` (:meth:`Tracing.admit`): then the request goes on
    untraced, with the caller's context unchanged. Call it only once the caller is
    authenticated: an unauthenticated caller must not make spans (nor pick their parent).

    `protocol` is ``"http"`` or ``"grpc"``; `method` the HTTP route template (``POST
    /v2/models/{name}/infer``) or the full gRPC method (``inference.GRPCInferenceService/ModelInfer``),
    which names the span; `target` the route or model asked for; `trace` the caller's valid trace
    context (banditgate.tracecontext.from_mapping of the HTTP headers or the gRPC metadata), whose
    ``traceparent`` becomes the span's parent. Pass its ``.stages`` as ``stages=`` to
    ``serve_tensors``, carry ``.trace`` onto the events, and call ``.end(error)`` once answered."""
    if not tracing.enabled:
        return None
    traceparent = trace[0][1].decode() if trace else None
    trace_id = None
    if traceparent is not None:
        if not tracing.admit(traceparent, in_batch=None):
            return None
    else:
        trace_id = tracing.admit_root(in_batch=None)
        if trace_id is None:
            return None
    if protocol == "grpc":
        service, _, rpc = method.partition("/")
        attributes: dict[str, AttributeValue] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
    else:
        verb, _, route = method.partition(" ")
        attributes = {"http.request.method": verb, "http.route": route}
    attributes["banditgate.target"] = target
    span = tracing.start(method, traceparent=traceparent, kind="server", attributes=attributes, trace_id=trace_id)
    if not span.is_recording():  # the SDK decided otherwise (a sampler of another ratio): nothing recorded
        tracing.close(span, "server")
        return None
    carried = [(TRACEPARENT, Tracing.traceparent_of(span).encode()), *(trace[1:] if trace else ())]
    return ServerSpan(tracing, span, carried, grpc=protocol == "grpc")
