"""The order of a batch's writes when batches are joined ahead (feedback/agents.py): each stage
stays in batch order (Redis applies batch N before N+1, the changelog gets N before N+1), batch
N+1's Redis stage overlaps batch N's changelog write, and a bug in one batch fails every later one.

The sinks here are recorders with gates (the order of the processor's own awaits is the logic
under test); the real Redis and Kafka sides are covered by the stack tests."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from banditgate.config import Topics
from feedback.agents import JoinProcessor, SourceMessage
from feedback.join import JoinRules, RouteRules
from feedback.metrics import FeedbackMetrics
from feedback.sinks import Applied

TOPICS = Topics()


class RecordingSink:
    """RedisSink's plan/apply_planned: records when each batch starts and ends in Redis."""

    def __init__(self, log: list[str], gates: dict[str, asyncio.Event], fail_on: int | None = None) -> None:
        self.log, self.gates, self.fail_on = log, gates, fail_on

    def plan(self, effects: list[Any]) -> list[Any]:
        batch = int(effects[0].request_id.split("-")[0])
        if batch == self.fail_on:
            raise ValueError("a reward the arm statistics cannot take")
        return [batch]

    async def apply_planned(self, chunks: list[Any], metrics: Any = None) -> Applied:
        (batch,) = chunks
        self.log.append(f"redis {batch} start")
        await self.gates[f"redis {batch}"].wait()
        self.log.append(f"redis {batch} done")
        return Applied([], 0, 0, [])


class RecordingTable:
    """JoinTable's get/encode/persist over a dict, recording when each batch is persisted."""

    def __init__(self, log: list[str], gates: dict[str, asyncio.Event]) -> None:
        self.log, self.gates, self.data = log, gates, {}

    def get(self, request_id: str, partition: int | None = None) -> Any:
        return self.data.get(request_id)

    def encode(self, changes: dict[str, Any], values: Any = None) -> dict[int, list[Any]]:
        return {}

    def over_budget(self) -> bool:
        return False

    async def persist(self, changes: dict[str, Any], encoded: Any = None) -> None:
        batch = int(next(iter(changes)).split("-")[0])
        self.log.append(f"changelog {batch} start")
        await self.gates[f"changelog {batch}"].wait()
        for request_id, (_partition, entry) in changes.items():
            self.data[request_id] = entry
        self.log.append(f"changelog {batch} done")


def _batch(number: int, size: int = 3) -> list[SourceMessage]:
    out = []
    for i in range(size):
        request_id = f"{number}-{i}"
        prediction = {"request_id": request_id, "route": "churn", "arm": "a", "model": "m", "model_version": 1,
                      "policy": "thompson", "propensity": 0.5, "outputs": {"probability": [0.7], "label": 1},
                      "ts_request": 1.0, "ts_predicted": 1.0, "latency_ms": 1.0}
        outcome = {"request_id": request_id, "reward": 1.0, "label": 1, "ts": 2.0}
        key = request_id.encode()
        out.append(SourceMessage(TOPICS.predictions, 0, 2 * (number * size + i), key, orjson.dumps(prediction), 0))
        out.append(SourceMessage(TOPICS.outcomes, 0, 2 * (number * size + i) + 1, key, orjson.dumps(outcome), 0))
    return out


def _processor(log: list[str], gates: dict[str, asyncio.Event], fail_on: int | None = None) -> JoinProcessor:
    return JoinProcessor(table=RecordingTable(log, gates), redis=RecordingSink(log, gates, fail_on),  # type: ignore[arg-type]
                         out=None, rules=JoinRules(ttl_s=3600, routes={"churn": RouteRules()}),  # type: ignore[arg-type]
                         topics=TOPICS, metrics=FeedbackMetrics(CollectorRegistry()), clock=lambda: 10.0)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_each_stage_keeps_batch_order_and_redis_overlaps_the_changelog() -> None:
    log: list[str] = []
    gates = {f"{stage} {n}": asyncio.Event() for stage in ("redis", "changelog") for n in range(3)}
    processor = _processor(log, gates)
    written = [await processor.submit(_batch(n)) for n in range(3)]
    await _settle()
    assert log == ["redis 0 start"]  # batch 1 waits for batch 0's Redis stage
    gates["redis 0"].set()
    await _settle()
    # batch 1's effects go to Redis while batch 0's entries are being written
    assert log[:2] == ["redis 0 start", "redis 0 done"]
    assert sorted(log[2:]) == ["changelog 0 start", "redis 1 start"]
    gates["redis 1"].set()
    gates["redis 2"].set()
    await _settle()
    assert "changelog 1 start" not in log  # the changelog waits for batch 0's write
    assert log[-1] == "redis 2 done" and not any(f.done() for f in written)
    gates["changelog 1"].set()
    gates["changelog 2"].set()
    await _settle()
    assert "changelog 1 start" not in log and not written[1].done()
    gates["changelog 0"].set()
    await asyncio.gather(*written)
    changelog = [line for line in log if line.startswith("changelog")]
    assert changelog == ["changelog 0 start", "changelog 0 done", "changelog 1 start", "changelog 1 done",
                         "changelog 2 start", "changelog 2 done"]


async def test_a_bug_in_one_batch_fails_every_later_batch() -> None:
    log: list[str] = []
    gates = {f"{stage} {n}": asyncio.Event() for stage in ("redis", "changelog") for n in range(3)}
    for gate in gates.values():
        gate.set()
    processor = _processor(log, gates, fail_on=1)
    written = [await processor.submit(_batch(n)) for n in range(3)]
    results = await asyncio.gather(*written, return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, ValueError) for r in results[1:])
    # nothing of batch 1 or 2 reached Redis or the changelog: their offsets are never marked done
    assert not any(line.startswith(("redis 1", "redis 2", "changelog 1", "changelog 2")) for line in log)
    with pytest.raises(ValueError):
        await processor.drain()
