"""Outbound records gathered into per-partition batches (aiokafka's batch API).

Sending a few BatchBuilders instead of one `send()` per message cuts the producer's Python
overhead about threefold (measured: 62 k vs 207 k msg/s here). Partitions follow Kafka's
default partitioner (murmur2 of the key) so predictions stay co-partitioned with outcomes.

Each batch remembers which requests its records answer (`Sent.sources`), so that a batch the
broker refuses for good can be traced to the requests to dead-letter; and a record larger than
its topic accepts is refused here, before anything is sent (`OutputRefused`): sent, the broker
would refuse the whole batch it is in, and the refusal would also break the idempotent
producer's sequence for that partition.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from aiokafka import AIOKafkaProducer

if TYPE_CHECKING:
    from aiokafka.producer.message_accumulator import BatchBuilder

S = TypeVar("S")
"""What a record stands for, handed back with its batch (a request, a queued event...)."""

_NO_HEADERS: list[tuple[str, bytes]] = []
"""Shared, never changed: aiokafka's record builder takes a list (a tuple is refused)."""


_WORDS: dict[int, struct.Struct] = {}
"""Unpackers of n little-endian 32-bit words, per n (keys are at most a few hundred bytes)."""


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of `data` (org.apache.kafka.common.utils.Utils.murmur2; equal to aiokafka's
    `partitioner.murmur2`, tested). Reads the key's 4-byte words in one unpack instead of byte by
    byte: about three times faster, and every prediction, shadow and relayed request is
    partitioned by it."""
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    words = length >> 2
    if words:
        unpack = _WORDS.get(words)
        if unpack is None:
            unpack = struct.Struct(f"<{words}I")
            if words <= 1024:
                _WORDS[words] = unpack
        for k in unpack.unpack_from(data):
            k = (k * m) & 0xFFFFFFFF
            k ^= k >> 24
            h = ((h * m) & 0xFFFFFFFF) ^ ((k * m) & 0xFFFFFFFF)
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partition for `key` (murmur2, as the Java client and aiokafka compute it)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class OutputRefused(ValueError):
    """A record was not queued: its topic would refuse it. `reason` is a dead-letter reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Sent(Generic[S]):
    """One submitted batch: where it went, its delivery future, and the sources of its records."""

    topic: str
    partition: int
    future: asyncio.Future
    sources: list[S | None]
    size: int = 0
    """The batch's bytes as sent (what the broker compares with the topic's max.message.bytes)."""


@dataclass
class OutboundBatches(Generic[S]):
    """Collects records per (topic, partition); `send()` submits them and returns the batches.

    `limits` maps a topic to the largest key + value (bytes) it accepts (topics not in it are not
    checked); `add()` raises OutputRefused for a larger record. A `source` passed with a record
    (e.g. the request it answers) comes back in `Sent.sources`; `alone=True` puts the record in
    a batch of its own (to find which record of a refused batch the broker objects to)."""

    producer: AIOKafkaProducer
    partitions: dict[str, int]  # topic -> partition count
    limits: Mapping[str, int] | None = None
    _builders: dict[tuple[str, int], tuple[BatchBuilder, list[S | None]]] = field(default_factory=dict)
    _full: list[tuple[tuple[str, int], BatchBuilder, list[S | None]]] = field(default_factory=list)
    count: int = 0

    def too_large(self, topic: str, size: int) -> str | None:
        """Why a record of `size` bytes (key + value) cannot go to `topic`, or None if it fits."""
        limits = self.limits
        if limits is not None:
            limit = limits.get(topic)
            if limit is not None and size > limit:
                return f"a {size}-byte output for {topic} is over the {limit} bytes the topic accepts"
        return None

    def add(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None,
            source: S | None = None, alone: bool = False, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Queue one record (no I/O: full builders wait for `send()`). Raises OutputRefused when the
        record is larger than its topic accepts (nothing is queued then). `headers`: the record's
        Kafka headers (the trace context, banditgate.tracecontext), if any."""
        headers = headers or _NO_HEADERS
        limits = self.limits
        if limits is not None:
            limit = limits.get(topic)
            if limit is not None and len(value) + (len(key) if key is not None else 0) > limit:
                raise OutputRefused("output_too_large", self.too_large(topic, len(value) + len(key or b""))
                                    or "output too large")
        if partition is None:
            partition = partition_for(key, self.partitions[topic]) if key is not None else 0
        slot = (topic, partition)
        if alone:
            builder = self.producer.create_batch()
            builder.append(key=key, value=value, timestamp=None, headers=headers)  # the first record always fits
            builder.close()
            self._full.append((slot, builder, [source]))
            self.count += 1
            return
        entry = self._builders.get(slot)
        if entry is None:
            entry = self._builders[slot] = (self.producer.create_batch(), [])
        if entry[0].append(key=key, value=value, timestamp=None, headers=headers) is None:
            entry[0].close()
            self._full.append((slot, entry[0], entry[1]))
            entry = self._builders[slot] = (self.producer.create_batch(), [])
            # an empty builder takes any one record (aiokafka lets the first record exceed the batch size)
            entry[0].append(key=key, value=value, timestamp=None, headers=headers)
        entry[1].append(source)
        self.count += 1

    async def send(self) -> list[Sent]:
        """Submit every builder to the producer; return the submitted batches with their futures."""
        sent: list[Sent] = []
        producer = self.producer
        try:
            for (topic, partition), builder, sources in self._full:
                sent.append(Sent(topic, partition, await producer.send_batch(builder, topic, partition=partition),
                                 sources, builder.size()))
            for (topic, partition), (builder, sources) in self._builders.items():
                builder.close()
                sent.append(Sent(topic, partition, await producer.send_batch(builder, topic, partition=partition),
                                 sources, builder.size()))
        except BaseException:
            # the caller treats the whole lot as failed; the batches already submitted must not
            # leave an exception nobody retrieves
            for batch in sent:
                batch.future.add_done_callback(retrieve_exception)
            raise
        finally:
            self._full.clear()
            self._builders.clear()
        return sent


def retrieve_exception(future: asyncio.Future) -> None:
    """Mark a future's exception as seen (a done callback for futures nobody awaits)."""
    if not future.cancelled():
        future.exception()


async def delivered(sent: list[Sent]) -> list[tuple[Sent, BaseException]]:
    """Wait for every batch's delivery (so none is left with an unretrieved exception); return the
    batches that failed with their exceptions."""
    if not sent:
        return []
    results = await asyncio.gather(*(s.future for s in sent), return_exceptions=True)
    return [(s, r) for s, r in zip(sent, results) if isinstance(r, BaseException)]
