"""A real `banditgate serve` subprocess with HTTP and gRPC, on the test's own topics and models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.models import write_repository
from tests.processes import ServeProcess, start_serve

N_FEATURES = 8


def sidecar_config(stack, topics, repository: Path, redis_prefix: str, **server) -> dict:  # type: ignore[no-untyped-def]
    return {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"sc-{topics.prefix}",
                  "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "models": {"repository": str(repository), "poll_interval_s": 0},
        "batching": {"max_batch_size": 64, "max_delay_us": 500},
        "server": {"max_body_bytes": 65536, **server},
        "routes": [{"name": "churn", "policy": "thompson", "exploration_floor": 0.1,
                    "arms": [{"name": "a", "model": "m-a", "version": 1}, {"name": "b", "model": "m-b", "version": 1}],
                    "shadows": [{"name": "c", "model": "m-c", "version": 1}]}],
    }


@pytest.fixture
def sidecar_repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "models", {"m-a": {1: 1}, "m-b": {1: 2}, "m-c": {1: 3}}, n_features=N_FEATURES)


@pytest.fixture
def served(stack, topics, sidecar_repository, redis_prefix, tmp_path: Path) -> Iterator[ServeProcess]:  # type: ignore[no-untyped-def]
    process = start_serve(sidecar_config(stack, topics, sidecar_repository, redis_prefix), tmp_path)
    yield process
    assert process.stop() == 0, process.log()[-2000:]
