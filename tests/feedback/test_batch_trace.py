"""The feedback worker's spans (feedback/batch_trace.py, JoinProcessor.submit) against hostile
trace ids, bad stored trace contexts, failing exporters and cancellation, with the SDK's
InMemorySpanExporter. Redis and the changelog are the fakes of test_join_budget_processor.py."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from banditgate.config import TracingConfig
from banditgate.tracecontext import TRACEPARENT, new_traceparent
from banditgate.tracing import Tracing
from feedback.agents import JoinProcessor, SourceMessage
from feedback.batch_trace import BatchTrace
from feedback.join import decode_entry, encode_entry
from feedback.metrics import FeedbackMetrics
from feedback.state import JoinBudget, JoinTable
from tests.feedback.test_join_budget_processor import NOW, RULES, TOPICS, Changelog, Ledger, Out, predictions


def traced_processor(exporter: InMemorySpanExporter, store: dict[bytes, Any] | None = None,
                     **settings: float) -> JoinProcessor:
    table = JoinTable({} if store is None else store, Changelog(), "changelog", RULES, budget=JoinBudget(partitions=4))
    table.sync_partitions(range(4))
    tracing = Tracing.from_config(TracingConfig(enabled=True, sample_ratio=1.0, **settings),  # type: ignore[arg-type]
                                  "banditgate-feedback", exporter=exporter)
    return JoinProcessor(table=table, redis=Ledger(), out=Out(), rules=RULES, topics=TOPICS,  # type: ignore[arg-type]
                         metrics=FeedbackMetrics(CollectorRegistry()), clock=lambda: NOW + 2000, tracing=tracing)


def with_trace(message: SourceMessage, traceparent: str) -> SourceMessage:
    return dataclasses.replace(message, headers=[(TRACEPARENT, traceparent.encode())])


def hostile(i: int) -> str:
    """A traceparent whose trace id's lower 64 bits are zero: sampled at any ratio above 0."""
    return f"00-{i + 1:016x}{'0' * 16}-{i + 1:016x}-01"


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_hostile_trace_ids_get_event_spans_only_up_to_the_batch_cap() -> None:
    exporter = InMemorySpanExporter()
    proc = traced_processor(exporter, max_request_spans_per_batch=3, max_request_spans_per_s=1000)
    batch = [with_trace(m, hostile(i)) for i, m in enumerate(predictions(0, 10))]
    asyncio.run(_submit(proc, batch))
    assert len(named(exporter, "feedback.prediction")) == 3
    assert proc.tracing.dropped["batch_limited"] == 7
    assert proc._metrics.trace_spans_dropped.labels("batch_limited")._value.get() == 7


async def _submit(proc: JoinProcessor, messages: list[SourceMessage]) -> None:
    await (await proc.submit(messages))


def test_a_stored_trace_context_that_is_not_a_traceparent_is_dropped_at_decode() -> None:
    exporter = InMemorySpanExporter()
    store: dict[bytes, Any] = {}
    proc = traced_processor(exporter, store)
    asyncio.run(_submit(proc, [with_trace(predictions(0, 1)[0], new_traceparent())]))
    entry = store[b"p-00000"]
    row = orjson.loads(encode_entry(entry))
    for bad in ("not-a-traceparent", "00-" + "z" * 32 + "-" + "1" * 16 + "-01", 12):
        row[-1] = bad  # a corrupted or foreign changelog record
        raw = orjson.dumps(row)
        assert decode_entry("p-00000", raw).trace is None
        assert decode_entry("p-00000", raw).primary == entry.primary  # the rest of the entry is kept
    store[b"p-00000"] = orjson.dumps(row)  # as recovered from the changelog: bytes until first read
    outcome = SourceMessage(TOPICS.outcomes, 0, 1, b"p-00000",
                            orjson.dumps({"request_id": "p-00000", "reward": 1.0, "ts": NOW}), 0)
    asyncio.run(_submit(proc, [outcome]))  # raised ValueError in the SDK call before
    assert named(exporter, "feedback.outcome") == []  # no context left: no span in a request's trace
    assert len(named(exporter, "feedback.batch")) == 2


class Raising(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("exporter is down")


def test_ending_the_batch_never_raises_and_counts_what_failed() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_config(TracingConfig(enabled=True, sample_ratio=1.0), "banditgate-feedback",
                                  exporter=exporter)
    tracing._provider.add_span_processor(Raising())
    batch = BatchTrace(tracing)
    batch.joined(1, 0, 0)
    batch.end(ConnectionError("changelog write failed"))  # must not raise
    batch.end()  # once only
    assert [s.name for s in exporter.get_finished_spans()] == ["feedback.join", "feedback.batch"]
    assert tracing.dropped["failed"] == 2


def test_a_submit_cancelled_while_waiting_for_the_lock_ends_its_batch_span() -> None:
    exporter = InMemorySpanExporter()
    proc = traced_processor(exporter)

    async def run() -> None:
        await proc.lock.acquire()  # a batch before still joining
        task = asyncio.ensure_future(proc.submit([with_trace(predictions(0, 1)[0], new_traceparent())]))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()  # a rebalance or shutdown
        with pytest.raises(asyncio.CancelledError):
            await task
        proc.lock.release()

    asyncio.run(run())
    batch = named(exporter, "feedback.batch")
    assert len(batch) == 1 and str(batch[0].events[0].attributes["exception.type"]).endswith("CancelledError")
