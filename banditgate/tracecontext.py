"""W3C Trace Context (https://www.w3.org/TR/trace-context/) as banditgate carries it (pure).

A request's ``traceparent`` (and ``tracestate``) header - a Kafka record header, an HTTP header or
gRPC metadata - travels onto the Kafka headers of the events it causes: the prediction (on the
predictions topic and the reply topic), the shadow predictions, the dead letters; the feedback
worker keeps a prediction's ``traceparent`` in its join entry and puts the context on what it
emits for that request. So one trace id ties request -> prediction -> outcome whether or not any
process exports spans (banditgate.tracing does, when configured).

Validation is strict and never raises: a header that is not exactly
``version-traceid-parentid-flags`` in lowercase hex (version ``00``-``fe``, a 32-digit trace id
and a 16-digit parent id that are not all zeros) is ignored, as is a ``tracestate`` without a
valid ``traceparent`` or one that is too long or not printable ASCII. Per the specification, a
version above ``00`` may carry more fields after the flags (``-``-separated); only the first four
are read and the header is passed on as its ``00`` form.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE_CHARS = 512
"""W3C: a tracestate of 32 members fits in 512 characters; longer ones are ignored, not cut."""

_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

TraceHeaders = list[tuple[str, bytes]]
"""Kafka record headers carrying a trace context: ``[("traceparent", ...), ("tracestate", ...)]``."""


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


def parse_traceparent(value: str | bytes | None) -> str | None:
    """The ``traceparent`` in its canonical ``00-<trace id>-<parent id>-<flags>`` form, or None
    when `value` is not a valid one (never raises).

    >>> parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
    >>> parse_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01") is None
    True
    >>> parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    True
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) < 55:
        return None
    version, trace_id, parent_id, flags = value[0:2], value[3:35], value[36:52], value[53:55]
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    if not (_is_hex(version) and _is_hex(trace_id) and _is_hex(parent_id) and _is_hex(flags)):
        return None
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == "00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55] != "-":
        return None  # a later version may add fields, each after a dash
    return f"00-{trace_id}-{parent_id}-{flags}"


def parse_tracestate(value: str | bytes | None) -> str | None:
    """`value` when it is a plausible ``tracestate`` (non-empty printable ASCII of at most
    MAX_TRACESTATE_CHARS; its list members are passed on as they are, not checked), else None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value or len(value) > MAX_TRACESTATE_CHARS:
        return None
    if not all(" " <= c <= "~" for c in value):
        return None
    return value


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id of a valid (parsed) traceparent."""
    return traceparent[3:35]


def span_id_of(traceparent: str) -> str:
    """The 16-hex-digit parent (span) id of a valid (parsed) traceparent."""
    return traceparent[36:52]


def is_sampled(traceparent: str) -> bool:
    """Whether the caller recorded (sampled) its span: the flags' lowest bit."""
    return bool(int(traceparent[53:55], 16) & 1)


def new_traceparent(sampled: bool = True) -> str:
    """A fresh traceparent: random trace and parent ids (never all zeros), sampled by default."""
    trace_id = os.urandom(16).hex()
    span_id = os.urandom(8).hex()
    if trace_id == _ZERO_TRACE:  # pragma: no cover - 2**-128
        trace_id = "0" * 31 + "1"
    if span_id == _ZERO_SPAN:  # pragma: no cover - 2**-64
        span_id = "0" * 15 + "1"
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def with_parent(traceparent: str, span_id: str) -> str:
    """The same trace with `span_id` (16 hex digits) as the parent: what a process that made a
    span passes on, so the next hop becomes that span's child."""
    return f"{traceparent[:36]}{span_id}{traceparent[52:]}"


def trace_headers(traceparent: str | None, tracestate: str | None = None) -> TraceHeaders | None:
    """Kafka headers for a context (None when there is no valid traceparent)."""
    if traceparent is None:
        return None
    headers = [(TRACEPARENT, traceparent.encode())]
    if tracestate is not None:
        headers.append((TRACESTATE, tracestate.encode()))
    return headers


def from_kafka_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> TraceHeaders | None:
    """The valid trace context among a Kafka record's headers, as headers to carry on (the first
    ``traceparent`` and ``tracestate``; None when there is no valid traceparent)."""
    if not headers:
        return None
    parent = state = None
    for name, value in headers:
        if name == TRACEPARENT and parent is None:
            parent = value
        elif name == TRACESTATE and state is None:
            state = value
    if parent is None:
        return None
    traceparent = parse_traceparent(parent)
    return trace_headers(traceparent, parse_tracestate(state) if traceparent is not None else None)


def from_mapping(headers: Mapping[str, str | bytes] | None) -> TraceHeaders | None:
    """The valid trace context of HTTP headers or gRPC metadata (names compared in lowercase, as
    both protocols treat them); None when there is no valid traceparent."""
    if not headers:
        return None
    traceparent = parse_traceparent(headers.get(TRACEPARENT))
    if traceparent is None:
        return None
    return trace_headers(traceparent, parse_tracestate(headers.get(TRACESTATE)))


def traceparent_of(headers: TraceHeaders | None) -> str | None:
    """The traceparent of carried headers (already validated), or None."""
    if headers:
        name, value = headers[0]
        if name == TRACEPARENT:
            return value.decode()
    return None


def trace_context(traceparent: str | None, tracestate: str | None = None) -> list[tuple[str, bytes]]:
    """The Kafka headers for a record: the caller's `traceparent` when valid (an invalid one is
    ignored, never an error), else a fresh one; `tracestate` only with the caller's own parent."""
    parent = parse_traceparent(traceparent) if traceparent is not None else None
    if parent is None:
        return [(TRACEPARENT, new_traceparent().encode())]
    state = parse_tracestate(tracestate) if tracestate is not None else None
    if state is None:
        return [(TRACEPARENT, parent.encode())]
    return [(TRACEPARENT, parent.encode()), (TRACESTATE, state.encode())]
