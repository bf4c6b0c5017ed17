"""A real `banditgate serve` subprocess on the test's own topics, allowing reply topics `<prefix>.replies.*`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.models import write_repository
from tests.processes import ServeProcess, start_serve

N_FEATURES = 8


def serve_config(stack, topics, repository: Path, redis_prefix: str) -> dict:  # type: ignore[no-untyped-def]
    return {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                  "topics": topics.topics.model_dump(), "reply_topics": [f"{topics.prefix}.replies.*"]},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "models": {"repository": str(repository), "warmup_rows": 2},
        "batching": {"max_batch_size": 64, "max_delay_us": 1000},
        "routes": [{"name": "churn", "policy": "thompson",
                    "arms": [{"name": "a", "model": "m-a", "version": 1}, {"name": "b", "model": "m-b", "version": 1}]}],
    }


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "models", {"m-a": {1: 1}, "m-b": {1: 2}}, n_features=N_FEATURES)


@pytest.fixture
async def reply_topic(stack, topics) -> str:  # type: ignore[no-untyped-def]
    from tests.conftest import create_topics

    name = f"{topics.prefix}.replies.svc"
    await create_topics(stack.kafka, [name], partitions=2)
    return name


@pytest.fixture
def config(stack, topics, repository, redis_prefix) -> dict:  # type: ignore[no-untyped-def]
    return serve_config(stack, topics, repository, redis_prefix)


@pytest.fixture
def gateway(config, tmp_path: Path) -> Iterator[ServeProcess]:  # type: ignore[no-untyped-def]
    serve = start_serve(config, tmp_path)
    yield serve
    serve.stop()
