"""Per-model asyncio batcher: queue, flush by size or delay, run ONNX Runtime in a thread pool.

Kafka, HTTP and gRPC all submit here, so their rows share batches. The queue is bounded:
`admits()` says whether a caller may submit; Kafka waits on `wait_for_capacity()` (backpressure),
HTTP/gRPC get `Overloaded` (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from gateway.batching.merge import Feeds, concat_feeds, concat_outputs, slice_feeds, split_results
from gateway.batching.policy import BatchPolicy
from gateway.errors import InferenceFailed, Overloaded
from gateway.models.onnx_runtime import OnnxModel


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@dataclass
class _Item:
    feeds: Feeds
    rows: int
    enqueued_s: float
    future: asyncio.Future


class ModelBatcher:
    """Batches rows for one model version; `model` may be swapped at any time (hot reload)."""

    def __init__(self, model: OnnxModel, executor: Executor, policy: BatchPolicy, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 observe: Callable[[OnnxModel, int, float, float], None] | None = None) -> None:
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
        asyncio.get_running_loop().create_task(self._run(items, rows))

    async def _run(self, items: list[_Item], rows: int) -> None:
        model = self.model  # the version in service when the batch starts
        loop = asyncio.get_running_loop()
        started = self.clock()
        try:
            feeds = concat_feeds([i.feeds for i in items])
            slices = self.policy.slices(rows)
            calls = [loop.run_in_executor(self.executor, run_isolating_failures, model,
                                          slice_feeds(feeds, a, b) if len(slices) > 1 else feeds, b - a)
                     for a, b in slices]
            parts = await asyncio.wait_for(asyncio.gather(*calls), timeout=self.timeout_s)
        except TimeoutError:
            self.healthy = False
            self.last_error = f"inference on {model.key} took longer than {self.timeout_s}s"
            self._fail(items, InferenceFailed(self.last_error))
            return
        except Exception as exc:  # a bug in merging, not in the model: fail these items loudly
            self._fail(items, InferenceFailed(f"batch on {model.key} failed: {_one_line(exc)}"))
            return
        finally:
            self._in_flight_rows -= rows
            if self.admits(0):
                self._capacity.set()
        inference_s = self.clock() - started
        outputs = concat_outputs([p[0] for p in parts])
        ok = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        errors: dict[int, str] = {}
        for (a, _b), part in zip(slices, parts):
            errors.update({a + row: msg for row, msg in part[2].items()})
        self.healthy = True
        if self.observe is not None:
            self.observe(model, rows, started - items[0].enqueued_s, inference_s)
        row = 0
        for item, (item_outputs, item_ok) in zip(items, split_results(outputs, ok, [i.rows for i in items])):
            item_errors = {r - row: m for r, m in errors.items() if row <= r < row + item.rows}
            if not item.future.done():
                item.future.set_result(RowsResult(item_outputs, item_ok, item_errors, started - item.enqueued_s,
                                                  inference_s, rows))
            row += item.rows

    def _fail(self, items: list[_Item], exc: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)
