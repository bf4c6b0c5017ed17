"""faust's Kafka consumer with the source topics read in batches (no per-message tasks).

faust-streaming hands every consumed message to its streams one at a time: the drain loop awaits
``wait_first(callback(message), suspend_flow.wait())`` per message (two tasks), then the
conductor, the stream's queue and the agent's buffer — about half of the worker's CPU per event.
This consumer keeps everything else of faust (the consumer group and its partition assignor,
the table, its changelog topic and recovery, rebalancing, the commit timer) and replaces only the
drain loop: records of the *batch topics* (predictions, shadow predictions, outcomes) go, as
fetched, to one batch handler; records of every other topic (the table's changelog during
recovery and standby reads) still take faust's per-message path.

Offsets and rebalances:

* The handler joins a batch and hands back a future for its writes; the next batch is joined
  while those run (at most `WRITES_IN_FLIGHT` batches unwritten; the processor keeps writes in
  order and joins later batches against the unwritten changes). A batch's records are marked done
  (per partition: last offset + 1) only when its future completed, which it does only when the
  batch's effects are in Redis and its entries are in the changelog, and only after every earlier
  batch was marked. faust's commit timer commits done offsets (and only those) for the batch
  topics. A failed write (a bug) marks nothing from that batch on and stops the worker.
* A batch starts only while faust's flow is active and the consumer generation has not changed
  since the fetch; otherwise its records are dropped and the partitions are seeked back to their
  committed offsets (as faust itself does).
* On revocation faust stops the flow and waits for in-flight work (``wait_empty``); here that
  wait includes the batches being joined or written, and the commit that follows includes their
  offsets. So a
  partition's batch is durable and committed before the partition can move to another worker,
  and no batch starts on a partition this worker no longer owns.

Garbage collection: the join table keeps a few objects per pending request (hundreds of
thousands), and every batch creates and drops as many again. With CPython's default thresholds
a batch's survivors were promoted to the oldest generation and triggered full collections that
walked the whole table, again and again: about half of the worker's CPU (py-spy, and a run with
the collector off). :class:`BatchGc` instead pauses automatic collection from a batch's join
until its writes are done (and no other batch is in flight: it stays paused through a sustained
drain), freezing what is left after each join and each write (the table, and any cyclic garbage
of the batch), so later collections skip it; every `full_interval_s` it unfreezes everything and runs one full
collection, so cyclic garbage waits at most that long (measured: tens of milliseconds for a
table of 150 000 requests).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from time import monotonic
from typing import Any, cast

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, TransportT
from faust.types.transports import TPorTopicSet

from feedback.faust_internals import check_faust_internals
from feedback.state import ChangelogRecord

check_faust_internals()  # what this module overrides below exists in the installed faust (one clear error if not)

log = logging.getLogger("banditgate.feedback.consumer")

BatchHandler = Callable[[Sequence[ConsumerRecord]], Awaitable["asyncio.Future[None]"]]
"""Called with aiokafka ConsumerRecords (``topic``, ``partition``, ``offset``, ``key``, ``value``,
``timestamp`` in ms); returns once the batch is joined, with a future that completes when it is
durable (raising on a bug: then nothing from that batch on is marked done)."""

WRITES_IN_FLIGHT = 2
"""Batches joined but not yet durable: the next batch is joined while the last one is written."""


ChangelogApplier = Callable[[int, Sequence[ChangelogRecord]], None]
"""Writes recovered changelog records (aiokafka ConsumerRecords of one partition, in offset order)
into the join table's store."""


class BatchSource:
    """What the consumer needs from the worker: the batch topics, how long a fetch may wait on
    the broker, the handler (set at start), and the join changelog's bulk recovery."""

    def __init__(self, topics: frozenset[str], fetch_max_wait_ms: int = 50, changelog_topic: str | None = None,
                 apply_changelog: ChangelogApplier | None = None) -> None:
        self.topics = topics
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.changelog_topic = changelog_topic
        self.apply_changelog = apply_changelog
        self.handler: BatchHandler | None = None
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] = lambda exc: None

    def start(self, handler: BatchHandler) -> None:
        self.handler = handler
        self.ready.set()


class BatchGc:
    """Garbage collection paced by batches (see the module docstring): paused from a batch's join
    until its writes are done and no other batch is in flight (`before` ... `checkpoint` after each
    step ... `after`)."""

    def __init__(self, full_interval_s: float = 60.0, clock: Callable[[], float] = monotonic) -> None:
        self._full_interval_s = full_interval_s
        self._clock = clock
        self._last_full = clock()

    def before(self) -> None:
        gc.disable()

    def checkpoint(self) -> None:
        """Freeze what is alive now, so later collections skip it (collection stays as it is);
        every `full_interval_s` first unfreeze everything and collect it in full."""
        if self._clock() - self._last_full >= self._full_interval_s:
            gc.unfreeze()
            gc.collect()
            self._last_full = self._clock()
        gc.freeze()

    def after(self) -> None:
        """Nothing in flight: automatic collection on again (of what is not frozen)."""
        gc.enable()
        self.checkpoint()


class BatchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, with the broker's fetch wait from `BatchSource.fetch_max_wait_ms`
    instead of faust's fixed 1500 ms.

    aiokafka keeps one fetch request in flight per broker, for the partitions that have no
    fetched records left. When those are partitions with nothing new (an idle topic: shadow
    predictions of a route without shadows, or a topic read to its end) the broker holds the
    request for the whole wait, and no partition on that broker is fetched meanwhile: the
    worker ran out of records for a quarter to half a second, five or six times per 150 000 outcomes
    (measured: 14,000 joined outcomes/s with faust's 1500 ms, 16,000 with 50 ms)."""

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # pragma: no cover - an aiokafka we were not tested with
            raise RuntimeError("this aiokafka version has no AIOKafkaConsumer._fetch_max_wait_ms; "
                               "install the version in constraints.txt")
        consumer._fetch_max_wait_ms = cast(Any, self.app).batch_source.fetch_max_wait_ms  # Any: faust types .app as AppT (no batch_source)
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, with the batch topics drained in batches (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # Any: passed on to faust's Consumer.__init__ (**kwargs: Any)
        super().__init__(*args, **kwargs)
        self._done: dict[TP, int] = {}
        self._batch_idle = asyncio.Event()
        self._batch_idle.set()
        self._gc = BatchGc()
        self._joining = False
        """A batch is in the handler (being joined): collection stays paused."""
        self._writing: collections.deque[tuple[asyncio.Future[None], dict[TP, int]]] = collections.deque()
        """Joined batches still being written, in order, with their end offsets."""

    def _settle_writes(self) -> None:
        """Mark done the offsets of the written prefix of batches (in order); stop at a failure."""
        inbound = self.app.monitor.stream_inbound_time
        writing = self._writing
        while writing and writing[0][0].done():
            written, ends = writing[0]
            failure = written.exception() if not written.cancelled() else asyncio.CancelledError()
            if failure is not None:
                if isinstance(failure, asyncio.CancelledError):
                    self._batch_idle.set()  # stopping: nothing more will be written
                else:
                    self._fail(failure)
                return  # this batch and every later one stay unmarked: replayed after the restart
            writing.popleft()
            self._gc.checkpoint()
            now = monotonic()
            done = self._done
            for tp, end in ends.items():
                # a batch re-read after a seek may end before one written meanwhile: never go back
                if end > done.get(tp, -1):
                    done[tp] = end
                inbound[tp] = now  # faust's livelock detector reads this
        # idle: nothing joined-but-unwritten and no batch in the handler (a write finishing while
        # the next batch is being joined must not let a rebalance proceed mid-join)
        idle = not writing and not self._joining
        if idle:
            self._gc.after()
        if idle or self._source.failed is not None:
            self._batch_idle.set()

    def _fail(self, exc: BaseException) -> None:
        source = self._source
        if source.failed is None:
            source.failed = exc
            source.on_failure(exc)
        self._batch_idle.set()

    def _new_consumer_thread(self) -> BatchConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def _source(self) -> BatchSource:
        return cast(Any, self.app).batch_source  # Any: faust types Consumer.app as AppT (no batch_source)

    # -- commits: done offsets of the batch topics ------------------------------------------
    def _filter_tps_with_pending_acks(self, topics: TPorTopicSet | None = None) -> Iterator[TP]:
        yield from super()._filter_tps_with_pending_acks(topics)
        for tp in list(self._done):
            if topics is None or tp in topics or tp.topic in topics:
                yield tp

    def _new_offset(self, tp: TP) -> int | None:
        if tp.topic in self._source.topics:
            return self._done.get(tp)
        return super()._new_offset(tp)

    # -- rebalancing: finish the batch in flight first --------------------------------------
    async def wait_empty(self) -> None:
        await self._batch_idle.wait()
        await super().wait_empty()

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await self._batch_idle.wait()
        await super().on_partitions_revoked(revoked)
        for tp in revoked:
            self._done.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        for tp in [tp for tp in self._done if tp not in assigned]:
            self._done.pop(tp, None)
        await super().on_partitions_assigned(assigned, generation_id)

    # -- recovery -----------------------------------------------------------------------------
    def _recover_in_bulk(self, tp: TP, records: Sequence[ConsumerRecord]) -> bool:
        """Apply the join changelog's records (recovery of an active partition, or a standby's)
        straight to the table's store, as faust's recovery would, and advance faust's recovery
        offsets; False for anything else (faust's path).

        faust hands each changelog record through its conductor, a queue and an
        ``asyncio.wait_for`` per record to its recovery loop, which applies them 1 000 at a time:
        about 4 700 records/s here (a 1 GiB table took 3.5 minutes to recover). Here a fetch's
        records are written at once, in order; faust's recovery service sees its offsets reach
        the highwater and ends the recovery as it would (this ends it at once instead of at its
        5 s idle check)."""
        source = self._source
        if source.apply_changelog is None or tp.topic != source.changelog_topic:
            return False
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        now = monotonic()
        if tp in recovery.active_tps:
            offsets = recovery.active_offsets
            recovery._active_events_received_at[tp] = now  # faust's "no events" warnings read these
        elif tp in recovery.standby_tps:
            offsets = recovery.standby_offsets
            recovery._standby_events_received_at[tp] = now
        else:
            return False
        seen = offsets.get(tp)
        if seen is not None and records[0].offset <= seen:
            records = [r for r in records if r.offset > seen]
        if not records:
            return True
        source.apply_changelog(tp.partition, records)
        offsets[tp] = records[-1].offset
        if recovery.in_recovery and not recovery.need_recovery():
            # what faust's recovery loop does when it finds the actives up to date
            recovery.flush_buffers()
            recovery._set_recovery_ended()
            recovery.signal_recovery_end.set()
        return True

    async def _seek_back(self, records: Mapping[TP, Sequence[ConsumerRecord]]) -> None:
        """Records fetched but not processed (the flow stopped, or the generation changed) are
        read again. The batch topics go back to their committed offsets (as faust does); any
        other partition (the changelog) goes back to the first record dropped: it has no committed
        offset, so faust's seek left it past them, and a recovery that had already sought there
        waited for them forever (seen once in four runs of a rebalance)."""
        batch_topics = self._source.topics
        for tp, tp_records in records.items():
            if tp.topic not in batch_topics and tp_records:
                try:
                    await self.seek(tp, tp_records[0].offset)
                except (IllegalStateError, AssertionError):
                    pass  # no longer assigned: nothing to read again
        await self.perform_seek()

    async def _stale_sought_back(self, generation: int, records: Mapping[TP, Sequence[ConsumerRecord]] | None = None) -> bool:
        """False while records fetched in consumer `generation` may still be processed (faust's
        flow is active and no rebalance began since). Otherwise they are dropped and read again
        later: True, after seeking back - with `records` (nothing of them processed yet) as
        `_seek_back` says, without (only the batch topics' records were left) to the committed
        offsets, as faust does."""
        if self.flow_active and generation == self.app.consumer_generation_id:
            return False
        if records is None:
            await self.perform_seek()
        else:
            await self._seek_back(records)
        return True

    # -- the drain loop ---------------------------------------------------------------------
    async def _drain_messages(  # pragma: no cover - exercised by the worker tests
            self, fetcher: Any) -> None:  # Any: faust types it ServiceT, which lacks the Fetcher's _stopped
        source = self._source
        batch_topics = source.topics
        callback = self.callback
        to_message = self._to_message
        read_offset = self._read_offset
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                generation = self.app.consumer_generation_id
                records, _active = await self._wait_next_records(1.0)
                if not records or self.should_stop:
                    await asyncio.sleep(0)
                    continue
                if await self._stale_sought_back(generation, records):
                    continue  # re-read what was fetched but not processed
                batch: list[ConsumerRecord] = []
                ends: dict[TP, int] = {}
                for tp, tp_records in records.items():
                    first = read_offset[tp]
                    if first is not None and tp_records and tp_records[0].offset < first:
                        tp_records = [r for r in tp_records if r.offset >= first]
                    if not tp_records:
                        continue
                    read_offset[tp] = tp_records[-1].offset + 1
                    if tp.topic in batch_topics:
                        batch.extend(tp_records)
                        ends[tp] = tp_records[-1].offset + 1
                    elif not self._recover_in_bulk(tp, tp_records):
                        for record in tp_records:  # other topics: faust's own path
                            await callback(to_message(tp, record))
                if not batch:
                    continue
                if source.handler is None:
                    await source.ready.wait()  # the worker's clients are still starting
                    if await self._stale_sought_back(generation):
                        continue
                handler = cast(BatchHandler, source.handler)
                if len(self._writing) >= WRITES_IN_FLIGHT:
                    await asyncio.wait([self._writing[0][0]])
                    if await self._stale_sought_back(generation):
                        continue  # a rebalance began meanwhile: re-read this batch later
                if source.failed is not None:
                    await asyncio.Event().wait()  # stopping; nothing from the failed batch on is marked done
                self._batch_idle.clear()
                self._gc.before()
                self._joining = True
                try:
                    written = await handler(batch)
                except asyncio.CancelledError:
                    self._joining = False
                    self._gc.after()
                    self._settle_writes()
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug: nothing of this batch is marked done
                    self._joining = False
                    self._gc.after()
                    self._fail(exc)
                    await asyncio.Event().wait()  # stopping; everything from this batch on stays uncommitted
                # collection stays paused while the batch is written (planning, Redis replies and
                # the changelog allocate as much as the join): measured +15 us CPU per outcome
                # with it on during the writes
                self._joining = False
                self._gc.checkpoint()
                self._writing.append((written, ends))
                written.add_done_callback(lambda _: self._settle_writes())
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                log.info("broker stopped the consumer, shutting down")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class FeedbackApp(faust.App):
    """A faust App whose consumer drains `batch_source.topics` in batches."""

    batch_source: BatchSource

    def _new_transport(self) -> TransportT:
        return BatchTransport(self.conf.broker_consumer, self)
