"""Per-route alert webhooks: every alert the worker publishes for a route with a ``webhook_url`` is
also POSTed there as JSON (the alert event, exactly as on the alerts topic).

Delivery never blocks or stops the worker: :meth:`WebhookNotifier.notify` only puts the alert on a
bounded queue (full: the alert is dropped and counted); one sender task per notifier POSTs in
order with a timeout, retrying a network error, a timeout, 429 or 5xx a few times with
exponential backoff; another 4xx is not retried. Every alert ends as one of
``banditgate_feedback_webhook_deliveries_total{route, result="delivered"|"failed"|"dropped"}``, and
a route's failures are logged once per outage (the first failure, then "delivered again").
Alerts are sent to the webhook after the broker acknowledged them on the alerts topic, so the
webhook sees at most what the topic has (at-least-once, like the topic itself, across restarts).

The HTTP client is aiohttp: faust-streaming depends on it, so every install of the worker has it
(httpx is only a development dependency here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aiohttp
import orjson

from banditgate.config import url_origin
from feedback.metrics import FeedbackMetrics

log = logging.getLogger("banditgate.feedback.webhooks")

_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class WebhookNotifier:
    """POSTs alerts to their route's webhook URL from a bounded queue (see the module docstring).

    `urls` maps route name to URL (routes without one are skipped). Start with :meth:`start` on
    the event loop; :meth:`stop` gives queued alerts up to `drain_s` to go, then cancels."""

    def __init__(self, urls: Mapping[str, str], metrics: FeedbackMetrics | None = None, *, queue_size: int = 1000,
                 timeout_s: float = 5.0, attempts: int = 4, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 drain_s: float = 2.0) -> None:
        if queue_size < 1 or attempts < 1:
            raise ValueError("queue_size and attempts must be at least 1")
        self.urls = {route: url for route, url in urls.items() if url}
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._drain_s = drain_s
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing: dict[str, int] = {}
        """Routes whose last delivery failed -> failures since the last success (log once per outage)."""
        self._dropping = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sender task (no-op without any URL)."""
        if self.urls and self._task is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
            self._task = asyncio.get_running_loop().create_task(self._run(), name="alert-webhooks")

    async def stop(self) -> None:
        """Let queued alerts go for up to `drain_s`, then stop; what is left is counted as dropped."""
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), self._drain_s)
            except TimeoutError:
                pass
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            while not self._queue.empty():
                route, _ = self._queue.get_nowait()
                self._count(route, "dropped")
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the worker's side -----------------------------------------------------------------------
    def notify(self, route: str, alert: bytes) -> None:
        """Queue one alert (its JSON bytes) for `route`'s webhook; never blocks, never raises."""
        if route not in self.urls:
            return
        try:
            self._queue.put_nowait((route, alert))
        except asyncio.QueueFull:
            self._count(route, "dropped")
            if not self._dropping:
                self._dropping = True
                log.warning("alert webhook queue full (%d alerts): dropping alerts until it drains",
                            self._queue.maxsize)
            return
        if self._dropping and self._queue.qsize() < self._queue.maxsize // 2:
            self._dropping = False

    # -- sending ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            route, alert = await self._queue.get()
            try:
                await self._deliver(route, alert)
            except asyncio.CancelledError:
                self._count(route, "dropped")  # stopping with this one in flight
                raise
            except Exception as exc:  # noqa: BLE001 - a webhook must never stop the worker
                self._failed(route, f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    async def _deliver(self, route: str, alert: bytes) -> None:
        url = self.urls[route]
        session = self._session
        assert session is not None  # noqa: S101 - start() made it
        delay = self._backoff_s
        problem = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with session.post(url, data=alert, headers={"content-type": "application/json"}) as response:
                    status = response.status
                    await response.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if status < 300:
                    self._delivered(route)
                    return
                problem = f"HTTP {status}"
                if status not in _RETRY_STATUSES:
                    break
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay = min(self._backoff_max_s, delay * 2)
        self._failed(route, problem)

    def _delivered(self, route: str) -> None:
        self._count(route, "delivered")
        failures = self._failing.pop(route, 0)
        if failures:
            log.warning("alert webhook of route %s delivers again (after %d failed alert(s))", route, failures)

    def _failed(self, route: str, problem: str) -> None:
        self._count(route, "failed")
        failures = self._failing.get(route, 0)
        if not failures:
            log.warning("alert webhook of route %s failed (%s) after %d attempt(s) to %s; failures are counted "
                        "in banditgate_feedback_webhook_deliveries_total and logged again when it recovers",
                        route, problem, self._attempts, url_origin(self.urls[route]))
        self._failing[route] = failures + 1

    def _count(self, route: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_deliveries.labels(route, result).inc()


def alert_route(key: bytes | None, value: bytes) -> str | None:
    """The route of an alert message: its key (alerts are keyed by route), else its JSON's ``route``."""
    if key:
        return key.decode(errors="replace")
    try:
        route = orjson.loads(value).get("route")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return route if isinstance(route, str) else None


__all__ = ["WebhookNotifier", "alert_route"]
