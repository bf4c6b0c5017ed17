"""The drain loop's one check (BatchConsumer._stale_sought_back) for records fetched before faust's
flow stopped or a rebalance began: they are dropped and sought back - the whole fetch by
`_seek_back`, or, once its other topics' records were processed, the batch topics to their
committed offsets (`perform_seek`). Pure logic: the consumer's seeks are mocks."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import AsyncMock

import pytest

from feedback.consumer import BatchConsumer


def _consumer(flow_active: bool, generation: int) -> BatchConsumer:
    consumer = BatchConsumer.__new__(BatchConsumer)  # no app, no Kafka: only the check runs
    consumer.flow_active = flow_active
    consumer.app = SimpleNamespace(consumer_generation_id=generation)  # type: ignore[assignment]
    consumer.perform_seek = AsyncMock()  # type: ignore[method-assign]
    consumer._seek_back = AsyncMock()  # type: ignore[method-assign]
    return consumer


async def test_records_of_the_current_generation_are_processed() -> None:
    consumer = _consumer(True, 7)
    assert await consumer._stale_sought_back(7, {}) is False
    assert await consumer._stale_sought_back(7) is False
    consumer.perform_seek.assert_not_awaited()
    consumer._seek_back.assert_not_awaited()


@pytest.mark.parametrize(("flow_active", "generation"), [(False, 7), (True, 8), (False, 8)])
async def test_stale_records_are_sought_back(flow_active: bool, generation: int) -> None:
    records = {"tp": ["record"]}
    consumer = _consumer(flow_active, generation)
    assert await consumer._stale_sought_back(7, records) is True  # type: ignore[arg-type]
    consumer._seek_back.assert_awaited_once_with(records)
    consumer.perform_seek.assert_not_awaited()
    consumer = _consumer(flow_active, generation)
    assert await consumer._stale_sought_back(7) is True
    consumer.perform_seek.assert_awaited_once_with()
    consumer._seek_back.assert_not_awaited()
