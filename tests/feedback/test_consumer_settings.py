"""The worker's Kafka consumer gets the settings the configuration names (no broker needed:
the client is built, not started)."""

from __future__ import annotations

import asyncio

from banditgate.config import Config
from feedback.app import build_app
from feedback.consumer import BatchConsumerThread
from tests.feedback.worker_helpers import ROUTES


def test_the_fetch_wait_reaches_the_worker_consumer() -> None:
    async def built() -> tuple[str, int]:
        config = Config.model_validate({"feedback": {"app_id": "test-fetch-wait", "fetch_max_wait_ms": 37},
                                        "routes": ROUTES})
        app, _runtime = build_app(config)
        thread = app.consumer._thread
        consumer = thread._create_worker_consumer(app.transport)
        try:
            return type(thread).__name__, consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()

    name, wait_ms = asyncio.run(built())
    # faust builds its consumer with a fixed 1500 ms: an idle topic's fetch then holds up the rest
    assert (name, wait_ms) == (BatchConsumerThread.__name__, 37)


def test_the_default_fetch_wait_is_short() -> None:
    assert Config.model_validate({"routes": ROUTES}).feedback.fetch_max_wait_ms == 50
