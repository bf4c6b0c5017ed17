"""What every scenario gets: the suite's own stack, a work folder, the models, quick or full."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.faults.harness import GatewayProc, OwnStack, Processes, create_topics, gateway_config
from loadtests.faults.readback import TopicTail


@dataclass
class Context:
    stack: OwnStack
    work: Path
    models: Path
    quick: bool
    run_id: str
    say: Callable[[str], None]

    @property
    def kafka(self) -> str:
        return self.stack.kafka

    @property
    def redis(self) -> str:
        return self.stack.redis

    def prefix(self, scenario: str) -> str:
        return f"{scenario.replace('_', '-')}-{self.run_id}"

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


@dataclass
class GatewayScene:
    """Topics, tails and gateway replicas of one scenario (one consumer group)."""

    ctx: Context
    name: str
    topics: dict[str, str]
    procs: Processes
    predictions: TopicTail
    deadletter: TopicTail
    delivery: str = "at_least_once"
    batching: dict[str, Any] | None = None
    server: dict[str, Any] | None = None
    routes: list[dict[str, Any]] | None = None
    models_settings: dict[str, Any] | None = None

    @classmethod
    async def create(cls, ctx: Context, name: str, partitions: int = 4, delivery: str = "at_least_once",
                     batching: dict[str, Any] | None = None, server: dict[str, Any] | None = None,
                     routes: list[dict[str, Any]] | None = None,
                     models_settings: dict[str, Any] | None = None) -> "GatewayScene":
        topics = await create_topics(ctx.kafka, ctx.prefix(name), partitions)
        predictions = await TopicTail(ctx.kafka, topics["predictions"]).start()
        deadletter = await TopicTail(ctx.kafka, topics["deadletter"], keep_values=True).start()
        return cls(ctx, name, topics, Processes(), predictions, deadletter, delivery, batching, server, routes,
                   models_settings)

    def replica(self, index: int) -> GatewayProc:
        ctx = self.ctx
        config = gateway_config(kafka=ctx.kafka, redis=ctx.redis, topics=self.topics, group=f"{ctx.prefix(self.name)}-gw",
                                redis_prefix=ctx.prefix(self.name), models=ctx.models, delivery=self.delivery,
                                batching=self.batching, server=self.server, routes=self.routes,
                                models_settings=self.models_settings)
        proc = GatewayProc(f"{self.name}-{index}", config, ctx.work)
        self.procs.add(proc)
        return proc

    async def start_replicas(self, count: int, first_index: int = 0) -> list[GatewayProc]:
        replicas = [self.replica(first_index + i) for i in range(count)]
        for replica in replicas:
            replica.spawn()
        await asyncio.gather(*(r.wait_ready() for r in replicas))
        return replicas

    def dead_keys(self) -> set[str]:
        return {rec.key for rec in self.deadletter.records}

    async def drain(self, ids: set[str], timeout_s: float, settle_s: float = 2.0) -> float:
        """Wait until every id is answered or dead-lettered; return how long it took."""
        started = time.monotonic()

        def done() -> bool:
            return not ids.difference(self.predictions.keys, self.dead_keys())

        def progress() -> None:
            self.ctx.say(f"{self.name}: draining, {len(ids.intersection(self.predictions.keys))}/{len(ids)} answered")

        await self.predictions.wait_for(done, timeout_s, settle_s=0.0, progress=progress)
        drained = time.monotonic() - started
        await asyncio.sleep(settle_s)  # late extras (duplicates) are counted too
        return drained

    async def close(self) -> list[tuple[str, int, float]]:
        stopped = await asyncio.to_thread(self.procs.stop_all)
        await self.predictions.stop()
        await self.deadletter.stop()
        return stopped
