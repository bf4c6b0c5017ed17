"""Alert webhooks against a real HTTP server on loopback (started by the test): delivery with
retries, no retry on a client error, timeouts, a full queue, an unreachable URL, one log line per
outage; and end to end, a worker whose route has a webhook_url POSTs its alerts there."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from prometheus_client import CollectorRegistry

from feedback.metrics import FeedbackMetrics
from feedback.webhooks import WebhookNotifier, alert_route
from tests.feedback.test_worker_stack import send
from tests.feedback.worker_helpers import ROUTES, outcome, prediction, wait_until


class Hook:
    """A loopback HTTP server that records POST bodies and answers from a script of statuses
    (then 200); `delay_s` makes it slow."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.requests = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hook.requests += 1
                if hook.delay_s:
                    time.sleep(hook.delay_s)
                status = hook.statuses.pop(0) if hook.statuses else 200
                if status < 300:
                    hook.bodies.append(body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def deliveries(metrics: FeedbackMetrics, route: str, result: str) -> float:
    value = metrics.registry.get_sample_value("banditgate_feedback_webhook_deliveries_total",
                                              {"route": route, "result": result})
    return value or 0.0


async def settled(metrics: FeedbackMetrics, route: str, total: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(deliveries(metrics, route, r) for r in ("delivered", "failed", "dropped")) >= total:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{total} webhook results for {route} not counted in {timeout_s} s")


def alert(i: int) -> bytes:
    return orjson.dumps({"kind": "quality", "route": "churn", "arm": "a", "model_version": 3, "metric": "m",
                         "value": float(i), "threshold": 0.1, "ts": 1.0})


async def test_alerts_are_delivered_in_order_through_retries(hook: Hook) -> None:
    metrics = FeedbackMetrics(CollectorRegistry())
    hook.statuses = [503, 500]  # the first alert needs three attempts
    notifier = WebhookNotifier({"churn": hook.url, "other": ""}, metrics, backoff_s=0.01)
    notifier.start()
    try:
        for i in range(3):
            notifier.notify("churn", alert(i))
        notifier.notify("other", alert(9))  # no URL: ignored
        await settled(metrics, "churn", 3)
    finally:
        await notifier.stop()
    assert [orjson.loads(b)["value"] for b in hook.bodies] == [0.0, 1.0, 2.0]
    assert hook.requests == 5
    assert deliveries(metrics, "churn", "delivered") == 3 and deliveries(metrics, "churn", "failed") == 0


async def test_failures_are_counted_and_logged_once_per_outage(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    """A 400 is not retried; three failed alerts give one warning; the first success after them
    says the webhook delivers again."""
    metrics = FeedbackMetrics(CollectorRegistry())
    hook.statuses = [400, 400, 400]
    notifier = WebhookNotifier({"churn": hook.url}, metrics, backoff_s=0.01)
    notifier.start()
    with caplog.at_level(logging.WARNING, logger="banditgate.feedback.webhooks"):
        try:
            for i in range(4):
                notifier.notify("churn", alert(i))
            await settled(metrics, "churn", 4)
        finally:
            await notifier.stop()
    assert hook.requests == 4
    assert deliveries(metrics, "churn", "failed") == 3 and deliveries(metrics, "churn", "delivered") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed (HTTP 400)" in m for m in messages) == 1
    assert sum("delivers again (after 3 failed" in m for m in messages) == 1


async def test_a_hanging_webhook_times_out_and_a_full_queue_drops(hook: Hook) -> None:
    """The server takes 2 s per request, the timeout is 0.2 s, the queue holds 2: notify returns
    at once every time, the queued alerts fail after their attempts, the rest are dropped."""
    metrics = FeedbackMetrics(CollectorRegistry())
    hook.delay_s = 2.0
    notifier = WebhookNotifier({"churn": hook.url}, metrics, queue_size=2, timeout_s=0.2, attempts=2,
                               backoff_s=0.01)
    notifier.start()
    try:
        for i in range(6):
            notifier.notify("churn", alert(i))  # never blocks, never raises
        assert deliveries(metrics, "churn", "dropped") >= 3
        await settled(metrics, "churn", 6)
    finally:
        await notifier.stop()
    assert deliveries(metrics, "churn", "delivered") == 0
    assert deliveries(metrics, "churn", "failed") + deliveries(metrics, "churn", "dropped") == 6


async def test_an_unreachable_webhook_fails_quietly() -> None:
    metrics = FeedbackMetrics(CollectorRegistry())
    probe = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens there now
    notifier = WebhookNotifier({"churn": f"http://127.0.0.1:{port}/x"}, metrics, attempts=2, backoff_s=0.01)
    notifier.start()
    try:
        notifier.notify("churn", alert(1))
        await settled(metrics, "churn", 1)
    finally:
        await notifier.stop()
    assert deliveries(metrics, "churn", "failed") == 1


def test_alert_route_from_key_or_payload() -> None:
    assert alert_route(b"churn", b"{}") == "churn"
    assert alert_route(None, alert(1)) == "churn"
    assert alert_route(None, b"not json") is None


@pytest.mark.stack
async def test_the_worker_posts_a_routes_alerts_to_its_webhook(stack, topics, redis, redis_prefix, start_worker,
                                                               hook: Hook) -> None:
    """A shadow that is right where its primary is wrong gets a promote alert; the route's
    webhook receives the same event as the alerts topic."""
    routes = [dict(route) for route in ROUTES]
    routes[0]["webhook_url"] = hook.url
    worker = start_worker(routes=routes)
    await worker.wait_ready()
    now = time.time()
    rng = random.Random(4)
    messages = []
    for i in range(400):
        request_id = f"w-{i}"
        label = rng.randint(0, 1)
        wrong, right = (0.9 if label == 0 else 0.1), (0.1 if label == 0 else 0.9)
        messages.append(("predictions", request_id.encode(),
                         prediction(request_id, "churn", "a", "churn-gbm", 3, wrong, now)))
        messages.append(("shadow_predictions", request_id.encode(),
                         prediction(request_id, "churn", "c", "churn-gbm", 4, right, now, shadow_of="a")))
        messages.append(("outcomes", request_id.encode(), outcome(request_id, now + 1, reward=0.0, label=label)))
    rng.shuffle(messages)
    await send(stack.kafka, topics, messages)

    async def posted() -> list[bytes]:
        return list(hook.bodies)

    bodies = await wait_until(posted, 60, "a webhook POST", worker)
    event = orjson.loads(bodies[0])
    assert (event["kind"], event["route"], event["arm"], event["model_version"]) == ("promote", "churn", "c", 4)
