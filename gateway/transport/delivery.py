"""What the broker's answer to a publication means, and what to remember about it (pure: no I/O).

A failed delivery is one of three kinds:

* **retriable** — the broker is away, a leader moved, a request timed out, the idempotent
  producer's sequence broke: serving the same records again with a fresh producer can succeed
  (the Kafka loop rewinds, the exactly-once loop aborts and re-reads, the sidecar publisher
  holds the events and resends).
* **refused for good** (`refusal()` is not None) — the broker will never take these records:
  too large for the topic (`output_too_large`), an invalid or corrupt record, a timestamp out
  of range, an unknown broker error (`output_refused`), or no permission to write the topic
  (`not_authorized`). Retrying would loop forever; the requests are dead-lettered instead.
* anything that is not a Kafka, socket or timeout error is a defect in our code: it is not
  retried (the loop stops and the process exits non-zero).

Refusals are remembered by `RefusalMemo`, keyed by the request's position in its input topic
(so a replay after a rewind dead-letters exactly the refused requests instead of sending them
again), and a topic refused for everyone (authorization) is closed for a while so that not
every batch pays a refusal and a rewind.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnknownError,
)

DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
"""Kafka's default `message.max.bytes` (broker) and `max.message.bytes` (topic): the largest record
batch a topic accepts when nobody changed it."""
BATCH_BYTES = 512 * 1024
"""The gateway's producer batch size (fewer, larger produce requests; measured in kafka_batches)."""
RECORD_OVERHEAD_BYTES = 100
"""A record batch's 61-byte header plus a record's own framing (attributes, timestamp and offset
deltas, length varints, header count: at most 25 bytes), rounded up: a record of key + value
bytes up to `limit - RECORD_OVERHEAD_BYTES` fits a topic whose batches may be `limit` bytes."""
REQUEST_OVERHEAD_BYTES = 1024
"""A produce request's own framing around its batches (client id, transactional id, topic names)."""
TOPIC_CLOSED_S = 30.0
"""How long a topic the broker refused us for good (authorization) is not written to before one
batch tries again."""

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


def is_delivery_error(exc: BaseException) -> bool:
    """True for failures of the broker or the network (handled by retrying or dead-lettering); False
    for everything else, a defect that retrying cannot fix."""
    return isinstance(exc, (KafkaError, OSError, TimeoutError))


def record_limit(max_message_bytes: int, max_request_bytes: int) -> int:
    """The largest key + value (bytes) a topic that accepts `max_message_bytes`-byte batches takes
    from a producer whose requests may be `max_request_bytes`.

    >>> record_limit(1_048_588, 8 * 1024 * 1024)
    1048488
    >>> record_limit(10_000_000, 1_000_000)
    998876
    """
    return max(0, min(max_message_bytes, max_request_bytes - REQUEST_OVERHEAD_BYTES) - RECORD_OVERHEAD_BYTES)


def batch_bytes(limits: dict[str, int]) -> int:
    """The producer's batch size for topics with these record limits: BATCH_BYTES, or less when a
    topic takes smaller batches (a batch of many small records must fit the topic too).

    >>> batch_bytes({"a": 1_048_488, "b": 40_000})
    40100
    """
    smallest = min(limits.values(), default=BATCH_BYTES)
    return max(1024, min(BATCH_BYTES, smallest + RECORD_OVERHEAD_BYTES))


Position = tuple[str, int, int]
"""Where a request came from: (topic, partition, offset)."""


class RefusalMemo:
    """Refusals seen, so that serving the same requests again does not send them again.

    * `refused[position]`: (topic, refusal) - that request's output to `topic` was refused alone;
      a replay dead-letters it with the reason instead of publishing (or, when its dead letter
      was the one refused, drops the dead letter and counts it).
    * `isolated`: requests that were in a refused batch of several records; a replay sends each of
      their outputs in a batch of its own, so the next refusal names the culprit.
    * `closed_topics[topic]`: refused for everyone (authorization) until a time; records for it are
      dead-lettered without sending until then.

    Bounded: at most `max_entries` positions each (oldest forgotten first: a forgotten refusal
    costs one more refusal and rewind, never a wrong answer).
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self.refused: collections.OrderedDict[Position, tuple[str, Refusal]] = collections.OrderedDict()
        self.isolated: collections.OrderedDict[Position, None] = collections.OrderedDict()
        self.closed_topics: dict[str, tuple[Refusal, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.refused or self.isolated or self.closed_topics)

    def learn(self, topic: str, positions: list[Position], found: Refusal, now_s: float) -> None:
        """Record that a batch of `topic` holding the outputs of the requests at `positions` was refused."""
        if found.scope == "topic":
            self.closed_topics[topic] = (found, now_s + TOPIC_CLOSED_S)
            return
        unique = list(dict.fromkeys(positions))
        if len(unique) == 1:
            self._put(self.refused, unique[0], (topic, found))
            self.isolated.pop(unique[0], None)
        else:
            for position in unique:
                self._put(self.isolated, position, None)

    def closed(self, topic: str, now_s: float) -> Refusal | None:
        """The refusal that closed `topic`, while it is closed."""
        entry = self.closed_topics.get(topic)
        if entry is None:
            return None
        if now_s >= entry[1]:
            del self.closed_topics[topic]  # try again: permissions may have been granted meanwhile
            return None
        return entry[0]

    def _put(self, table: collections.OrderedDict, key: Position, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)
