"""The closed loop for lifecycle tests on the real stack: a gateway in this process, a feedback
worker subprocess, and traffic whose outcomes depend on what the serving model answered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from banditgate.config import Config, parse_config
from tests.lifecycle.models import N_FEATURES, build_scorer

ROUTE = "r"


def route_config(**rollout: Any) -> dict[str, Any]:
    """The test route: one arm `a` on model `m` v1 (a coin flip), rollout stages sized for seconds."""
    canary = {"max_share": 0.5, "min_share": 0.3, "min_outcomes": 30, "min_calls": 30, "confidence": 0.9,
              "margin": 0.05, "max_error_rate": 0.5, "max_p99_latency_ms": 250}
    canary.update(rollout.pop("canary", {}))
    return {"name": ROUTE, "policy": "thompson", "guardrail": {"enabled": False},
            "arms": [{"name": "a", "model": "m", "version": 1}],
            "rollout": {"shadow": {"min_outcomes": 60, "confidence": 0.9}, "canary": canary, "grace_s": 2,
                        **rollout}}


def gateway_config(stack: Any, topics: Any, repository: Path, redis_prefix: str, route: dict[str, Any]) -> Config:
    return parse_config({
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                  "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix, "snapshot_refresh_ms": 100},
        "models": {"repository": str(repository), "poll_interval_s": 0.3, "warmup_rows": 2},
        "batching": {"max_batch_size": 64, "max_delay_us": 1000, "max_queue_rows": 4096},
        "server": {"http_port": 0, "grpc_port": 0},
        "drift": {"enabled": False},
        "routes": [route],
    }, env={})


def drop_version(repository: Path, version: int, slope: float, slow_matmuls: int = 0) -> None:
    """A retrained version arrives: written aside, then renamed into the repository in one step."""
    staging = repository / f".staging-{uuid.uuid4().hex[:6]}"
    build_scorer(staging / "model.onnx", slope, slow_matmuls=slow_matmuls)
    os.replace(staging, repository / "m" / str(version))


def make_repository(root: Path) -> Path:
    repository = root / "models"
    build_scorer(repository / "m" / "1" / "model.onnx", 0.0)
    return repository


class Traffic:
    """Requests to the requests topic; for every prediction, an outcome: the true label is
    ``x0 > 0`` and the reward 1 when the served label was right."""

    def __init__(self, stack: Any, topics: Any, seed: int = 0) -> None:
        self.stack = stack
        self.topics = topics.topics
        self.rng = np.random.default_rng(seed)
        self.truth: dict[str, int] = {}
        self.sent = 0
        self.outcomes = 0
        self.served_by: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Traffic:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        self.producer = AIOKafkaProducer(bootstrap_servers=self.stack.kafka, linger_ms=5)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(self.topics.predictions, bootstrap_servers=self.stack.kafka,
                                         group_id=f"lc-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest")
        await self.consumer.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._answer()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.consumer.stop()
        await self.producer.stop()

    async def send(self, count: int) -> None:
        for _ in range(count):
            request_id = uuid.uuid4().hex
            x = self.rng.standard_normal(N_FEATURES).astype(float)
            self.truth[request_id] = int(x[0] > 0)
            await self.producer.send(self.topics.requests, orjson.dumps({
                "request_id": request_id, "route": ROUTE, "inputs": {"input": x.tolist()}, "ts": time.time()}),
                key=request_id.encode())
            self.sent += 1
        await self.producer.flush()

    def run(self, rate_per_s: float = 100.0) -> None:
        """Keep sending at about `rate_per_s` until the context exits."""
        async def pump() -> None:
            while not self._stop.is_set():
                await self.send(max(1, int(rate_per_s / 10)))
                await asyncio.sleep(0.1)
        self._tasks.append(asyncio.get_running_loop().create_task(pump()))

    async def _answer(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    event = orjson.loads(record.value)
                    truth = self.truth.get(event["request_id"])
                    if truth is None:
                        continue
                    served = int(event["outputs"]["label"])
                    self.served_by[event["arm"]] = self.served_by.get(event["arm"], 0) + 1
                    await self.producer.send(self.topics.outcomes, orjson.dumps({
                        "request_id": event["request_id"], "reward": 1.0 if served == truth else 0.0,
                        "label": truth, "ts": time.time()}), key=event["request_id"].encode())
                    self.outcomes += 1


async def read_topic(stack: Any, topic: str) -> list[dict[str, Any]]:
    """Every event on `topic` so far (decoded)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or
                                                                await _partitions(consumer, topic))]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        remaining = {tp: ends[tp] for tp in partitions if ends[tp] > starts[tp]}
        for tp in remaining:
            consumer.seek(tp, starts[tp])
        events = []
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                events += [orjson.loads(r.value) for r in records if r.offset < remaining[tp]]
            for tp in list(remaining):
                # by position, not by the last record's offset: an exactly-once worker's topics end
                # with transaction markers, which are never delivered as records
                if await consumer.position(tp) >= remaining[tp]:
                    del remaining[tp]
        return sorted(events, key=lambda e: (e.get("ts", 0), e.get("seq", 0)))
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> set[int]:
    cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - as feedback.export_cli does
    return cluster.partitions_for_topic(topic) or set()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
