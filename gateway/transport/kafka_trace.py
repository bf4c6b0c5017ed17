"""The spans of one fetched Kafka batch (made only when tracing is on; see banditgate.tracing).

The Kafka loop makes a :class:`BatchTrace` per fetched batch when ``tracing.enabled`` and tells
it when each stage starts and ends; everything else here runs only then. The stages' times are
kept as monotonic marks and turned into spans when the batch is delivered, so a span is made
once per stage (and once per stage of each traced request), never per untraced request:

* ``gateway.batch`` (kind consumer, the root of its own trace) with ``gateway.consume``, then per
  route ``gateway.decide`` and per arm ``gateway.queue`` and ``gateway.infer``, then
  ``gateway.produce`` as children;
* per request whose ``traceparent`` is sampled: ``gateway.request`` (kind consumer), a child of
  that ``traceparent``, linked to ``gateway.batch``, from the request's receipt until its batch
  is acknowledged, with its own ``gateway.consume``, ``gateway.decide``, ``gateway.queue``,
  ``gateway.infer`` (those of its route and the arm that answered it) and ``gateway.produce`` as
  children. Its events (prediction, shadows, dead letter, reply) name ``gateway.request`` as their
  parent, so the feedback worker's spans for them join the same trace. At most
  ``tracing.max_request_spans_per_batch`` requests of a batch get one, and only while the
  process's ``tracing.max_request_spans_per_s`` allows (:meth:`Tracing.admit`, decided before any
  SDK call); the others keep the caller's context unchanged.

Ending never raises (:meth:`Tracing.close`), so the loop may end a batch's spans while an error of
its own is being raised; :meth:`BatchTrace.end` ends every span it started exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from banditgate.jsontypes import JSONObject
from banditgate.tracecontext import TRACEPARENT, TraceHeaders
from banditgate.tracing import AttributeValue, OTel, Stages, Tracing
from gateway.serving import Answer, Pending

ServeFn = Callable[..., Awaitable[list[Answer]]]


class BatchTrace:
    """The spans of one fetched batch: started by the Kafka loop, ended once it is delivered."""

    def __init__(self, tracing: Tracing, records: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.tracing = tracing
        self.clock = clock
        self.marks: list[tuple[str, float, float, dict[str, AttributeValue]]] = []
        """The batch's stages (consume, each route's decide / queue / infer)."""
        self.routes: dict[str, Stages] = {}
        self.requests: list[tuple[OTel, str, str | None]] = []
        """(gateway.request span, route, arm that answered) of each sampled traced request."""
        self._consume_started = clock()
        self._anchor_ns = time.time_ns()
        """Wall-clock nanoseconds at `_consume_started`: every monotonic time of the batch is
        converted through this one pair, so the spans nest exactly."""
        self.span = tracing.start("gateway.batch", kind="consumer", start_ns=self._anchor_ns,
                                  attributes={"messaging.batch.message_count": records})
        self._produce_started: float | None = None
        self._produce_count = 0
        self._ended = False

    # -- stages ------------------------------------------------------------------------------

    def consumed(self, requests: int, dead_letters: int) -> None:
        """The batch is decoded (its consume stage ends now)."""
        self.marks.append(("gateway.consume", self._consume_started, self.clock(),
                           {"banditgate.requests": requests, "banditgate.dead_letters": dead_letters}))

    def serve(self, serve: ServeFn) -> Callable[[str, Sequence[Pending]], Awaitable[list[Answer]]]:
        """`serve` (Dataplane.serve) recording each route's decide, queue and infer."""

        async def traced(route_name: str, pendings: Sequence[Pending]) -> list[Answer]:
            stages = self.routes[route_name] = Stages()
            started = self.clock()
            try:
                return await serve(route_name, pendings, stages=stages)
            finally:
                if not stages.marks:  # a route served as a whole (interleave): one span for it
                    stages.add("gateway.infer", started, self.clock(), {"banditgate.route": route_name,
                                                                        "banditgate.requests": len(pendings)})

        return traced

    def request(self, trace: TraceHeaders, pending: Pending, route_name: str,
                prediction: JSONObject | None) -> TraceHeaders:
        """A request with a (valid) trace context: start its ``gateway.request`` span, in the
        caller's trace, and return the headers its events carry (that span as their parent when
        its trace is sampled, else the caller's context unchanged)."""
        tracing = self.tracing
        traceparent = trace[0][1].decode()
        if self._ended or not tracing.admit(traceparent, len(self.requests)):
            return trace  # not sampled, or over a cap: the caller's context goes on unchanged, no span
        arm = prediction["arm"] if prediction is not None else None
        attributes: dict[str, AttributeValue] = {"banditgate.request_id": pending.request_id, "banditgate.route": route_name}
        if arm is not None:
            attributes["banditgate.arm"] = arm
        # from when its batch was fetched (it was received, stamped, while that batch was decoded)
        span = tracing.start("gateway.request", traceparent=traceparent, kind="consumer",
                             start_ns=self._wall_ns(min(pending.received_s, self._consume_started)),
                             attributes=attributes, links=[tracing.link_span(self.span)])
        if not span.is_recording():  # the SDK decided otherwise: nothing recorded
            tracing.close(span, "gateway.request")
            return trace
        self.requests.append((span, route_name, arm))
        return [(TRACEPARENT, tracing.traceparent_of(span).encode()), *trace[1:]]

    def producing(self, records: int) -> None:
        """The batch's outputs go to the producer now (its produce stage starts)."""
        self._produce_started = self.clock()
        self._produce_count = records

    def _wall_ns(self, monotonic_s: float) -> int:
        return self._anchor_ns + int((monotonic_s - self._consume_started) * 1e9)

    # -- the end -----------------------------------------------------------------------------

    def end(self, error: BaseException | None = None, failed_batches: int = 0) -> None:
        """The batch is delivered (or failed with `error`, or its task was cancelled): make the
        stage spans and end them all, once (a later call does nothing). Never raises."""
        if self._ended:
            return
        self._ended = True
        tracing = self.tracing
        now = self.clock()
        now_ns = self._wall_ns(now)
        produce = []
        if self._produce_started is not None:
            produce = [("gateway.produce", self._produce_started, now,
                        {"messaging.batch.message_count": self._produce_count,
                         "banditgate.failed_batches": failed_batches})]
        route_marks = [mark for stages in self.routes.values() for mark in stages.marks]
        for span, route_name, arm in self.requests:
            stages = self.routes.get(route_name)
            # the route's decide, and the queue and infer of the arm that answered (not its shadows)
            mine = [mark for mark in stages.marks
                    if "banditgate.arm" not in mark[3] or (mark[3]["banditgate.arm"] == arm
                                                           and not mark[3].get("banditgate.shadow"))
                    ] if stages is not None else []
            tracing.close(span, "gateway.request", [*self.marks, *mine, *produce], now, now_ns, error, now_ns)
        tracing.close(self.span, "gateway.batch", [*self.marks, *route_marks, *produce], now, now_ns, error, now_ns)
