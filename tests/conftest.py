"""Shared fixtures: the real local stack (session scope), unique topics and Redis prefixes per test.

Integration tests talk to a real Kafka broker and a real Redis on loopback, started by
`banditgate stack up` (or named by BANDITGATE_KAFKA / BANDITGATE_REDIS). No mocks of either.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from banditgate.config import Topics
from banditgate.stack import Addresses, Stack, StackError


@pytest.fixture(scope="session")
def stack() -> Addresses:
    """Bring the local stack up (or reuse it) once per test session."""
    try:
        return Stack.default().up()
    except StackError as exc:
        pytest.fail(f"the local stack could not start: {exc}", pytrace=False)


@pytest.fixture
def unique() -> str:
    """A short unique token for names that must not collide across tests or runs."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis_prefix(unique: str) -> str:
    return f"bgtest-{unique}"


@dataclass
class TopicSet:
    topics: Topics
    prefix: str


async def create_topics(bootstrap: str, names: list[str], partitions: int = 4) -> None:
    """Create topics on the real broker (idempotent) and wait until metadata shows them."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        try:
            await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
        except TopicAlreadyExistsError:
            pass
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    except Exception:  # noqa: BLE001 - best-effort cleanup; a leftover topic harms no other test
        pass
    finally:
        await admin.close()


@pytest.fixture
async def topics(stack: Addresses, unique: str) -> AsyncIterator[TopicSet]:
    """A fresh set of banditgate topics (4 partitions each), deleted after the test."""
    prefix = f"t{unique}"
    names = Topics(**{field: f"{prefix}.{default.split('.', 1)[1]}"
                      for field, default in Topics().model_dump().items()})
    all_names = list(names.model_dump().values())
    await create_topics(stack.kafka, all_names)
    yield TopicSet(topics=names, prefix=prefix)
    if not os.environ.get("BANDITGATE_KEEP_TOPICS"):
        await delete_topics(stack.kafka, all_names)


@pytest.fixture
def redis_url(stack: Addresses) -> Iterator[str]:
    yield stack.redis
