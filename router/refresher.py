"""SnapshotRefresher: keeps every route's RoutePolicy on a recent store snapshot (asyncio, no Redis import).

Gateways never read Redis per request; this task re-reads all routes' statistics in one round
trip every `refresh_ms` and swaps each policy's snapshot. When Redis is away the policies keep
routing on the last snapshot, `redis_ok` says so (export it as a metric), one warning is logged per
outage and one info line when it ends. An arm whose stored statistics are not numbers comes drained
out of the snapshot (router.stats_store); the refresher logs it once per arm and episode and
reports the route's unusable arms through `on_unusable` (a gauge).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, Self

from router.arm_stats import RouteSnapshot
from router.decision import RoutePolicy

log = logging.getLogger("banditgate.router.stats_store")


class SnapshotSource(Protocol):
    """What the refresher needs from a store (ArmStatsStore has it)."""

    transient_errors: tuple[type[BaseException], ...]

    async def snapshots(self, routes: Iterable[str]) -> dict[str, RouteSnapshot]: ...


class SnapshotRefresher:
    """Keeps each route's RoutePolicy on a fresh store snapshot, every `refresh_ms`.

    When a refresh fails the policies keep the last snapshot; ``redis_ok`` turns False, one
    warning is logged for the whole outage (and one info line when it ends), and
    `on_state_change(ok)` is called on each transition. Use as ``async with`` or start()/stop().
    """

    def __init__(self, store: SnapshotSource, policies: Mapping[str, RoutePolicy], refresh_ms: int = 250,
                 on_state_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, timeout_s: float | None = None,
                 on_unusable: Callable[[str, tuple[str, ...]], None] | None = None) -> None:
        """`timeout_s` bounds one refresh (default: 4 intervals, at least 1 s), so a Redis that
        hangs, or a client retrying with backoff, is reported as an outage promptly."""
        if refresh_ms < 1:
            raise ValueError(f"refresh_ms must be >= 1, got {refresh_ms}")
        self._store = store
        self._policies = policies
        self._interval_s = refresh_ms / 1000.0
        self._timeout_s = timeout_s if timeout_s is not None else max(1.0, 4 * self._interval_s)
        self._on_state_change = on_state_change
        self._on_unusable = on_unusable
        self.unusable: dict[str, tuple[str, ...]] = {}
        """Per route, the arms whose stored statistics are not numbers (last snapshot)."""
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._read: asyncio.Task[dict[str, RouteSnapshot]] | None = None
        self.redis_ok = True
        self.last_success_s: float | None = None
        """Clock reading of the last successful refresh (None before the first)."""
        self._outage_started_s: float | None = None

    async def refresh_once(self) -> bool:
        """One refresh of every policy; returns whether it succeeded (never raises for Redis errors).

        The read runs as its own task and is *abandoned*, not awaited, when it overruns
        `timeout_s`: a client that does not honour cancellation promptly (retry loops, a half-read
        reply) can then never stall the refresher or its shutdown. While an abandoned read is
        still pending no new one is started, so reads never pile up.
        """
        transient: tuple[type[BaseException], ...] = (TimeoutError, *self._store.transient_errors)
        try:
            if self._read is None or self._read.done():
                self._read = asyncio.get_running_loop().create_task(self._store.snapshots(self._policies))
                self._read.add_done_callback(_consume_outcome)
            read = self._read
            done, _ = await asyncio.wait({read}, timeout=self._timeout_s)
            if not done:
                read.cancel()
                raise TimeoutError(f"snapshot read took over {self._timeout_s:g} s")
            snapshots = read.result()
            for route, snapshot in snapshots.items():
                self._policies[route].apply_snapshot(snapshot)
                if snapshot.unusable or self.unusable.get(route):
                    self._note_unusable(route, snapshot.unusable)
        except transient as exc:
            self._failed(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupt hash: keep routing, say so once with the trace
            self._failed(exc, unexpected=True)
            return False
        self._succeeded()
        return True

    def _note_unusable(self, route: str, arms: tuple[str, ...]) -> None:
        """One warning per arm when its statistics become unusable, one info line when fixed."""
        before = self.unusable.get(route, ())
        for arm in sorted(set(arms) - set(before)):
            log.warning("route %s arm %s: its statistics in Redis are not numbers; the arm is drained in this "
                        "gateway's view until they are (reset the arm to start it afresh)", route, arm)
        for arm in sorted(set(before) - set(arms)):
            log.info("route %s arm %s: its statistics in Redis are numbers again", route, arm)
        self.unusable[route] = arms
        if self._on_unusable is not None and arms != before:
            self._on_unusable(route, arms)

    def _failed(self, exc: BaseException, unexpected: bool = False) -> None:
        if not self.redis_ok:
            return
        self.redis_ok = False
        self._outage_started_s = self._clock()
        age = "no snapshot yet" if self.last_success_s is None else \
            f"last snapshot {self._outage_started_s - self.last_success_s:.1f} s old"
        log.warning("arm statistics unavailable (%s: %s); routing on the last snapshot (%s) until Redis answers",
                    type(exc).__name__, exc, age, exc_info=exc if unexpected else None)
        self._notify(False)

    def _succeeded(self) -> None:
        self.last_success_s = self._clock()
        if self.redis_ok:
            return
        self.redis_ok = True
        down_s = self.last_success_s - (self._outage_started_s or self.last_success_s)
        log.info("arm statistics available again after %.1f s; snapshots refreshed", down_s)
        self._notify(True)

    def _notify(self, ok: bool) -> None:
        if self._on_state_change is not None:
            self._on_state_change(ok)

    async def run(self) -> None:
        """Refresh forever (until cancelled)."""
        while True:
            await self.refresh_once()
            await asyncio.sleep(self._interval_s)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="arm-snapshot-refresher")

    async def stop(self) -> None:
        if self._read is not None and not self._read.done():
            self._read.cancel()  # not awaited, see refresh_once
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _consume_outcome(task: asyncio.Task[object]) -> None:
    """Retrieve an abandoned read's exception so asyncio never logs it as unhandled."""
    if not task.cancelled():
        task.exception()
