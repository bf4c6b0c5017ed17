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

When a transaction fails (the broker went away, a batch expired, the coordinator timed the
transaction out, another producer with our id fenced us, the broker refused an output): nothing
of it is visible and its offset is not committed. The partition's producer is replaced (the new
one's `init_transactions` aborts what is left of the transaction and fences the old producer, so
no stale write can join a later transaction; it also starts fresh sequence numbers, which a failed
send leaves broken), then the consumer is sought back and the batch served again. Why that is
exact, given aiokafka's fetcher (consumer/fetcher.py, 0.12-0.14):

* `seek()` is synchronous: it sets the position and drops the records buffered for the
  partition; a fetch response still in flight is discarded when its fetch offset is not the new
  position, and a buffered result is not returned once the position moved. So every record
  `getmany()` returns after the seek starts at the new position.
* `getmany()` stamps nothing; `run()` stamps each fetched batch with the partition's
  `generation` in the same step as `getmany()` returned it (no await in between), and
  `_seek_back` bumps the generation in the same step as it seeks (no await in between). So a
  batch carries the old generation if and only if it was fetched before the seek, and is
  dropped; the ones fetched after carry the new one and start at the seek target.
* Batches of a partition run one at a time in fetch order (a FIFO lock), and the generation is
  checked under that lock; the failed batch holds the lock until it has sought back. So the
  committed offset only ever advances over batches that were served, once each.
* The seek target is where the failed batch began, or the group's committed offset if that is
  later (another producer with our id committed after fencing us). It is read after the new
  producer's `init_transactions` returned, when no earlier transaction of this id is pending.

Re-acquiring happens with backoff (0.2 s doubling to 5 s) while the partition is still assigned,
not being revoked, and the loop not stopping; otherwise the batch is simply dropped: whoever owns
the partition next starts at the committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalOperation, KafkaError, ProducerFenced

from banditgate.config import Config
from banditgate.connections import kafka_client_kwargs
from banditgate.tracing import Tracing
from gateway.dataplane import Dataplane
from gateway.metrics import GatewayMetrics
from gateway.transport.delivery import is_delivery_error, refusal
from gateway.transport.kafka_batches import OutboundBatches, delivered
from gateway.transport.kafka_loop import KafkaLoop, LoopSource, PublicationFailed
from gateway.transport.kafka_trace import BatchTrace
from gateway.transport.shared_producer import close_producer

log = logging.getLogger("banditgate.kafka")

START_TIMEOUT_S = 30.0
"""How long starting a transactional producer (metadata, coordinator, InitProducerId) may take."""
T = TypeVar("T")
BACKOFF_S = (0.2, 5.0)
"""First and longest wait between two attempts to (re-)acquire a partition's producer."""


async def _in_transaction(step: Awaitable[T]) -> T:
    """Await one step of a transaction. A producer whose sender stopped mid-transaction (fenced,
    or a fatal broker answer) leaves its transaction state, and aiokafka's state machine then
    refuses the next step with IllegalOperation or an assertion: to us that is a failed
    transaction (the producer is replaced), not a defect."""
    try:
        return await step
    except (IllegalOperation, AssertionError) as exc:
        raise KafkaError(f"the transactional producer left its transaction ({type(exc).__name__}: {exc})") from exc


class _TransactionalRebalance(ConsumerRebalanceListener):
    def __init__(self, loop: TransactionalKafkaLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.loop.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.loop.acquire(assigned)


class TransactionalKafkaLoop(KafkaLoop):
    """The Kafka loop in `delivery: exactly_once` mode."""

    def __init__(self, config: Config, dataplane: Dataplane, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic, tracing: Tracing | None = None) -> None:
        super().__init__(config, dataplane, metrics, clock, tracing)
        self.transactional: dict[TopicPartition, AIOKafkaProducer] = {}
        self.locks: dict[TopicPartition, asyncio.Lock] = {}
        self.generation: dict[TopicPartition, int] = {}
        """Bumped with every seek back and revocation: batches fetched before carry an older one."""
        self._releasing: set[TopicPartition] = set()
        self._abandoned: set[TopicPartition] = set()
        """Partitions whose failed transaction could not be sought back to (revoked or stopping
        meanwhile): none of their batches is served again until they are assigned anew (a new
        assignment starts at the committed offset)."""
        self._tasks: set[asyncio.Task] = set()

    def _listener(self) -> ConsumerRebalanceListener:
        return _TransactionalRebalance(self)

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.config.kafka.group_id}.{tp.topic}.{tp.partition}"

    async def _start_transactional(self, tp: TopicPartition) -> AIOKafkaProducer:
        """Start tp's transactional producer; its InitProducerId fences any other producer with the
        id and aborts that producer's open transaction. Raises KafkaError/OSError/TimeoutError."""
        kafka = self.config.kafka
        producer = AIOKafkaProducer(**kafka_client_kwargs(kafka), transactional_id=self.transactional_id(tp),
                                    enable_idempotence=True, acks="all", linger_ms=kafka.linger_ms,
                                    max_batch_size=self.shared.batch_bytes, max_request_size=kafka.max_request_bytes,
                                    transaction_timeout_ms=kafka.transaction_timeout_ms,
                                    request_timeout_ms=30_000)
        try:
            await asyncio.wait_for(producer.start(), START_TIMEOUT_S)
        except BaseException:
            await close_producer(producer, 1.0)
            raise
        return producer

    def _may_retry(self, tp: TopicPartition) -> bool:
        """Whether to keep trying to (re-)acquire tp's producer: still ours and the loop running."""
        return (self.consumer is not None and tp in self.consumer.assignment() and tp not in self._releasing
                and not self._should_stop())

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, less if the loop is told to stop meanwhile."""
        if self._stopping is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def acquire(self, assigned: list[TopicPartition]) -> None:
        """Start (and so fence any previous owner of) one transactional producer per new partition. A
        partition whose producer cannot start now gets it from its first batch (with backoff)."""
        self._abandoned.difference_update(assigned)  # a new assignment starts at the committed offset
        new = [tp for tp in assigned if tp not in self.transactional]
        for tp in new:
            self.locks.setdefault(tp, asyncio.Lock())
        started = await asyncio.gather(*(self._start_transactional(tp) for tp in new), return_exceptions=True)
        for tp, result in zip(new, started):
            if isinstance(result, BaseException):
                if not is_delivery_error(result):
                    raise result
                log.warning("exactly-once: no transactional producer for %s[%d] yet (%s); its first batch tries again",
                            tp.topic, tp.partition, type(result).__name__)
            else:
                self.transactional[tp] = result
        log.info("exactly-once: transactional producers for %s",
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "no partitions")

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Finish the revoked partitions' transactions, then stop their producers."""
        self._releasing.update(revoked)  # a transaction being redone gives up instead of retrying
        try:
            await self.finish_in_flight()
        finally:
            for tp in revoked:
                self.generation[tp] = self.generation.get(tp, 0) + 1
                self._abandoned.discard(tp)
                producer = self.transactional.pop(tp, None)
                if producer is not None:
                    await close_producer(producer)
            self._releasing.difference_update(revoked)

    async def run(self, stopping: asyncio.Event) -> None:
        assert self.consumer is not None  # noqa: S101
        self._stopping = stopping
        limit = self.config.batching.max_in_flight_batches * 4
        while not stopping.is_set():
            while len(self._tasks) >= limit or (self._tasks and not self._queues_have_room()):
                if stopping.is_set() or self._fatal is not None:
                    break
                self.metrics.paused.inc()
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED, timeout=0.05)
            self._raise_fatal()
            if stopping.is_set():
                break
            fetched = await self.consumer.getmany(timeout_ms=100, max_records=self.config.kafka.max_poll_records)
            # stamped in the same step as getmany returned them: see the module docstring
            for tp, records in fetched.items():
                task = asyncio.get_running_loop().create_task(
                    self._transact(tp, records, self.generation.get(tp, 0)))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
            await self._update_lag()
        self._raise_fatal()

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._fatal is None:
            self._fatal = task.exception()  # a defect in our code: run() raises it

    async def _transact(self, tp: TopicPartition, records: list, generation: int) -> None:
        """One transaction: this partition's outputs and its consumer offset, or nothing."""
        async with self.locks.setdefault(tp, asyncio.Lock()):
            if self.generation.get(tp, 0) != generation or tp in self._abandoned:
                return  # fetched before a seek back or a revocation: these records are read again
            producer = await self._producer_for(tp)
            if producer is None or self.generation.get(tp, 0) != generation:
                return  # no longer ours (or stopping): the next owner starts at the committed offset
            # tracing: the batch's spans (gateway.produce: sending until the transaction commits)
            traced = BatchTrace(self.tracing, len(records), self.clock) if self.tracing.enabled else None
            error: BaseException | None = None
            try:
                await _in_transaction(producer.begin_transaction())
                out: OutboundBatches[LoopSource] = OutboundBatches(producer, self.partitions, self.shared.limits)
                await self._serve_records(records, out, traced)
                if traced is not None:
                    traced.producing(out.count)
                failures = await delivered(await _in_transaction(out.send()))
                if failures:
                    self._learn_refusals(failures)
                    raise PublicationFailed(producer, failures[0][1])
                await _in_transaction(producer.send_offsets_to_transaction({tp: records[-1].offset + 1},
                                                                           self.config.kafka.group_id))
                await _in_transaction(producer.commit_transaction())
            except Exception as exc:
                error = exc
                if not isinstance(exc, PublicationFailed) and not is_delivery_error(exc):
                    raise  # a defect in our code, not the broker's doing: the loop stops on it
                await self._redo(tp, producer, records[0].offset,
                                 exc.cause if isinstance(exc, PublicationFailed) else exc)
            except BaseException as exc:  # cancelled (a revocation, shutdown): the spans say so
                error = exc
                raise
            finally:
                if traced is not None:
                    traced.end(error)

    async def _producer_for(self, tp: TopicPartition) -> AIOKafkaProducer | None:
        """The partition's producer, started now (with backoff) if it has none; None once the
        partition is no longer ours or the loop stops."""
        producer = self.transactional.get(tp)
        if producer is not None:
            return producer
        return await self._acquire_with_backoff(tp)

    async def _acquire_with_backoff(self, tp: TopicPartition) -> AIOKafkaProducer | None:
        delay, longest = BACKOFF_S
        first = True
        while self._may_retry(tp):
            try:
                producer = await self._start_transactional(tp)
            except Exception as exc:
                if not is_delivery_error(exc):
                    raise
                if first:
                    log.warning("exactly-once: cannot start the transactional producer for %s[%d] (%s); retrying "
                                "with backoff while the partition is ours", tp.topic, tp.partition, type(exc).__name__)
                    first = False
                await self._pause(delay)
                delay = min(delay * 2, longest)
                continue
            if not first:
                log.info("exactly-once: transactional producer for %s[%d] started", tp.topic, tp.partition)
            self.transactional[tp] = producer
            return producer
        return None

    async def _redo(self, tp: TopicPartition, failed: AIOKafkaProducer, first_offset: int, cause: BaseException) -> None:
        """A transaction of tp failed: replace tp's producer and seek back (module docstring)."""
        assert self.consumer is not None  # noqa: S101
        found = refusal(cause)
        kind = "fenced" if isinstance(cause, ProducerFenced) else "refused" if found is not None else "failed"
        self.metrics.transaction_failures.labels(kind).inc()
        log.warning("exactly-once: transaction for %s[%d] %s (%s: %s); nothing of it is visible; re-reading from "
                    "offset %d with a new transactional producer", tp.topic, tp.partition, kind,
                    type(cause).__name__, str(cause)[:200], first_offset)
        if self.transactional.get(tp) is failed:
            del self.transactional[tp]
        await close_producer(failed, 1.0)
        if await self._acquire_with_backoff(tp) is not None:
            target = await self._seek_target(tp, first_offset)
            if target is not None and tp in self.consumer.assignment():
                self._seek_back(tp, target)
                return
        # no longer ours, or stopping: without a seek the position is past the failed batch, so no
        # later batch of this partition may be committed (its next owner starts at the committed offset)
        self._abandoned.add(tp)

    async def _seek_target(self, tp: TopicPartition, first_offset: int) -> int | None:
        """Where to re-read tp from: where the failed batch began, or the committed offset if another
        producer with our id committed past it. None when the partition stopped being ours first."""
        assert self.consumer is not None  # noqa: S101
        delay, longest = BACKOFF_S
        while self._may_retry(tp):
            try:
                committed = await asyncio.wait_for(self.consumer.committed(tp), self.config.kafka.request_timeout_ms / 1000)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("exactly-once: cannot read %s[%d]'s committed offset yet (%s)", tp.topic, tp.partition,
                            type(exc).__name__)
                await self._pause(delay)
                delay = min(delay * 2, longest)
                continue
            return first_offset if committed is None else max(first_offset, committed)
        return None

    def _seek_back(self, tp: TopicPartition, offset: int) -> None:
        """Seek tp to `offset` and bump its generation in one step (no await in between: a batch
        fetched before the seek is then exactly one with an older generation)."""
        assert self.consumer is not None  # noqa: S101
        self.generation[tp] = self.generation.get(tp, 0) + 1
        self.consumer.seek(tp, offset)

    async def finish_in_flight(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _close_transactional(self) -> None:
        producers = list(self.transactional.values())
        self.transactional.clear()
        await asyncio.gather(*(close_producer(p, 2.0) for p in producers))

    async def stop(self) -> None:
        try:
            await self.finish_in_flight()
        finally:
            await self._close_transactional()
            await super().stop()

    async def close_now(self, timeout_s: float = 5.0) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._close_transactional()  # an open transaction is aborted by the partition's next owner
        await super().close_now(timeout_s)
