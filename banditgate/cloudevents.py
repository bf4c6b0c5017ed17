"""CloudEvents 1.0 binary-mode Kafka headers (https://github.com/cloudevents/spec, Kafka protocol
binding) on every event banditgate produces, so Knative / KServe-style consumers can route them
without reading the value: ``ce_specversion`` (``1.0``), ``ce_id``, ``ce_type``, ``ce_source`` and
``ce_time``. The record's value stays the event's JSON (its content type is the binding's
default, ``application/json``); banditgate's own consumers neither need nor read these headers.

* ``ce_type``: ``io.banditgate.<event>.v<schema_version>`` for the event names of
  banditgate.events (``CLOUDEVENT_TYPES``, written once next to the definitions).
* ``ce_source``: ``/banditgate/<process>/<route>`` (``/banditgate/<process>`` where an event has no
  route, e.g. a dead letter of an undecodable record, or its route is not a name); process is
  ``gateway``, ``feedback`` or ``client``.
* ``ce_id``: ``<event>:<natural id>``. CloudEvents wants source + id unique per distinct event, and
  one source emits several event types about the same request (its prediction, shadow
  predictions, a dead letter), so the id starts with the event name (which has no ``:``); the
  natural id is stable across retries and replays of the same event: the request_id for a request
  and a prediction (the same id on the predictions and the reply topic: one event), arm + ``:`` +
  request_id for a shadow prediction (an arm name has no ``:``), the input's
  ``topic/partition/offset`` for a dead letter of a consumed record, ``route/seq`` for a routing
  change, and otherwise a digest of the record's topic, key and value (:func:`content_id`). A
  natural id over MAX_NATURAL_ID_BYTES (only a request_id that escaped the edges' MAX_ID_CHARS
  check could be) is replaced by ``~`` + its 32-hex-digit digest, so every header stays bounded.
* ``ce_time``: RFC 3339, UTC, milliseconds: when the event was produced.

The constant part of each (type, source) is built once (:func:`headers_for`); a record then costs
one list of five tuples and, per batch, one time string. The headers are bounded
(MAX_HEADER_BYTES, with the trace context): banditgate.kafka_delivery.record_limit leaves room for
them. ``kafka.cloudevents: false`` turns them off (every ``enabled`` argument here): records then
carry the trace context only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

from banditgate.events import CLOUDEVENT_TYPES, MAX_ID_CHARS, MAX_NAME_CHARS, is_name
from banditgate.tracecontext import MAX_TRACESTATE_CHARS, TRACEPARENT, TRACESTATE

SPECVERSION = b"1.0"
CE_ID, CE_TIME, CE_SPECVERSION, CE_TYPE, CE_SOURCE = "ce_id", "ce_time", "ce_specversion", "ce_type", "ce_source"
REQUIRED = (CE_SPECVERSION, CE_ID, CE_TYPE, CE_SOURCE, CE_TIME)
MAX_SOURCES = 4096
"""Most (type, source) header sets kept built; a deployment has a handful of routes, so the
cache is cleared whole if something makes more (bounded like every collection here)."""

Headers = list[tuple[str, bytes]]

MAX_NATURAL_ID_BYTES = MAX_NAME_CHARS + 1 + 4 * MAX_ID_CHARS
"""The longest natural ce_id: an arm (ASCII, no ``:``), ``:`` and a request_id of MAX_ID_CHARS characters of up to
4 UTF-8 bytes each (a dead letter's position, a route/seq and a digest are shorter)."""
_TIME_BYTES = len(b"2026-12-07T20:10:09.123Z")
_TRACEPARENT_BYTES = len(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
_HEADER_FRAMING_BYTES = 10
"""A record header's own framing: two length varints (5 bytes each at most)."""
MAX_HEADER_BYTES = sum(len(name) + size + _HEADER_FRAMING_BYTES for name, size in (
    (CE_SPECVERSION, len(SPECVERSION)),
    (CE_ID, max(len(event) for event in CLOUDEVENT_TYPES) + 1 + MAX_NATURAL_ID_BYTES),
    (CE_TYPE, max(len(t) for t in CLOUDEVENT_TYPES.values())),
    (CE_SOURCE, len("/banditgate/feedback/") + MAX_NAME_CHARS),
    (CE_TIME, _TIME_BYTES),
    (TRACEPARENT, _TRACEPARENT_BYTES),
    (TRACESTATE, MAX_TRACESTATE_CHARS),  # printable ASCII (tracecontext.parse_tracestate)
))
"""The most bytes the headers of one record banditgate produces take: the five CloudEvents
attributes at their longest and a trace context (``traceparent`` and ``tracestate``); what
banditgate.kafka_delivery.record_limit keeps free of a topic's record size."""


def header_bytes(record_headers: Iterable[tuple[str, bytes]] | None) -> int:
    """The bytes `record_headers` add to a record (names, values and framing, as MAX_HEADER_BYTES
    counts them)."""
    return sum(len(name.encode()) + len(value or b"") + _HEADER_FRAMING_BYTES for name, value in record_headers or ())


def source(process: str, route: str | None = None) -> str:
    """The ``ce_source`` of `process`'s events for `route` (a route name is a URI-safe name; anything
    else, as an alert's key could be, is left out so the header stays a bounded URI reference)."""
    return f"/banditgate/{process}/{route}" if route and is_name(route) else f"/banditgate/{process}"


_by_second: tuple[int, str] = (-1, "")
_by_millisecond: tuple[int, bytes] = (-1, b"")


def ce_time(epoch_s: float | None = None) -> bytes:
    """`epoch_s` (default now) as RFC 3339 UTC with milliseconds (``2026-12-07T20:10:09.123Z``).
    The date and time of day are formatted once per second and the whole string once per
    millisecond: the client's `send` asks for it per record, dozens of times a millisecond. Each
    cache is one (key, text) tuple, read and replaced whole, so threads calling at once (the sync
    clients each run a loop in a thread) never pair a text with another time.

    >>> ce_time(1796674209.1234), ce_time(1796674209.9999), ce_time(1796674210.0)
    (b'2026-12-07T20:10:09.123Z', b'2026-12-07T20:10:09.999Z', b'2026-12-07T20:10:10.000Z')
    """
    global _by_second, _by_millisecond  # one-entry caches
    millisecond = int((time.time() if epoch_s is None else epoch_s) * 1000)
    cached_millisecond, cached_text = _by_millisecond
    if millisecond == cached_millisecond:
        return cached_text
    second, fraction = divmod(millisecond, 1000)
    cached_second, second_text = _by_second
    if second != cached_second:
        second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _by_second = (second, second_text)
    text = f"{second_text}.{fraction:03d}Z".encode()
    _by_millisecond = (millisecond, text)
    return text


def content_id(topic: str, key: bytes | None, value: bytes) -> bytes:
    """An id for an event without a natural one: a digest of where it goes and what it says, so a
    retry or a replay of the same record carries the same id."""
    digest = hashlib.blake2b(topic.encode(), digest_size=16)
    digest.update(b"\0" + (key or b"") + b"\0")
    digest.update(value)
    return digest.hexdigest().encode()


def event_id(event: str, natural_id: bytes) -> bytes:
    """The ``ce_id`` of `event` (a banditgate.events schema name) whose natural id is `natural_id`
    (see the module docstring): ``<event>:<natural id>``, the natural id replaced by ``~`` and its
    digest when it is over MAX_NATURAL_ID_BYTES.

    >>> event_id("prediction", b"r-1"), event_id("shadow-prediction", b"c:r-1")
    (b'prediction:r-1', b'shadow-prediction:c:r-1')
    >>> len(event_id("prediction", b"x" * 5000))
    44
    """
    if len(natural_id) > MAX_NATURAL_ID_BYTES:
        natural_id = b"~" + hashlib.blake2b(natural_id, digest_size=16).hexdigest().encode()
    return event.encode() + b":" + natural_id


class EventHeaders:
    """The CloudEvents headers of one event type from one source (the constant part built once)."""

    __slots__ = ("constant", "event", "prefix")

    def __init__(self, event: str, source_: str) -> None:
        self.event = event
        self.prefix = event.encode() + b":"
        self.constant = ((CE_SPECVERSION, SPECVERSION), (CE_TYPE, CLOUDEVENT_TYPES[event].encode()),
                         (CE_SOURCE, source_.encode()))

    def __call__(self, natural_id: bytes, at: bytes, trace: Headers | None = None) -> Headers:
        """The headers of one record: its id (:func:`event_id` of `natural_id`), its time
        (:func:`ce_time`, once per batch), the constant part and the request's trace context, if
        any (first, as it always was)."""
        ce_id = (self.prefix + natural_id if len(natural_id) <= MAX_NATURAL_ID_BYTES
                 else event_id(self.event, natural_id))
        if trace:
            return [*trace, (CE_ID, ce_id), (CE_TIME, at), *self.constant]
        return [(CE_ID, ce_id), (CE_TIME, at), *self.constant]


class _Off(EventHeaders):
    """``kafka.cloudevents: false``: a record carries its trace context only."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("request", "/")

    def __call__(self, natural_id: bytes, at: bytes, trace: Headers | None = None) -> Headers:
        return trace or []


OFF: EventHeaders = _Off()
"""The builder :func:`headers_for` returns when the headers are turned off."""
_built: dict[tuple[str, str], EventHeaders] = {}


def headers_for(event: str, source_: str, enabled: bool = True) -> EventHeaders:
    """The (cached) header builder of `event` (a banditgate.events schema name) from `source_`;
    OFF (the trace context only) when not `enabled` (``kafka.cloudevents``)."""
    if not enabled:
        return OFF
    built = _built.get((event, source_))
    if built is None:
        if len(_built) >= MAX_SOURCES:
            _built.clear()
        built = _built[(event, source_)] = EventHeaders(event, source_)
    return built


def headers(event: str, source_: str, natural_id: bytes, trace: Headers | None = None,
            enabled: bool = True) -> Headers:
    """The headers of one record produced now (off the hot paths: builds the time string); the
    trace context only (empty without one) when not `enabled`."""
    if not enabled:
        return trace or []
    return headers_for(event, source_)(natural_id, ce_time(), trace)


def has_cloudevent(record_headers: Iterable[tuple[str, bytes]] | None) -> bool:
    """Whether a record's headers already carry a CloudEvents id."""
    return any(name == CE_ID for name, _ in record_headers or ())


def attributes(record_headers: Iterable[tuple[str, bytes]] | None) -> dict[str, str]:
    """The CloudEvents attributes among a record's headers (``ce_`` prefix removed); empty when
    there are none. For consumers that want them: banditgate's own never require them."""
    found: dict[str, str] = {}
    for name, value in record_headers or ():
        if name.startswith("ce_") and name[3:] not in found:
            found[name[3:]] = bytes(value).decode("utf-8", "replace") if value is not None else ""
    return found
