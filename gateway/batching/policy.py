"""When to flush a model's queue (pure: no clock of its own, no asyncio)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """Flush at `max_batch_size` rows, when the oldest queued row has waited `max_delay_us`, or -
    with `idle_flush` - at once while none of the model's batches is running.

    Why the last: waiting only pays while the model is busy, when rows arriving during its run
    join the next batch anyway. On an idle model nothing else is on its way, so the delay was
    pure latency: a lone request waited the whole `max_delay_us` (1-2 ms) for a batch that would
    never fill. Under load a batch is nearly always running, and rows queue behind it as before;
    when it comes back, what queued meanwhile is flushed at once (the model is idle again)."""

    max_batch_size: int
    max_delay_us: int
    max_queue_rows: int
    idle_flush: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_delay_us < 0 or self.max_queue_rows < 1:
            raise ValueError(f"invalid batch policy {self}")

    def flush_now(self, pending_rows: int, oldest_enqueued_s: float | None, now_s: float, busy: bool = True) -> bool:
        """True if the queue should be flushed at `now_s` (seconds on the caller's monotonic clock).
        `busy`: a batch of the model is running (False: it is idle, see `idle_flush`)."""
        if pending_rows <= 0:
            return False
        if pending_rows >= self.max_batch_size or self.max_delay_us == 0 or (self.idle_flush and not busy):
            return True
        return oldest_enqueued_s is not None and (now_s - oldest_enqueued_s) * 1e6 >= self.max_delay_us

    def deadline_s(self, oldest_enqueued_s: float) -> float:
        """The monotonic time at which a partly filled queue must be flushed."""
        return oldest_enqueued_s + self.max_delay_us / 1e6

    def admits(self, queued_rows: int, new_rows: int) -> bool:
        """True if `new_rows` more rows fit under the queue bound (a single oversized item always fits an empty queue)."""
        return queued_rows == 0 or queued_rows + new_rows <= self.max_queue_rows

    def slices(self, total_rows: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of at most max_batch_size rows covering `total_rows`."""
        step = self.max_batch_size
        return [(start, min(start + step, total_rows)) for start in range(0, total_rows, step)]
