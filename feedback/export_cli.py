"""`banditgate export --route R --since T [--until T]`: a window's joined rows from Kafka, as Parquet.

Reads the requests, predictions, shadow-predictions and outcomes topics by timestamp (outcomes
from `since`; requests and predictions from `since - feedback.join_ttl_s`, since a prediction may
precede its outcome by up to that long) up to their end offsets at start, joins them with
:func:`feedback.export.join_rows` and writes them with :func:`feedback.export.write_export`.
The Kafka I/O is here; the join and the files are pure/tested in feedback.export.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Callable
from typing import Any

import orjson

from banditgate.config import Config
from feedback.export import ExportError, join_rows, write_export


def parse_time(text: str) -> float:
    """Epoch seconds from a number or an ISO 8601 time (UTC when no zone is given).

    Raises ExportError for anything else.
    """
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"not a time: {text!r} (epoch seconds or ISO 8601, e.g. 2025-06-01T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def _decode(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def read_topic(config: Config, topic: str, since: float, until: float | None,
                     progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Decoded JSON objects of `topic` with a record timestamp in [since, until], up to the end
    offsets as of the call (undecodable records are skipped and counted)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from banditgate.connections import kafka_client_kwargs

    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                **kafka_client_kwargs(config.kafka))
    await consumer.start()
    events: list[dict[str, Any]] = []
    skipped = 0
    try:
        # a consumer that subscribes to nothing has no metadata for the topic yet: fetch it
        cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - aiokafka has no public call for this
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            return []
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        starts = await consumer.offsets_for_times({tp: int(since * 1000) for tp in assigned})
        remaining = {}
        for tp in assigned:
            found = starts.get(tp)
            if found is None or found.offset >= ends[tp]:
                continue
            consumer.seek(tp, found.offset)
            remaining[tp] = ends[tp]
        upper_ms = None if until is None else until * 1000
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    if upper_ms is None or record.timestamp <= upper_ms:
                        value = _decode(record.value)
                        if value is None:
                            skipped += 1
                        else:
                            events.append(value)
                    if record.offset + 1 >= remaining.get(tp, 0):
                        remaining.pop(tp, None)
                if upper_ms is not None and records and records[-1].timestamp > upper_ms:
                    remaining.pop(tp, None)
    finally:
        await consumer.stop()
    if progress:
        progress(f"{topic}: {len(events)} events" + (f", {skipped} undecodable skipped" if skipped else ""))
    return events


def run_export(config: Config, route: str, since: str, until: str | None, out: str | None) -> int:
    """The CLI command; prints the manifest path. Raises ExportError for a user-fixable problem."""
    try:
        route_config = config.route(route)
    except KeyError:
        raise ExportError(f"no route {route!r} in the config (routes: {', '.join(r.name for r in config.routes)})") from None
    destination = out or (route_config.retrain.export_path if route_config.retrain else None)
    if not destination:
        raise ExportError(f"no destination: pass --out or set routes[{route}].retrain.export_path")
    start = parse_time(since)
    end = parse_time(until) if until else None
    if end is not None and end <= start:
        raise ExportError(f"--until ({until}) must be after --since ({since})")

    def say(message: str) -> None:
        print(f"banditgate export: {message}", file=sys.stderr, flush=True)

    topics = config.kafka.topics
    lookback = start - config.feedback.join_ttl_s

    async def gather() -> tuple[list[dict[str, Any]], ...]:
        return (await read_topic(config, topics.requests, lookback, end, say),
                await read_topic(config, topics.predictions, lookback, end, say)
                + await read_topic(config, topics.shadow_predictions, lookback, end, say),
                await read_topic(config, topics.outcomes, start, end, say))

    requests, predictions, outcomes = asyncio.run(gather())
    rows = join_rows(requests, predictions, outcomes, route, start, end)
    manifest = write_export(rows, destination, route, start, end, reason="manual")
    say(f"{manifest.rows} rows ({manifest.serving_rows} serving, {manifest.shadow_rows} shadow) in "
        f"{len(manifest.files)} file(s)")
    print(f"{manifest.path}/manifest.json")
    return 0
