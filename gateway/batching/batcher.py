"""Per-model asyncio batcher: queue, flush by size or delay, run ONNX Runtime in a thread pool.

Exception: a batch of a few rows of a model measured to answer in under `inline_max_us` runs on
the event loop itself, because handing it to a thread costs more than running it; the loop is
never held longer than that measured time. The dataplane turns this on only where the process has
a single CPU (see docs/gateway.md, Micro-batching).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from dataclasses import dataclass, field

import numpy as np

from gateway.batching.merge import Feeds, concat_feeds, concat_outputs, slice_feeds, split_results
from gateway.batching.policy import BatchPolicy
from gateway.errors import InferenceFailed, Overloaded
from gateway.models.onnx_runtime import OnnxModel


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


def run_isolating_failures(model: OnnxModel, feeds: Feeds, rows: int) -> tuple[Feeds, np.ndarray, dict[int, str]]:
    """Run a batch; if it fails, bisect to find the rows that fail and run the rest.

    Returns (outputs for ok rows, ok mask, {row: error}). Blocking: call in a worker thread.
    """
    try:
        return model.run(feeds), np.ones(rows, dtype=bool), {}
    except Exception as exc:  # ORT raises various types; the rows are isolated below
        if rows == 1:
            return {}, np.zeros(1, dtype=bool), {0: _one_line(exc)}
    half = rows // 2
    left = run_isolating_failures(model, slice_feeds(feeds, 0, half), half)
    right = run_isolating_failures(model, slice_feeds(feeds, half, rows), rows - half)
    errors = dict(left[2])
    errors.update({row + half: msg for row, msg in right[2].items()})
    return concat_outputs([left[0], right[0]]), np.concatenate([left[1], right[1]]), errors


def _timed_run(model: OnnxModel, feeds: Feeds, rows: int) -> tuple[Feeds, np.ndarray, dict[int, str], float]:
    """run_isolating_failures plus the CPU time it took in the calling thread (seconds).

    CPU time, not wall time: in a pool thread the wall time also counts the wait to get the GIL
    back from a busy event loop, which says nothing about how long the model would hold the loop.
    (With more than one intra-op thread it undercounts the model's work, which the calling
    thread shares.)"""
    started = time.thread_time()
    outputs, ok, errors = run_isolating_failures(model, feeds, rows)
    return outputs, ok, errors, time.thread_time() - started


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@dataclass
class _Item:
    feeds: Feeds
    rows: int
    enqueued_s: float
    future: asyncio.Future


@dataclass(eq=False)
class _Batch:
    """One flushed batch on its way through the pool."""

    items: list[_Item]
    rows: int
    model: OnnxModel
    started: float
    slices: list[tuple[int, int]] = field(default_factory=list)
    parts: list = field(default_factory=list)
    remaining: int = 0
    timer: asyncio.TimerHandle | None = None
    ended: bool = False


def _back_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], batch: _Batch, index: int,
                  future: Future) -> None:
    """Done-callback of a pool future (runs in the worker thread): continue on the event loop."""
    try:
        loop.call_soon_threadsafe(callback, batch, index, future)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


class ModelBatcher:
    """Batches rows for one model version; `model` may be swapped at any time (hot reload)."""

    def __init__(self, model: OnnxModel, executor: Executor, policy: BatchPolicy, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 observe: Callable[[OnnxModel, int, float, float], None] | None = None,
                 inline_max_us: int = 0) -> None:
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
        self.healthy = True
        self.last_error: str | None = None
        self.inline_max_us = inline_max_us
        self._timed_model: OnnxModel | None = None
        self._small_batch_us: float | None = None
        """Recent run time of batches of up to INLINE_MAX_ROWS rows (EWMA, microseconds)."""

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

    def submit(self, feeds: Feeds, rows: int, reject_when_full: bool = False) -> asyncio.Future:
        """Queue `rows` rows; the future resolves to a RowsResult (or raises InferenceFailed)."""
        if reject_when_full and not self.admits(rows):
            raise Overloaded(f"model {self.model.key} has {self.queued_rows} rows queued "
                             f"(limit {self.policy.max_queue_rows}); retry shortly", retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        now = self.clock()
        item = _Item(feeds, rows, now, loop.create_future())
        self._pending.append(item)
        self._pending_rows += rows
        if self.policy.flush_now(self._pending_rows, self._pending[0].enqueued_s, now):
            self._flush()
        elif self._timer is None:
            delay = max(0.0, self.policy.deadline_s(self._pending[0].enqueued_s) - now)
            self._timer = loop.call_later(delay, self._flush)
        return item.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        items, self._pending = self._pending, []
        rows = self._pending_rows
        self._pending_rows = 0
        self._in_flight_rows += rows
        self._dispatch(items, rows)

    # A batch runs without a task of its own: each slice goes to the pool with a done-callback that
    # hops back onto the loop, and one timer enforces the timeout. (A task + gather + wait_for per
    # batch cost more CPU than a small model's inference.)

    def _dispatch(self, items: list[_Item], rows: int) -> None:
        loop = asyncio.get_running_loop()
        batch = _Batch(items, rows, self.model, self.clock())  # the version in service when the batch starts
        try:
            feeds = concat_feeds([i.feeds for i in items])
            batch.slices = self.policy.slices(rows)
            batch.parts = [None] * len(batch.slices)
            batch.remaining = len(batch.slices)
            if len(batch.slices) == 1 and self._runs_inline(batch.model, rows):  # never over max_batch_size
                batch.parts = [_timed_run(batch.model, feeds, rows)]
                self._complete(batch)
                return
            batch.timer = loop.call_later(self.timeout_s, self._timed_out, batch)
            for index, (a, b) in enumerate(batch.slices):
                part = slice_feeds(feeds, a, b) if len(batch.slices) > 1 else feeds
                future = self.executor.submit(_timed_run, batch.model, part, b - a)
                future.add_done_callback(partial(_back_on_loop, loop, self._part_done, batch, index))
        except Exception as exc:  # a bug in merging or a closed pool: fail these items loudly
            self._end(batch, InferenceFailed(f"batch on {batch.model.key} failed: {_one_line(exc)}"))

    def _runs_inline(self, model: OnnxModel, rows: int) -> bool:
        """Small batches of a model measured to run in under `inline_max_us` run on the loop: a
        thread-pool round trip (two context switches, the GIL changing hands twice) costs more
        than such a model's inference. The measurement is redone on every batch, so a model
        that slows down (or a hot swap to a bigger one) goes back to the pool."""
        return (self.inline_max_us > 0 and rows <= INLINE_MAX_ROWS and model is self._timed_model
                and self._small_batch_us is not None and self._small_batch_us <= self.inline_max_us)

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
        if batch.ended:
            return  # timed out already
        error = future.exception()
        if error is not None:
            self._end(batch, InferenceFailed(f"batch on {batch.model.key} failed: {_one_line(error)}"))
            return
        batch.parts[index] = future.result()
        batch.remaining -= 1
        if batch.remaining == 0:
            self._complete(batch)

    def _timed_out(self, batch: _Batch) -> None:
        if batch.ended:
            return
        self.healthy = False
        self.last_error = f"inference on {batch.model.key} took longer than {self.timeout_s}s"
        self._end(batch, InferenceFailed(self.last_error))

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
            self.healthy = True
            if self.observe is not None:
                self.observe(batch.model, rows, started - items[0].enqueued_s, inference_s)
            if len(items) == 1:
                pieces = [(outputs, ok)]
            else:
                pieces = split_results(outputs, ok, [i.rows for i in items])
        except Exception as exc:  # a bug in merging, not in the model: fail these items loudly
            self._fail(items, InferenceFailed(f"batch on {batch.model.key} failed: {_one_line(exc)}"))
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
