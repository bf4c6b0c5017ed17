"""Fixtures: a model repository and a running in-process gateway with the test's own topics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtests.models import write_repository
from tests.gateway.support import N_FEATURES, RunningGateway, gateway_config, start_gateway


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "models", {"m-a": {1: 1}, "m-b": {1: 2}, "m-c": {1: 3}},
                            n_features=N_FEATURES,
                            config_yaml={"m-a": "features: [bedrooms, f1, f2, f3, f4, f5, f6, f7]\n"
                                                "ranges: {bedrooms: [0, 20]}\n"})


@pytest.fixture
async def running_gateway(stack, topics, repository, redis_prefix) -> AsyncIterator[RunningGateway]:  # type: ignore[no-untyped-def]
    config = gateway_config(stack, topics, repository, redis_prefix)
    running = await start_gateway(config)
    yield running
    if not running.task.done():
        await running.stop()
