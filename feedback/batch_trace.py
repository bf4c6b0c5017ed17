"""The spans of one feedback batch (made only when tracing is on; see banditgate.tracing).

The join processor makes a :class:`BatchTrace` per batch when ``tracing.enabled``; it records the
stage times and makes the spans once the batch is applied:

* ``feedback.batch`` (kind consumer, the root of its own trace) with ``feedback.join`` (decoding
  and joining the batch) and ``feedback.apply`` (Redis, dead letters and the changelog, until the
  batch is persisted) as children;
* per event of a traced request: ``feedback.prediction`` (a child of the prediction record's
  ``traceparent``: the gateway's ``gateway.request``) or ``feedback.outcome`` (a child of the
  outcome's own context when it has one - a client that continued the prediction's trace - else
  of the prediction's, kept in the join entry; linked to the prediction), linked to
  ``feedback.batch``, with its own ``feedback.join`` and ``feedback.apply`` children. Only
  sampled traces get them (``TraceIdRatioBased``: the same traces the gateway recorded), decided
  before any SDK call, and at most ``tracing.max_request_spans_per_batch`` per batch while the
  process's ``tracing.max_request_spans_per_s`` allows (:meth:`Tracing.admit`; the rest are counted
  in ``banditgate_feedback_trace_spans_dropped_total``).

Every span started here is ended exactly once (:meth:`BatchTrace.end`, also when the batch never
got to be applied: its submit was cancelled or raised), and ending never raises.
"""

from __future__ import annotations

import asyncio
import time

from banditgate.tracing import AttributeValue, Marks, OTel, Tracing
from feedback.join import Entry, PredictionIn


class BatchTrace:
    """The spans of one feedback batch: started at its join, ended once it is applied."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self._join_started = time.monotonic()
        self._anchor_ns = time.time_ns()
        """Wall-clock nanoseconds at `_join_started` (all times converted through this one pair)."""
        self.span = tracing.start("feedback.batch", kind="consumer", start_ns=self._anchor_ns)
        self._joined: float | None = None
        self._attributes: dict[str, AttributeValue] = {}
        self.events: list[OTel] = []
        """The spans of the sampled traced events in the batch (ended with it)."""
        self._ended = False

    def prediction(self, event: PredictionIn) -> None:
        """A (shadow) prediction joined: a span in its request's trace when it carries one."""
        if event.trace is None or not self.tracing.admit(event.trace, len(self.events)):
            return
        self._event("feedback.prediction", event.trace, [],
                    {"banditgate.request_id": event.request_id, "banditgate.route": event.route,
                     "banditgate.arm": event.served.arm, "banditgate.shadow": event.served.shadow})

    def outcome(self, own: str | None, entry: Entry | None, key: bytes | None) -> None:
        """An outcome joined (`own`: the outcome record's traceparent; `entry`: its request's join
        entry before the outcome): a span in the outcome's trace, else in the prediction's."""
        predicted = entry.trace if entry is not None else None
        traceparent = own if own is not None else predicted
        if traceparent is None or not self.tracing.admit(traceparent, len(self.events)):
            return
        links = [self.tracing.link_to(predicted)] if predicted is not None and predicted != own else []
        request_id = entry.request_id if entry is not None else (key or b"").decode(errors="replace")
        self._event("feedback.outcome", traceparent, links,
                    {"banditgate.request_id": request_id,
                     "banditgate.joined": entry is not None and entry.primary is not None})

    def _event(self, name: str, traceparent: str, links: list[OTel], attributes: dict[str, AttributeValue]) -> None:
        """The span of one event whose `traceparent` (validated at decode) :meth:`Tracing.admit` admitted."""
        tracing = self.tracing
        span = tracing.start(name, traceparent=traceparent, kind="consumer", attributes=attributes,
                             links=[tracing.link_span(self.span), *links],
                             start_ns=self._anchor_ns)
        if span.is_recording():
            self.events.append(span)
        else:
            tracing.close(span, name)

    def joined(self, messages: int, effects: int, entries: int) -> None:
        """The batch is joined; applying it starts now."""
        self._joined = time.monotonic()
        self._attributes = {"messaging.batch.message_count": messages, "banditgate.effects": effects,
                            "banditgate.entries": entries}

    def applied(self, written: asyncio.Future[None]) -> None:
        """The batch is applied and persisted (or failed): a done callback of its future."""
        self.end(asyncio.CancelledError() if written.cancelled() else written.exception())

    def end(self, error: BaseException | None = None) -> None:
        """End every span of the batch (once; a later call does nothing), with `error` recorded
        on them when the batch failed. Never raises (Tracing.close)."""
        if self._ended:
            return
        self._ended = True
        now = time.monotonic()
        now_ns = self._anchor_ns + int((now - self._join_started) * 1e9)
        joined = self._joined if self._joined is not None else now
        marks: Marks = [("feedback.join", self._join_started, joined, {}), ("feedback.apply", joined, now, {})]
        tracing = self.tracing
        try:
            for key, value in self._attributes.items():
                self.span.set_attribute(key, value)
        except Exception as exc:  # noqa: BLE001 - counted and logged in failed(); the spans still end
            tracing.failed("feedback.batch", exc)
        for span in self.events:
            tracing.close(span, "feedback.event", marks, now, now_ns, error, now_ns)
        tracing.close(self.span, "feedback.batch", marks, now, now_ns, error, now_ns)
