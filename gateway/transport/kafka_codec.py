"""Kafka records <-> dataplane requests and events (pure: no client, no asyncio)."""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from banditgate.events import EventError, dead_letter_event, dead_letter_payload, load_object, request_fields
from banditgate.jsontypes import JSONObject
from gateway.serving import Pending

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord


@dataclass(slots=True)
class SourcedPending(Pending):
    """A request plus where it came from (for dead-letters and partition reuse)."""

    topic: str = ""
    partition: int = 0
    offset: int = 0
    key: bytes | None = None
    raw: bytes = b""
    reply_to: str | None = None
    """A topic the prediction also goes to (allowed by kafka.reply_topics), keyed by request_id."""
    headers: Sequence[tuple[str, bytes | None]] | None = None
    """The request record's headers (the trace context travels on from them)."""


@dataclass
class DecodedRecords:
    by_route: dict[str, list[SourcedPending]] = field(default_factory=dict)
    dead: list[tuple[ConsumerRecord, str, str]] = field(default_factory=list)  # (record, reason, message)
    count: int = 0
    reply_topics: set[str] = field(default_factory=set)
    """The reply topics the decoded requests name."""


def decode_records(records: Iterable[ConsumerRecord], routes: Container[str], max_bytes: int,
                   clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                   reply_allowed: Callable[[str], bool] = lambda _topic: False) -> DecodedRecords:
    """Decode and validate request records; malformed ones go to `dead` with their reason (a
    `reply_to` that `reply_allowed` refuses: reply_refused)."""
    out = DecodedRecords()
    by_route = out.by_route
    now = clock()
    wall = wall_clock()
    for record in records:
        out.count += 1
        raw = record.value
        try:
            request_id, route, inputs, unit_id, ts, items, reply_to = request_fields(
                load_object(raw, "request", max_bytes), routes, reply_allowed)
        except EventError as exc:
            out.dead.append((record, exc.reason, str(exc)))
            continue
        pending = SourcedPending(request_id, inputs, unit_id, wall if ts is None else ts, now, items,
                                 record.topic, record.partition, record.offset, record.key, raw, reply_to,
                                 record.headers)
        if reply_to is not None:
            out.reply_topics.add(reply_to)
        group = by_route.get(route)
        if group is None:
            by_route[route] = [pending]
        else:
            group.append(pending)
    return out


def dead_letter_value(error: str, reason: str, topic: str, partition: int, offset: int, raw: bytes | None,
                      payload_chars: int = 65_536) -> bytes:
    """The dead-letter event of DESIGN.md (plus a machine-readable `reason`); the original bytes are
    cut to `payload_chars` characters (the full record stays in its topic at `offset`)."""
    return orjson.dumps(dead_letter_event(error, reason, topic, partition, offset,
                                          dead_letter_payload(raw or b"", payload_chars)))


def encode_event(event: JSONObject) -> bytes:
    return orjson.dumps(event)
