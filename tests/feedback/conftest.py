"""Fixtures for feedback tests against the real stack: a worker subprocess factory, a Redis client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from banditgate.stack import find_redis_server, redis_answers
from tests.conftest import delete_topics
from tests.feedback.worker_helpers import WorkerProcess, write_config


@pytest.fixture
async def redis(stack: Any, redis_prefix: str) -> AsyncIterator[aredis.Redis]:
    """A client on the stack's Redis; every key under the test's prefix is deleted afterwards."""
    client = aredis.Redis.from_url(stack.redis)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start:start + 1000])
    await client.aclose()


@pytest.fixture
async def start_worker(stack: Any, topics: Any, redis_prefix: str, unique: str, tmp_path: Path
                       ) -> AsyncIterator[Callable[..., WorkerProcess]]:
    """Start `banditgate feedback` on the test's topics, prefix and app id (same config for every
    start within a test, so a restart resumes the same consumer group and changelog). Keyword
    arguments go to `write_config` (feedback settings, `kafka_settings`, `join_ttl_s`...)."""
    workers: list[WorkerProcess] = []
    config_path: list[Path] = []

    def start(redis_url: str | None = None, **settings: Any) -> WorkerProcess:
        if not config_path:
            config_path.append(write_config(tmp_path / "feedback.yaml", kafka=stack.kafka,
                                            redis=redis_url or stack.redis, topics=topics.topics.model_dump(),
                                            redis_prefix=redis_prefix, app_id=f"fb-{unique}", **settings))
        worker = WorkerProcess(config_path[0], tmp_path / "worker.log").start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop(timeout_s=20)
    if workers and not os.environ.get("BANDITGATE_KEEP_TOPICS"):
        await delete_topics(stack.kafka, [f"fb-{unique}-join-changelog"])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own on a free loopback port (so the test may stop it)."""
    exe, _ = find_redis_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not redis_answers(f"redis://127.0.0.1:{port}/0", timeout_s=0.5):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"the test's redis-server on port {port} did not start")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", process
    process.send_signal(signal.SIGCONT)
    process.terminate()
    process.wait(timeout=10)
