"""CloudEvents 1.0 binary-mode Kafka headers (https://github.com/cloudevents/spec, Kafka protocol
binding) on every event banditgate produces, so Knative / KServe-style consumers can route them
without reading the value: ``ce_specversion`` (``1.0``), ``ce_id``, ``ce_type``, ``ce_source`` and
``ce_time``. The record's value stays the event's JSON (its content type is the binding's
default, ``application/json``); banditgate's own consumers neither need nor read these headers.

* ``ce_type``: ``io.banditgate.<event>.v<schema_version>`` for the event names of
  banditgate.events (``CLOUDEVENT_TYPES``, written once next to the definitions).
* ``ce_source``: ``/banditgate/<process>/<route>`` (``/banditgate/<process>`` where an event has no
  route, e.g. a dead letter of an undecodable record); process is ``gateway``, ``feedback`` or
  ``client``.
* ``ce_id``: stable across retries and replays of the same event: the request_id for a
  prediction (the same id on the predictions and the reply topic: one event), request_id + ``/`` +
  arm for a shadow prediction, the input's ``topic/partition/offset`` for a dead letter of a
  consumed record, and otherwise a digest of the record's topic, key and value (:func:`content_id`).
* ``ce_time``: RFC 3339, UTC, milliseconds: when the event was produced.

The constant part of each (type, source) is built once (:func:`headers_for`); a record then costs
one list of five tuples and, per batch, one time string.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable

from banditgate.events import CLOUDEVENT_TYPES

SPECVERSION = b"1.0"
CE_ID, CE_TIME, CE_SPECVERSION, CE_TYPE, CE_SOURCE = "ce_id", "ce_time", "ce_specversion", "ce_type", "ce_source"
REQUIRED = (CE_SPECVERSION, CE_ID, CE_TYPE, CE_SOURCE, CE_TIME)
MAX_SOURCES = 4096
"""Most (type, source) header sets kept built; a deployment has a handful of routes, so the
cache is cleared whole if something makes more (bounded like every collection here)."""

Headers = list[tuple[str, bytes]]


def source(process: str, route: str | None = None) -> str:
    """The ``ce_source`` of `process`'s events for `route` (a route name is a URI-safe name)."""
    return f"/banditgate/{process}/{route}" if route else f"/banditgate/{process}"


_second = -1
_second_text = ""


def ce_time(epoch_s: float | None = None) -> bytes:
    """`epoch_s` (default now) as RFC 3339 UTC with milliseconds (``2026-12-07T20:10:09.123Z``);
    the date and time of day are formatted once per second."""
    global _second, _second_text  # a one-entry cache of the formatted second
    now = time.time() if epoch_s is None else epoch_s
    second = int(now)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_second_text}.{int((now - second) * 1000):03d}Z".encode()


def content_id(topic: str, key: bytes | None, value: bytes) -> bytes:
    """An id for an event without a natural one: a digest of where it goes and what it says, so a
    retry or a replay of the same record carries the same id."""
    digest = hashlib.blake2b(topic.encode(), digest_size=16)
    digest.update(b"\0" + (key or b"") + b"\0")
    digest.update(value)
    return digest.hexdigest().encode()


class EventHeaders:
    """The CloudEvents headers of one event type from one source (the constant part built once)."""

    __slots__ = ("constant",)

    def __init__(self, event: str, source_: str) -> None:
        self.constant = ((CE_SPECVERSION, SPECVERSION), (CE_TYPE, CLOUDEVENT_TYPES[event].encode()),
                         (CE_SOURCE, source_.encode()))

    def __call__(self, ce_id: bytes, at: bytes, trace: Headers | None = None) -> Headers:
        """The headers of one record: its id, its time (:func:`ce_time`, once per batch), the
        constant part and the request's trace context, if any (first, as it always was)."""
        if trace:
            return [*trace, (CE_ID, ce_id), (CE_TIME, at), *self.constant]
        return [(CE_ID, ce_id), (CE_TIME, at), *self.constant]


_built: dict[tuple[str, str], EventHeaders] = {}


def headers_for(event: str, source_: str) -> EventHeaders:
    """The (cached) header builder of `event` (a banditgate.events schema name) from `source_`."""
    built = _built.get((event, source_))
    if built is None:
        if len(_built) >= MAX_SOURCES:
            _built.clear()
        built = _built[(event, source_)] = EventHeaders(event, source_)
    return built


def headers(event: str, source_: str, ce_id: bytes, trace: Headers | None = None) -> Headers:
    """The headers of one record produced now (off the hot paths: builds the time string)."""
    return headers_for(event, source_)(ce_id, ce_time(), trace)


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
