"""Per-model asyncio batcher: queue, flush by size or delay, run ONNX Runtime in a thread pool.

Exception: a batch of a few rows of a model measured to answer in under `inline_max_us` runs on
the event loop itself, because handing it to a thread costs more than running it; the loop is
never held longer than that measured time. The dataplane turns this on only where the process has
a single CPU (see docs/gateway.md, Micro-batching).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnxruntime as ort

from gateway.batching.circuit import CircuitPolicy, ModelCircuit
from gateway.batching.merge import Feeds, concat_feeds, concat_outputs, slice_feeds, split_results
from gateway.batching.policy import BatchPolicy
from gateway.batching.runs import INLINE_WATCH, Terminated, groups, one_line, run_slices, timed_run
from gateway.errors import InferenceFailed, ModelUnavailable, Overloaded
from gateway.models.onnx_runtime import OnnxModel, run_options

log = logging.getLogger("banditgate.batching")


INLINE_MAX_ROWS = 8
"""Batches up to this many rows may run on the event loop (see ModelBatcher._runs_inline)."""


@dataclass
class RowsResult:
    """Outputs for one submitted item: rows for the ok rows only; `errors` maps row → message."""

    outputs: Feeds
    ok: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_rows: int = 0


@dataclass
class _Item:
    feeds: Feeds
    rows: int
    enqueued_s: float
    future: asyncio.Future


@dataclass(eq=False)
class _Batch:
    """One flushed batch (or a probe) on its way through the pool."""

    items: list[_Item]
    rows: int
    model: OnnxModel
    started: float
    slices: list[tuple[int, int]] = field(default_factory=list)
    parts: list = field(default_factory=list)
    groups: list[range] = field(default_factory=list)  # slice indices per pool task
    options: list[ort.RunOptions] = field(default_factory=list)  # per pool task: terminated at the timeout
    run_times: list[list[float | None]] = field(default_factory=list)  # [started, finished] per pool task,
    # written by its thread (runs.run_slices)
    remaining: int = 0
    timer: asyncio.TimerHandle | None = None
    ended: bool = False
    probe: bool = False


def _back_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], batch: _Batch, index: int,
                  future: Future) -> None:
    """Done-callback of a pool future (runs in the worker thread): continue on the event loop."""
    try:
        loop.call_soon_threadsafe(callback, batch, index, future)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


class ModelBatcher:
    """Batches rows for one model version; `model` may be swapped at any time (hot reload).

    A batch that outlives `timeout_s` is ended (its runs are terminated) and fails with
    ModelUnavailable; the model is then unavailable and isolated as `gateway.batching.circuit`
    describes: its rows fail at once until a probe answers in time, and it never holds more than
    its share of the pool's threads.
    """

    def __init__(self, model: OnnxModel, executor: Executor, policy: BatchPolicy, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 observe: Callable[[OnnxModel, int, float, float], None] | None = None,
                 inline_max_us: int = 0, circuit: CircuitPolicy = CircuitPolicy()) -> None:
        self.model = model
        self.executor = executor
        self.policy = policy
        self.timeout_s = timeout_s
        self.clock = clock
        self.observe = observe
        self._pending: list[_Item] = []
        self._pending_rows = 0
        self._in_flight_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._capacity = asyncio.Event()
        self._capacity.set()
        self.circuit = ModelCircuit(circuit)
        self.last_error: str | None = None
        self.inline_max_us = inline_max_us
        self._timed_model: OnnxModel | None = None
        self._small_batch_us: float | None = None
        """Recent run time of batches of up to INLINE_MAX_ROWS rows (EWMA, microseconds)."""

    @property
    def healthy(self) -> bool:
        """False while the model is unavailable (its circuit is open or a probe runs)."""
        return self.circuit.available

    @property
    def queued_rows(self) -> int:
        """Rows waiting or being inferred."""
        return self._pending_rows + self._in_flight_rows

    def admits(self, rows: int) -> bool:
        return self.policy.admits(self.queued_rows, rows)

    async def wait_for_capacity(self, rows: int) -> None:
        """Wait until `rows` more rows fit (backpressure for the Kafka loop)."""
        while not self.admits(rows):
            self._capacity.clear()
            await self._capacity.wait()

    def submit(self, feeds: Feeds, rows: int, reject_when_full: bool = False, defer: bool = False) -> asyncio.Future:
        """Queue `rows` rows; the future resolves to a RowsResult (or raises InferenceFailed, or
        ModelUnavailable). Raises ModelUnavailable at once while the model is unavailable, and
        Overloaded when `reject_when_full` and the queue is full.

        `defer`: queue only; the caller submits more rows now and then calls `kick()`, so rows
        that arrived together (a burst of gRPC calls handed to the loop at once) can share a batch
        instead of the first one running alone on an idle model."""
        now = self.clock()
        circuit = self.circuit
        if circuit.state != "closed" and not circuit.accepts(now):
            raise self._unavailable(now)
        if reject_when_full and not self.admits(rows):
            raise Overloaded(f"model {self.model.key} has {self.queued_rows} rows queued "
                             f"(limit {self.policy.max_queue_rows}); retry shortly", retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        item = _Item(feeds, rows, now, loop.create_future())
        self._pending.append(item)
        self._pending_rows += rows
        if defer:
            return item.future
        if self.policy.flush_now(self._pending_rows, self._pending[0].enqueued_s, now, self._in_flight_rows > 0):
            self._flush()
        elif self._timer is None:
            delay = max(0.0, self.policy.deadline_s(self._pending[0].enqueued_s) - now)
            self._timer = loop.call_later(delay, self._flush)
        return item.future

    def kick(self) -> None:
        """Flush (or time) what deferred submits queued, as a submit would have."""
        if self._pending:
            self._flush_waiting()

    def _unavailable(self, now: float) -> ModelUnavailable:
        circuit = self.circuit
        wait_s = max(1.0, circuit.retry_at - now)
        state = "being probed" if circuit.state == "half_open" else f"probed again in {max(0.0, circuit.retry_at - now):.1f}s"
        return ModelUnavailable(f"model {self.model.key} is unavailable ({self.last_error}); {state}",
                                retry_after_s=wait_s)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        circuit = self.circuit
        action = circuit.decide(self.clock())
        if action == "wait":
            return  # the model holds its share of threads: a returning thread flushes these rows
        if action == "run":
            limit = circuit.free_threads * self.policy.max_batch_size
            if self._pending_rows <= limit:
                items, self._pending = self._pending, []
                rows = self._pending_rows
            else:  # what its free threads can take now; the rest waits for a thread to come back
                count = rows = 0
                for item in self._pending:
                    if count and rows + item.rows > limit:
                        break
                    count += 1
                    rows += item.rows
                items = self._pending[:count]
                del self._pending[:count]
            self._pending_rows -= rows
            self._in_flight_rows += rows
            self._dispatch(items, rows)
            return
        items, self._pending = self._pending, []
        rows, self._pending_rows = self._pending_rows, 0
        if self.admits(0):
            self._capacity.set()
        now = self.clock()
        if action == "probe":
            self._probe(items, rows)
        self._fail(items, self._unavailable(now))

    def _flush_waiting(self) -> None:
        """A thread came back: rows left waiting for one (at the cap) go now, or when due; rows
        queued behind the batch that came back go now if that left the model idle."""
        if not self._pending:
            return
        now = self.clock()
        if self.policy.flush_now(self._pending_rows, self._pending[0].enqueued_s, now, self._in_flight_rows > 0):
            self._flush()
        elif self._timer is None:
            delay = max(0.0, self.policy.deadline_s(self._pending[0].enqueued_s) - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._flush)

    # A batch runs without a task of its own: its slices go to the pool (as at most as many tasks
    # as the model has free threads) with a done-callback that hops back onto the loop, and one
    # timer enforces the timeout. (A task + gather + wait_for per batch cost more CPU than a small
    # model's inference.)

    def _dispatch(self, items: list[_Item], rows: int) -> None:
        loop = asyncio.get_running_loop()
        batch = _Batch(items, rows, self.model, self.clock())  # the version in service when the batch starts
        try:
            feeds = concat_feeds([i.feeds for i in items])
            slices = batch.slices = self.policy.slices(rows)
            batch.parts = [None] * len(slices)
            if len(slices) == 1 and self._runs_inline(batch.model, rows):  # never over max_batch_size
                self._run_inline(batch, feeds, rows)
                return
            batch.groups = groups(len(slices), max(1, min(len(slices), self.circuit.free_threads)))
            batch.options = [run_options() for _ in batch.groups]
            batch.run_times = [[None] * len(batch.groups), [None] * len(batch.groups)]
            batch.remaining = len(batch.groups)
            batch.timer = loop.call_later(self.timeout_s, self._timed_out, batch)
            for index, options in enumerate(batch.options):
                if len(slices) == 1:
                    work = [(feeds, rows)]
                else:
                    work = [(slice_feeds(feeds, *slices[s]), slices[s][1] - slices[s][0]) for s in batch.groups[index]]
                self._submit(batch, index, work, options)
        except Exception as exc:  # noqa: BLE001 - a bug in merging or a closed pool: fail these items loudly
            self._end(batch, InferenceFailed(f"batch on {batch.model.key} failed: {one_line(exc)}"))

    def _submit(self, batch: _Batch, index: int, work: list[tuple[Feeds, int]], options: ort.RunOptions) -> None:
        future = self.executor.submit(run_slices, batch.model, work, options, batch.run_times, index, self.clock)
        self.circuit.started(1)
        callback = self._probe_done if batch.probe else self._part_done
        future.add_done_callback(partial(_back_on_loop, asyncio.get_running_loop(), callback, batch, index))

    def _run_inline(self, batch: _Batch, feeds: Feeds, rows: int) -> None:
        """Run a small batch on the loop, watched: a run past the timeout is ended from the watch
        thread, fails like a timed-out batch, and the model never runs inline again."""
        # fresh options per run (about 2 us): a terminate the watch decided on just as a run ended
        # must not land on the next run
        options = run_options()
        INLINE_WATCH.arm(options, time.monotonic() + self.timeout_s)
        try:
            batch.parts = [timed_run(batch.model, feeds, rows, options)]
        except Terminated:
            self._trip(batch.model, self.timeout_s)
            self._end(batch, self._unavailable(self.clock()))
            self._flush()
            return
        finally:
            INLINE_WATCH.disarm()
        self._complete(batch)

    def _runs_inline(self, model: OnnxModel, rows: int) -> bool:
        """Small batches of a model measured to run in under `inline_max_us` run on the loop: a
        thread-pool round trip (two context switches, the GIL changing hands twice) costs more
        than such a model's inference. The measurement is redone on every batch, so a model
        that slows down (or a hot swap to a bigger one) goes back to the pool. A model that ever
        timed out stays in the pool, where a hang holds one thread, not the loop."""
        return (self.inline_max_us > 0 and rows <= INLINE_MAX_ROWS and model is self._timed_model
                and self._small_batch_us is not None and self._small_batch_us <= self.inline_max_us
                and self.circuit.timeouts == 0)

    def _learn_small_batch_time(self, model: OnnxModel, run_s: float) -> None:
        # one slow sample (a GC pause, the thread waiting for the GIL) must not send a fast model
        # back to the pool: samples are clipped at twice the limit before they enter the average,
        # so a model that is really slower crosses the limit within a few batches, a blip does not
        run_us = min(run_s * 1e6, 2.0 * self.inline_max_us)
        if model is not self._timed_model or self._small_batch_us is None:
            self._timed_model, self._small_batch_us = model, run_us
        else:
            self._small_batch_us = 0.9 * self._small_batch_us + 0.1 * run_us

    def _part_done(self, batch: _Batch, index: int, future: Future) -> None:
        self.circuit.returned(1)
        if not batch.ended:
            error = future.exception()
            if error is not None:
                self._end(batch, InferenceFailed(f"batch on {batch.model.key} failed: {one_line(error)}"))
            else:
                for position, part in zip(batch.groups[index], future.result()):
                    batch.parts[position] = part
                batch.remaining -= 1
                if batch.remaining == 0:
                    self._complete(batch)
        if self._pending:
            self._flush_waiting()

    def _trip(self, model: OnnxModel, timeout_s: float) -> None:
        """A run outlived the timeout: the model is unavailable (one log line per episode)."""
        self.last_error = f"inference on {model.key} took longer than {timeout_s}s"
        if self.circuit.timed_out(self.clock()):
            log.warning("model %s did not answer within %.3gs; unavailable: its batches fail at once "
                        "(model_unavailable) until a probe answers in time (first probe in %.3gs)",
                        model.key, timeout_s, self.circuit.retry_at - self.clock())

    def _timed_out(self, batch: _Batch) -> None:
        """The batch's (or probe's) timer: end it if one of its runs has run for `timeout_s`.

        The timeout counts a run from the moment its thread started it, not its wait for a thread:
        a batch that waited behind other models' batches says nothing about its own model. (Until
        a thread takes it, it waits like rows in the queue, which admission bounds.)"""
        if batch.ended:
            return
        now = self.clock()
        running = [s for s, f in zip(*batch.run_times) if s is not None and f is None]
        due = min(running) + self.timeout_s if running else now + self.timeout_s
        if now < due:  # not started yet, finished (its callback is on its way), or not yet overdue
            batch.timer = asyncio.get_running_loop().call_later(due - now, self._timed_out, batch)
            return
        for options in batch.options:
            options.terminate = True  # frees the thread at the next node (a Loop: the next iteration)
        if batch.probe:
            batch.ended = True
            self.circuit.timed_out(now)
            log.info("model %s: the probe took longer than %.3gs; unavailable, next probe in %.3gs", batch.model.key,
                     self.timeout_s, self.circuit.retry_at - now)
            return
        self._trip(batch.model, self.timeout_s)
        self._end(batch, self._unavailable(self.clock()))
        self._flush()  # rows queued behind it fail now instead of waiting for a probe

    def _probe(self, items: list[_Item], rows: int) -> None:
        """Run these rows' inputs (at most one batch's worth) as the probe of an unavailable model;
        the rows themselves are failed by the caller."""
        size = self.policy.max_batch_size
        probe = _Batch([], min(rows, size), self.model, self.clock(), probe=True)
        try:
            feeds = concat_feeds([i.feeds for i in items])
            if rows > size:
                feeds = slice_feeds(feeds, 0, size)
            probe.options = [run_options()]
            probe.groups = [range(1)]
            probe.run_times = [[None], [None]]
            self._submit(probe, 0, [(feeds, probe.rows)], probe.options[0])
        except Exception as exc:  # noqa: BLE001 - a closed pool (shutting down): stay unavailable
            log.debug("probe of %s not started: %s", probe.model.key, one_line(exc))
            self.circuit.timed_out(self.clock())
            return
        probe.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._timed_out, probe)

    def _probe_done(self, probe: _Batch, _index: int, _future: Future) -> None:
        self.circuit.returned(1)
        if not probe.ended:
            probe.ended = True
            if probe.timer is not None:
                probe.timer.cancel()
            self.circuit.probe_finished()
            log.warning("model %s answered a probe in %.3fs; available again", probe.model.key,
                        self.clock() - probe.started)
        if self._pending:
            self._flush_waiting()

    def _end(self, batch: _Batch, error: Exception | None = None) -> None:
        """Release the batch's rows (once); fail its items when `error` is given."""
        if batch.ended:
            return
        batch.ended = True
        if batch.timer is not None:
            batch.timer.cancel()
        self._in_flight_rows -= batch.rows
        if self.admits(0):
            self._capacity.set()
        if error is not None:
            self._fail(batch.items, error)

    def _complete(self, batch: _Batch) -> None:
        self._end(batch)
        items, rows, parts, started = batch.items, batch.rows, batch.parts, batch.started
        try:
            inference_s = self.clock() - started
            if self.inline_max_us > 0 and rows <= INLINE_MAX_ROWS:
                self._learn_small_batch_time(batch.model, max(p[3] for p in parts))
            if len(parts) == 1:
                outputs, ok, errors, _run_s = parts[0]
            else:
                outputs = concat_outputs([p[0] for p in parts])
                ok = np.concatenate([p[1] for p in parts])
                errors = {}
                for (a, _b), part in zip(batch.slices, parts):
                    errors.update({a + row: msg for row, msg in part[2].items()})
            self.circuit.succeeded()
            if self.observe is not None:
                self.observe(batch.model, rows, started - items[0].enqueued_s, inference_s)
            if len(items) == 1:
                pieces = [(outputs, ok)]
            else:
                pieces = split_results(outputs, ok, [i.rows for i in items])
        except Exception as exc:  # noqa: BLE001 - a bug in merging, not in the model: fail these items loudly
            self._fail(items, InferenceFailed(f"batch on {batch.model.key} failed: {one_line(exc)}"))
            return
        row = 0
        for item, (item_outputs, item_ok) in zip(items, pieces):
            item_errors = {r - row: m for r, m in errors.items() if row <= r < row + item.rows} if errors else {}
            if not item.future.done():
                item.future.set_result(RowsResult(item_outputs, item_ok, item_errors, started - item.enqueued_s,
                                                  inference_s, rows))
            row += item.rows

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)
