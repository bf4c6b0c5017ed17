"""The shared producer is not churned by its users (pure logic: fake producers, no Kafka).

Before: a replacement closed the replaced producer at once, under a Kafka-loop batch that had
captured it; that batch then failed with ProducerClosed and the loop rewound and republished
predictions already delivered (duplicates). And a rewind without a failed producer (a cancelled
batch) replaced the healthy shared producer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from banditgate.config import KafkaConfig
from gateway.transport.kafka_loop import KafkaLoop
from gateway.transport.shared_producer import SharedProducer


class FakeProducer:
    def __init__(self) -> None:
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def _shared() -> tuple[SharedProducer, list[FakeProducer]]:
    made: list[FakeProducer] = []
    shared = SharedProducer(KafkaConfig())

    def new_producer() -> Any:
        made.append(FakeProducer())
        return made[-1]

    shared.new_producer = new_producer  # type: ignore[method-assign]
    return shared, made


async def test_a_replaced_producer_is_closed_only_after_its_users_let_go() -> None:
    shared, made = _shared()
    await shared.start()
    with shared.holding() as held:
        assert held is made[0]
        fresh = await shared.replace(held)  # another user (the sidecar publisher) saw it fail
        assert fresh is made[1] and shared.producer is made[1]
        await asyncio.sleep(0)
        assert not made[0].stopped  # the batch holding it still gets its acknowledgements
    for _ in range(20):
        await asyncio.sleep(0)
    assert made[0].stopped and not made[1].stopped
    await shared.stop()


async def test_a_producer_nobody_holds_is_closed_at_once_when_replaced() -> None:
    shared, made = _shared()
    await shared.start()
    await shared.replace(made[0])
    assert made[0].stopped


async def test_a_rewind_without_a_failed_producer_keeps_the_healthy_one() -> None:
    replaced: list[Any] = []

    async def replace(failed: Any) -> None:
        replaced.append(failed)

    async def nothing() -> None:
        pass

    async def committed(tp: Any) -> int:
        return 0

    healthy = object()
    loop = SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: [], committed=committed),
                           _cancel_in_flight=nothing, _failed_producer=None,
                           shared=SimpleNamespace(producer=healthy, replace=replace), _should_stop=lambda: False)
    await KafkaLoop._rewind(loop)  # type: ignore[arg-type]  # a cancelled batch: nothing failed
    assert replaced == []
    loop._failed_producer = healthy
    await KafkaLoop._rewind(loop)  # type: ignore[arg-type]
    assert replaced == [healthy]
