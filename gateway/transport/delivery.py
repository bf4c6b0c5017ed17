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

from banditgate.kafka_delivery import (  # the classifier is shared with the feedback worker
    DEFAULT_MAX_MESSAGE_BYTES,
    RECORD_OVERHEAD_BYTES,
    REQUEST_OVERHEAD_BYTES,
    Refusal,
    Scope,
    is_delivery_error,
    needs_new_producer,
    record_limit,
    refusal,
)

BATCH_BYTES = 512 * 1024
"""The gateway's producer batch size (fewer, larger produce requests; measured in kafka_batches)."""
TOPIC_CLOSED_S = 30.0
"""How long a topic the broker refused us for good (authorization) is not written to before one
batch tries again."""

__all__ = ["BATCH_BYTES", "DEFAULT_MAX_MESSAGE_BYTES", "RECORD_OVERHEAD_BYTES", "REQUEST_OVERHEAD_BYTES",
           "TOPIC_CLOSED_S", "Position", "Refusal", "RefusalMemo", "Scope", "batch_bytes", "is_delivery_error",
           "needs_new_producer", "record_limit", "refusal"]


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
