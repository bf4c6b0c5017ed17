"""Pure logic of delivery failures: which broker answers are refusals, what the memo remembers,
how large a record each topic takes (gateway/transport/delivery.py; no servers)."""

from __future__ import annotations

import pytest
from aiokafka.errors import (CorruptRecordException, InvalidProducerEpoch, KafkaConnectionError, KafkaTimeoutError,
                             LeaderNotAvailableError, MessageSizeTooLargeError, NotEnoughReplicasError,
                             NotLeaderForPartitionError, OutOfOrderSequenceNumber, ProducerFenced,
                             RecordListTooLargeError, RequestTimedOutError, TopicAuthorizationFailedError,
                             UnknownError, UnknownTopicOrPartitionError, for_code)

from banditgate.cloudevents import MAX_HEADER_BYTES
from gateway.transport.delivery import (DEFAULT_MAX_MESSAGE_BYTES, RECORD_OVERHEAD_BYTES, TOPIC_CLOSED_S, RefusalMemo,
                                        batch_bytes, is_delivery_error, record_limit, refusal)
from gateway.transport.kafka_batches import OutboundBatches, OutputRefused


@pytest.mark.parametrize("error", [NotLeaderForPartitionError(), LeaderNotAvailableError(), RequestTimedOutError(),
                                   KafkaTimeoutError(), KafkaConnectionError(), NotEnoughReplicasError(),
                                   UnknownTopicOrPartitionError(), OutOfOrderSequenceNumber(), ProducerFenced(),
                                   InvalidProducerEpoch(), ConnectionResetError(), TimeoutError()])
def test_transient_and_producer_state_errors_are_retried(error: BaseException) -> None:
    assert refusal(error) is None
    assert is_delivery_error(error)


@pytest.mark.parametrize(("error", "reason", "scope"), [
    (MessageSizeTooLargeError(), "output_too_large", "record"),
    (RecordListTooLargeError(), "output_too_large", "record"),
    (CorruptRecordException(), "output_refused", "record"),
    (for_code(87)(), "output_refused", "record"),  # INVALID_RECORD: aiokafka has no class for it
    (UnknownError(), "output_refused", "record"),
    (TopicAuthorizationFailedError("t"), "not_authorized", "topic"),
])
def test_refusals_for_good_are_named(error: BaseException, reason: str, scope: str) -> None:
    found = refusal(error)
    assert found is not None and (found.reason, found.scope) == (reason, scope)
    assert type(error).__name__ in found.error


def test_a_defect_is_not_a_delivery_error() -> None:
    assert not is_delivery_error(TypeError("bug")) and not is_delivery_error(KeyError("x"))


def test_record_limit_takes_the_smaller_of_topic_and_request() -> None:
    assert record_limit(DEFAULT_MAX_MESSAGE_BYTES, 8 * 1024 * 1024) == \
        DEFAULT_MAX_MESSAGE_BYTES - RECORD_OVERHEAD_BYTES - MAX_HEADER_BYTES  # room for the headers too
    assert record_limit(10_000_000, 1024 * 1024) < 1024 * 1024
    assert record_limit(50, 1024 * 1024) == 0  # a topic taking less than one record's framing takes nothing


def test_batch_size_follows_the_smallest_topic() -> None:
    assert batch_bytes({"a": record_limit(DEFAULT_MAX_MESSAGE_BYTES, 8 << 20)}) == 512 * 1024
    assert batch_bytes({"a": record_limit(DEFAULT_MAX_MESSAGE_BYTES, 8 << 20), "b": record_limit(20_000, 8 << 20)}) \
        == 20_000 - MAX_HEADER_BYTES


def test_memo_refuses_a_lone_record_and_isolates_a_batch_of_several() -> None:
    memo = RefusalMemo()
    assert not memo
    found = refusal(MessageSizeTooLargeError())
    assert found is not None
    memo.learn("p", [("r", 0, 5), ("r", 0, 6), ("r", 0, 6)], found, now_s=0.0)
    assert set(memo.isolated) == {("r", 0, 5), ("r", 0, 6)} and not memo.refused
    memo.learn("p", [("r", 0, 6)], found, now_s=1.0)  # alone now: that one is the culprit
    assert memo.refused[("r", 0, 6)] == ("p", found) and ("r", 0, 6) not in memo.isolated
    assert ("r", 0, 5) in memo.isolated


def test_memo_closes_a_topic_that_refuses_everyone_for_a_while() -> None:
    memo = RefusalMemo()
    found = refusal(TopicAuthorizationFailedError("p"))
    assert found is not None
    memo.learn("p", [("r", 0, 1), ("r", 0, 2)], found, now_s=100.0)
    assert memo.closed("p", 100.0 + TOPIC_CLOSED_S - 1) == found
    assert memo.closed("other", 101.0) is None
    assert memo.closed("p", 100.0 + TOPIC_CLOSED_S) is None and not memo  # opened again: try once more
    assert not memo.isolated  # nothing to split: the topic, not a record, was refused


def test_memo_is_bounded_oldest_first() -> None:
    memo = RefusalMemo(max_entries=3)
    found = refusal(MessageSizeTooLargeError())
    assert found is not None
    for offset in range(5):
        memo.learn("p", [("r", 0, offset)], found, now_s=0.0)
    assert list(memo.refused) == [("r", 0, 2), ("r", 0, 3), ("r", 0, 4)]


class _Builder:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def append(self, key: bytes | None, value: bytes, timestamp: None, headers: object = ()) -> object | None:
        if self.records and sum(map(len, self.records)) + len(value) > 1000:
            return None
        self.records.append(value)
        return object()

    def close(self) -> None:
        pass


class _Producer:
    def create_batch(self) -> _Builder:
        return _Builder()


def test_outbound_batches_refuse_a_record_over_its_topic_limit_and_keep_sources() -> None:
    out = OutboundBatches(_Producer(), {"p": 4, "d": 1}, {"p": 300})  # type: ignore[arg-type]
    out.add("p", b"k1", b"x" * 200, 0, source="r1")
    with pytest.raises(OutputRefused) as refused:
        out.add("p", b"k2", b"x" * 299, 0, source="r2")
    assert refused.value.reason == "output_too_large" and "over the 300 bytes" in str(refused.value)
    out.add("d", b"k2", b"x" * 5000, source="dead")  # no limit known for d: not checked here
    out.add("p", b"k3", b"y" * 100, 0, source="r3", alone=True)
    assert out.count == 3
    groups = [sources for (_slot, _builder, sources) in out._full] + [sources for _b, sources in out._builders.values()]
    assert sorted(groups) == [["dead"], ["r1"], ["r3"]]
