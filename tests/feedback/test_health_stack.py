"""A real `banditgate feedback` worker answers its probes: live once its loop runs, ready once its
partitions are recovered and Redis answers, unready (still live) while Redis does not, and a
worker beyond the partition count is ready with no partitions (it idles). The metrics stay on the
same port."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import create_topics, delete_topics
from tests.feedback.worker_helpers import WorkerProcess, wait_until, write_config
from tests.processes import free_port

pytestmark = pytest.mark.stack


async def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        try:
            response = await http.get(f"http://127.0.0.1:{port}{path}")
        except httpx.TransportError:
            return 0, {}  # not listening yet
    return response.status_code, response.json() if response.status_code in (200, 503) else {}


def _answers(port: int, path: str, status: int, reason: str = "") -> Any:
    async def check() -> tuple[int, dict[str, Any]] | None:
        got = await _probe(port, path)
        return got if got[0] == status and reason in got[1].get("reason", "") else None
    return check


async def test_probes_follow_recovery_and_redis(private_redis, start_worker) -> None:  # type: ignore[no-untyped-def]
    url, redis_process = private_redis
    port = free_port()
    worker = start_worker(redis_url=url, web_port=port)
    await wait_until(_answers(port, "/health/live", 200), 90, "live", worker, interval_s=0.2)
    _, body = await wait_until(_answers(port, "/health/ready", 200), 90, "ready", worker, interval_s=0.2)
    assert body["partitions"] == [0, 1, 2, 3]  # the only worker: every partition
    async with httpx.AsyncClient(timeout=5.0) as http:
        metrics = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert metrics.status_code == 200 and "banditgate_feedback_join_budget_bytes" in metrics.text

    redis_process.send_signal(signal.SIGSTOP)  # Redis stops answering (a hung or unreachable server)
    try:
        await wait_until(_answers(port, "/health/ready", 503, "Redis does not answer"), 30, "unready without Redis",
                         worker, interval_s=0.2)
        assert (await _probe(port, "/health/live"))[0] == 200  # a restart would not bring Redis back
    finally:
        redis_process.send_signal(signal.SIGCONT)
    await wait_until(_answers(port, "/health/ready", 200), 30, "ready again", worker, interval_s=0.2)
    assert worker.stop() == 0, worker.output()[-3000:]


async def test_a_worker_beyond_the_partition_count_is_ready_and_idle(stack, redis_prefix, unique,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    names = {field: f"h{unique}.{field}" for field in ("requests", "predictions", "shadow_predictions", "outcomes",
                                                         "deadletter", "alerts", "routing_changes")}
    await create_topics(stack.kafka, list(names.values()), partitions=1)
    ports = [free_port(), free_port()]
    workers: list[WorkerProcess] = []
    try:
        for index, port in enumerate(ports):
            config = write_config(tmp_path / f"feedback-{index}.yaml", kafka=stack.kafka, redis=stack.redis,
                                  topics=names, redis_prefix=redis_prefix, app_id=f"fbh-{unique}", partitions=1,
                                  web_port=port)
            workers.append(WorkerProcess(config, tmp_path / f"worker-{index}.log").start())
        for worker, port in zip(workers, ports):
            await wait_until(_answers(port, "/health/ready", 200), 120, "ready", worker, interval_s=0.2)

        async def settled() -> list[list[int]] | None:
            parts = sorted([(await _probe(port, "/health/ready"))[1].get("partitions", [-1]) for port in ports])
            return parts if parts == [[], [0]] else None

        # both in the group: one owns the only partition, the other idles, and both are ready
        await wait_until(settled, 60, "one worker with partition 0, one with none", workers[0], interval_s=0.5)
        idle = [body for port in ports if (body := (await _probe(port, "/health/ready"))[1])["partitions"] == []]
        assert idle and "idle" in idle[0]["reason"]
    finally:
        for worker in workers:
            worker.stop(timeout_s=30)
        await delete_topics(stack.kafka, [*names.values(), f"fbh-{unique}-join-changelog"])
