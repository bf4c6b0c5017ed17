"""Exactly-once delivery: Kafka transactions per consume-transform-produce cycle.

aiokafka has no KIP-447 (no consumer-group-aware fencing), so fencing is by transactional id:
one transactional producer per assigned *input partition*, with the id
`<group_id>.<requests topic>.<partition>`. Whichever replica owns a partition owns its id;
when a rebalance moves the partition, the new owner's `init_transactions` bumps the epoch,
which aborts the old owner's open transaction and fences it (any later write from a zombie
fails with ProducerFenced). Each fetched batch of one partition is one transaction holding its
predictions, shadow predictions, dead-letters *and* the consumer offsets
(`send_offsets_to_transaction`), so a `read_committed` reader sees every request exactly once.
The cost: one producer (one connection, one transaction coordinator entry) per partition the
replica owns, and a commit round trip per batch per partition.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from banditgate.connections import kafka_client_kwargs
from gateway.transport.kafka_batches import OutboundBatches
from gateway.transport.kafka_loop import KafkaLoop

log = logging.getLogger("banditgate.kafka")


class _TransactionalRebalance(ConsumerRebalanceListener):
    def __init__(self, loop: "TransactionalKafkaLoop") -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.loop.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.loop.acquire(assigned)


class TransactionalKafkaLoop(KafkaLoop):
    """The Kafka loop in `delivery: exactly_once` mode."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.transactional: dict[TopicPartition, AIOKafkaProducer] = {}
        self.locks: dict[TopicPartition, asyncio.Lock] = {}
        self.generation: dict[TopicPartition, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def _listener(self) -> ConsumerRebalanceListener:
        return _TransactionalRebalance(self)

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.config.kafka.group_id}.{tp.topic}.{tp.partition}"

    async def acquire(self, assigned: list[TopicPartition]) -> None:
        """Start (and so fence any previous owner of) one transactional producer per new partition."""
        kafka = self.config.kafka
        for tp in assigned:
            if tp in self.transactional:
                continue
            producer = AIOKafkaProducer(**kafka_client_kwargs(kafka), transactional_id=self.transactional_id(tp),
                                        enable_idempotence=True, acks="all", linger_ms=kafka.linger_ms,
                                        max_batch_size=512 * 1024, max_request_size=kafka.max_request_bytes,
                                        transaction_timeout_ms=kafka.transaction_timeout_ms,
                                        request_timeout_ms=30_000)
            await producer.start()
            self.transactional[tp] = producer
            self.locks.setdefault(tp, asyncio.Lock())
        log.info("exactly-once: transactional producers for %s",
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "no partitions")

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Finish the revoked partitions' transactions, then stop their producers."""
        await self.finish_in_flight()
        for tp in revoked:
            self.generation[tp] = self.generation.get(tp, 0) + 1
            producer = self.transactional.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def run(self, stopping: asyncio.Event) -> None:
        assert self.consumer is not None  # noqa: S101
        limit = self.config.batching.max_in_flight_batches * 4
        while not stopping.is_set():
            while len(self._tasks) >= limit or (self._tasks and not self._queues_have_room()):
                self.metrics.paused.inc()
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED, timeout=0.05)
            fetched = await self.consumer.getmany(timeout_ms=100, max_records=self.config.kafka.max_poll_records)
            for tp, records in fetched.items():
                task = asyncio.get_running_loop().create_task(
                    self._transact(tp, records, self.generation.get(tp, 0)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await self._update_lag()

    async def _transact(self, tp: TopicPartition, records: list, generation: int) -> None:
        """One transaction: this partition's outputs and its consumer offset, or nothing."""
        async with self.locks.setdefault(tp, asyncio.Lock()):
            producer = await self._producer_for(tp)
            if producer is None or self.generation.get(tp, 0) != generation:
                # revoked (its new owner starts at the committed offset) or rewound (the consumer
                # was sought back to it): either way these records will be read again
                return
            try:
                await producer.begin_transaction()
                out = OutboundBatches(producer, self.partitions)
                await self._serve_records(records, out)
                futures = await out.send()
                if futures:
                    await asyncio.gather(*futures)
                await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, self.config.kafka.group_id)
                await producer.commit_transaction()
            except ProducerFenced:
                log.warning("partition %s[%d] is now owned by another replica (fenced); dropping its batch",
                            tp.topic, tp.partition)
                self.generation[tp] = generation + 1
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                log.error("transaction for %s[%d] failed (%s); aborting and re-reading from the committed offset",
                          tp.topic, tp.partition, type(exc).__name__)
                self.generation[tp] = generation + 1
                await self._abort_and_rewind(producer, tp)

    async def _producer_for(self, tp: TopicPartition) -> AIOKafkaProducer | None:
        """The partition's producer; records can arrive while the rebalance callback still starts it."""
        while True:
            producer = self.transactional.get(tp)
            if producer is not None:
                return producer
            if self.consumer is None or tp not in self.consumer.assignment():
                return None
            await asyncio.sleep(0.01)

    async def _abort_and_rewind(self, producer: AIOKafkaProducer, tp: TopicPartition) -> None:
        assert self.consumer is not None  # noqa: S101
        try:
            await producer.abort_transaction()
        except KafkaError as exc:
            log.warning("abort of %s[%d]'s transaction failed (%s); restarting its producer", tp.topic, tp.partition,
                        type(exc).__name__)
            await producer.stop()
            self.transactional.pop(tp, None)
            await self.acquire([tp])
        if tp in self.consumer.assignment():
            committed = await self.consumer.committed(tp)
            if committed is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
        await asyncio.sleep(0.5)

    async def finish_in_flight(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def stop(self) -> None:
        try:
            await self.finish_in_flight()
        finally:
            for producer in self.transactional.values():
                await producer.stop()
            self.transactional.clear()
            await super().stop()
