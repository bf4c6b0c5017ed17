"""What runs in a pool thread (or, for tiny batches, on the loop): a batch's slices, with failing
rows isolated by bisection, and runs that another thread can end.

Every run gets ONNX Runtime `RunOptions`; setting their `terminate` flag from another thread makes
the run raise between two node executions (a Loop between iterations), which is how a batch that
outlives `models.inference_timeout_s` gives its thread back (gateway/batching/circuit.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from gateway.batching.merge import Feeds, concat_outputs, slice_feeds
from gateway.models.onnx_runtime import OnnxModel


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class Terminated(Exception):
    """The run was ended through its options' terminate flag (it outlived the timeout)."""


def run_isolating_failures(model: OnnxModel, feeds: Feeds, rows: int, options: ort.RunOptions | None = None
                           ) -> tuple[Feeds, np.ndarray, dict[int, str]]:
    """Run a batch; if it fails, bisect to find the rows that fail and run the rest.

    Returns (outputs for ok rows, ok mask, {row: error}). Raises Terminated when `options` were
    told to terminate (no row is to blame then, and bisecting would only fail every half too).
    Blocking: call in a worker thread.
    """
    try:
        return model.run(feeds, options), np.ones(rows, dtype=bool), {}
    except Exception as exc:  # noqa: BLE001 - ORT raises various types; the rows are isolated below
        if options is not None and options.terminate:
            raise Terminated(one_line(exc)) from None
        if rows == 1:
            return {}, np.zeros(1, dtype=bool), {0: one_line(exc)}
    half = rows // 2
    left = run_isolating_failures(model, slice_feeds(feeds, 0, half), half, options)
    right = run_isolating_failures(model, slice_feeds(feeds, half, rows), rows - half, options)
    errors = dict(left[2])
    errors.update({row + half: msg for row, msg in right[2].items()})
    return concat_outputs([left[0], right[0]]), np.concatenate([left[1], right[1]]), errors


Part = tuple[Feeds, np.ndarray, dict[int, str], float]


def timed_run(model: OnnxModel, feeds: Feeds, rows: int, options: ort.RunOptions | None = None) -> Part:
    """run_isolating_failures plus the CPU time it took in the calling thread (seconds).

    CPU time, not wall time: in a pool thread the wall time also counts the wait to get the GIL
    back from a busy event loop, which says nothing about how long the model would hold the loop.
    (With more than one intra-op thread it undercounts the model's work, which the calling
    thread shares.)"""
    started = time.thread_time()
    outputs, ok, errors = run_isolating_failures(model, feeds, rows, options)
    return outputs, ok, errors, time.thread_time() - started


def run_slices(model: OnnxModel, slices: list[tuple[Feeds, int]], options: ort.RunOptions,
               times: list[list[float | None]], index: int, clock: Callable[[], float]) -> list[Part]:
    """One pool task: its slices one after the other (a model never holds more threads than its
    cap, however many slices a batch has).

    Writes when it started and when it finished (on `clock`) into `times[0][index]` and
    `times[1][index]`: the timeout counts a run, not its wait for a thread, and a run that ended
    just before its timer fired (its done-callback not yet on the loop) is not taken for a hang."""
    times[0][index] = clock()
    try:
        return [timed_run(model, feeds, rows, options) for feeds, rows in slices]
    finally:
        times[1][index] = clock()


def groups(count: int, tasks: int) -> list[range]:
    """`count` slice indices split into `tasks` contiguous, nearly equal runs (tasks <= count)."""
    size, extra = divmod(count, tasks)
    out, start = [], 0
    for task in range(tasks):
        stop = start + size + (1 if task < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


class InlineWatch:
    """Ends an inline run that outlives its deadline: the event loop cannot, being the thread that
    runs it. One daemon thread per process, started with the first inline run; it wakes every
    `interval_s` and reads one attribute (ONNX Runtime releases the GIL while it computes)."""

    interval_s = 0.05

    def __init__(self) -> None:
        self.current: tuple[ort.RunOptions, float] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, options: ort.RunOptions, deadline: float) -> None:
        """Watch `options` until `disarm`; terminate them at `deadline` (time.monotonic)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="onnx-inline-watch", daemon=True)
                    self._thread.start()
        self.current = (options, deadline)

    def disarm(self) -> None:
        self.current = None

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval_s)
            current = self.current
            if current is not None and time.monotonic() >= current[1]:
                current[0].terminate = True


INLINE_WATCH = InlineWatch()
