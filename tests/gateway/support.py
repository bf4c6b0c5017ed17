"""Helpers for gateway tests: configs and an in-process gateway over the real stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from banditgate.config import Config, parse_config
from gateway.app import Gateway
from loadtests.models import write_repository

N_FEATURES = 8


def gateway_config(stack, topics, repository: Path, redis_prefix: str, **overrides) -> Config:  # type: ignore[no-untyped-def]
    data = {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                  "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix, "snapshot_refresh_ms": 100},
        "models": {"repository": str(repository), "poll_interval_s": 0.2, "warmup_rows": 2},
        "batching": {"max_batch_size": 64, "max_delay_us": 1000, "max_queue_rows": 4096},
        "server": {"http_port": 0, "grpc_port": 0},
        "routes": [
            {"name": "fixed-route", "policy": "fixed",
             "arms": [{"name": "a", "model": "m-a", "version": 1, "weight": 3},
                      {"name": "b", "model": "m-b", "version": 1, "weight": 1}],
             "shadows": [{"name": "c", "model": "m-c", "version": "latest"}]},
            {"name": "bandit-route", "policy": "thompson", "exploration_floor": 0.05,
             "arms": [{"name": "x", "model": "m-a", "version": 1}, {"name": "y", "model": "m-b", "version": 1}]},
        ],
    }
    for key, value in overrides.items():
        data[key] = value
    return parse_config(data, env={})


class RunningGateway:
    def __init__(self, gateway: Gateway, task: asyncio.Task) -> None:
        self.gateway = gateway
        self.task = task

    async def stop(self) -> int:
        self.gateway.stopping.set()
        return await asyncio.wait_for(self.task, timeout=30)


async def start_gateway(config: Config) -> RunningGateway:
    gateway = Gateway(config, registry=CollectorRegistry())
    await gateway.start()
    task = asyncio.get_running_loop().create_task(gateway.run())
    return RunningGateway(gateway, task)


