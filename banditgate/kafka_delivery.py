"""What a Kafka producer's failure means (pure: no I/O), shared by the gateway and the feedback worker.

A failed delivery is one of three kinds:

* **retriable** — the broker is away, a leader moved, a request timed out: serving the same
  records again can succeed. When the idempotent producer's own state is broken (its sequence
  is out of order, it was fenced or closed: `needs_new_producer`), only a fresh producer can.
* **refused for good** (`refusal()` is not None) — the broker will never take these records:
  too large for the topic (`output_too_large`), an invalid or corrupt record, a timestamp out
  of range, an unknown broker error (`output_refused`), or no permission to write the topic
  (`not_authorized`). Retrying would loop forever.
* anything that is not a Kafka, socket or timeout error is a defect in our code: it is not retried.

Here (not in gateway/ or feedback/) because both use it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidProducerEpoch,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnknownError,
    UnknownProducerId,
)

from banditgate.cloudevents import MAX_HEADER_BYTES

DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
"""Kafka's default `message.max.bytes` (broker) and `max.message.bytes` (topic): the largest record
batch a topic accepts when nobody changed it."""
RECORD_OVERHEAD_BYTES = 100
"""A record batch's 61-byte header plus a record's own framing (attributes, timestamp and offset
deltas, length varints, header count: at most 25 bytes), rounded up: a record of key + value
bytes up to `limit - RECORD_OVERHEAD_BYTES` fits a topic whose batches may be `limit` bytes."""
REQUEST_OVERHEAD_BYTES = 1024
"""A produce request's own framing around its batches (client id, transactional id, topic names)."""

Scope = Literal["record", "topic"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The broker refused records for good: `reason` (a dead-letter reason of banditgate.events)
    and whether it refuses these records only or the whole topic."""

    reason: str
    scope: Scope
    error: str


_REFUSALS: tuple[tuple[type[BaseException], str, Scope], ...] = (
    (MessageSizeTooLargeError, "output_too_large", "record"),
    (RecordListTooLargeError, "output_too_large", "record"),
    (CorruptRecordException, "output_refused", "record"),
    (InvalidTimestampError, "output_refused", "record"),
    # INVALID_RECORD (87) and anything else the client has no class for arrive as UnknownError:
    # retrying an answer nobody can interpret is how the endless rewind began
    (UnknownError, "output_refused", "record"),
    (TopicAuthorizationFailedError, "not_authorized", "topic"),
    (ClusterAuthorizationFailedError, "not_authorized", "topic"),
    (InvalidTopicError, "output_refused", "topic"),
)

_BROKEN_PRODUCER = (OutOfOrderSequenceNumber, ProducerFenced, ProducerClosed, InvalidProducerEpoch, UnknownProducerId)


def refusal(exc: BaseException) -> Refusal | None:
    """The refusal `exc` means, or None when serving the records again can succeed.

    >>> refusal(MessageSizeTooLargeError()).reason
    'output_too_large'
    >>> refusal(TopicAuthorizationFailedError("t")).scope
    'topic'
    >>> from aiokafka.errors import NotLeaderForPartitionError, OutOfOrderSequenceNumber
    >>> refusal(NotLeaderForPartitionError()) is None and refusal(OutOfOrderSequenceNumber()) is None
    True
    """
    for kind, reason, scope in _REFUSALS:
        if isinstance(exc, kind):
            return Refusal(reason, scope, f"{type(exc).__name__}: {exc}"[:300])
    return None


def needs_new_producer(exc: BaseException) -> bool:
    """Whether `exc` leaves the producer that raised it unusable: an idempotent producer whose
    sequence broke, that was fenced, or that is closed fails every later send the same way
    (aiokafka has no KIP-360 epoch bump); a refused batch breaks its partition's sequence too.

    >>> needs_new_producer(OutOfOrderSequenceNumber()) and needs_new_producer(MessageSizeTooLargeError())
    True
    >>> from aiokafka.errors import NotLeaderForPartitionError
    >>> needs_new_producer(NotLeaderForPartitionError()) or needs_new_producer(OSError())
    False
    """
    return isinstance(exc, _BROKEN_PRODUCER) or refusal(exc) is not None


def is_delivery_error(exc: BaseException) -> bool:
    """True for failures of the broker or the network (handled by retrying or dead-lettering); False
    for everything else, a defect that retrying cannot fix."""
    return isinstance(exc, (KafkaError, OSError, TimeoutError))


def record_limit(max_message_bytes: int, max_request_bytes: int) -> int:
    """The largest key + value (bytes) a topic that accepts `max_message_bytes`-byte batches takes
    from a producer whose requests may be `max_request_bytes`, with room for the largest headers
    banditgate puts on a record (banditgate.cloudevents.MAX_HEADER_BYTES: the CloudEvents
    attributes and the trace context), so a record at the limit is never refused for its headers.

    >>> record_limit(1_048_588, 8 * 1024 * 1024)
    1046407
    >>> record_limit(10_000_000, 1_000_000)
    996795
    """
    return max(0, min(max_message_bytes, max_request_bytes - REQUEST_OVERHEAD_BYTES) - RECORD_OVERHEAD_BYTES
               - MAX_HEADER_BYTES)
