"""`banditgate export --route R --since T [--until T]`: a window's joined rows from Kafka, as Parquet.

:func:`export_window` reads the outcomes topic by timestamp from `since` (those with ``ts`` in the
window are kept), then the requests, predictions and shadow-predictions topics from
``since - feedback.join_ttl_s`` (a prediction may precede its outcome by up to that long), keeping
what joins a kept outcome, in feedback.export_join's SQLite spill; then writes the joined rows a
row group at a time with feedback.export.ExportWriter. The CLI runs it in-process; the feedback
worker runs it in a process of its own under a lease (feedback.export_job).

Reads are committed-only and bounded: each topic is read with ``isolation_level=read_committed``
from the offsets of `since` to the last stable offsets taken when its read starts, and a
partition is done when the consumer's position reaches that end (a transaction marker is never
delivered as a record, so an idle exactly-once partition whose last offset is a commit marker
ends too; an aborted transaction's records are never returned).

Memory: one fetch per broker (``fetch_max_bytes``, 8 MiB) + one batch of ``batch_records`` decoded
events + the spill's page cache (16 MiB) + one row group (``row_group_rows`` rows and about
``row_group_bytes`` of their JSON): independent of the window. Disk: see feedback.export_join.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from banditgate.config import Config, KafkaConfig
from banditgate.jsontypes import JSONObject
from feedback.export import (
    ExportAborted,
    ExportError,
    ExportWriter,
    Manifest,
    SchemaProbe,
)
from feedback.export_join import SpillJoin

Progress = Callable[[JSONObject], None]
"""Receives progress events: ``{"kind": "read", "topic", "partitions_done", "partitions", "records",
"bytes", "skipped"}``, ``{"kind": "join", "rows"}``, ``{"kind": "write", "rows", "of", "bytes", "files"}``."""


@dataclass(frozen=True)
class ExportOptions:
    """How much an export holds at once (see the module docstring)."""

    row_group_rows: int = 10_000
    row_group_bytes: int = 4 * 1024 * 1024
    """A row group also ends once its rows' stored JSON reaches about this size (wide inputs: as
    Python objects a row takes about 5 times its JSON)."""
    rows_per_file: int = 100_000
    batch_records: int = 1_000
    fetch_max_bytes: int = 4 * 1024 * 1024
    max_partition_fetch_bytes: int = 1024 * 1024
    spill_dir: str | None = None
    """Folder of the join's temporary database (default: the system's temporary folder)."""
    progress_interval_s: float = 1.0
    stall_s: float | None = None
    """Give up when no partition of a topic advances for this long (default: twice the Kafka
    request timeout)."""

    def __post_init__(self) -> None:
        for name in ("row_group_rows", "row_group_bytes", "rows_per_file", "batch_records", "fetch_max_bytes",
                     "max_partition_fetch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def parse_time(text: str) -> float:
    """Epoch seconds from a number or an ISO 8601 time (UTC when no zone is given).

    Raises ExportError for anything else.
    """
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)  # "Z" included (Python 3.11)
    except ValueError:
        raise ExportError(f"not a time: {text!r} (epoch seconds or ISO 8601, e.g. 2025-06-01T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _decode(raw: bytes | None) -> JSONObject | None:
    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class _Reporter:
    """Progress events to `progress`, at most one per interval unless forced (a partition done)."""

    def __init__(self, progress: Progress | None, interval_s: float) -> None:
        self.progress, self.interval_s, self._last = progress, interval_s, -float("inf")

    def __call__(self, event: JSONObject, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now - self._last >= self.interval_s):
            self._last = now
            self.progress(event)


async def read_topic(kafka: KafkaConfig, topic: str, since: float, until: float | None,
                     sink: Callable[[list[JSONObject]], None], options: ExportOptions = ExportOptions(),
                     progress: Progress | None = None, check: Callable[[], None] | None = None) -> JSONObject:
    """Pass the decoded JSON objects of `topic` with a record timestamp in [since, until] to `sink`,
    a batch at a time, up to the topic's last stable offsets as of the call (committed records
    only; undecodable records are skipped and counted). Returns the read's counts.

    `check` is called between batches (it raises to stop the read). Raises ExportError when Kafka
    cannot be read, the topic does not exist, or no partition advances for ``stall_s``.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    from banditgate.connections import kafka_client_kwargs

    where = f"{topic} from Kafka at {kafka.bootstrap_servers}"
    stall_s = options.stall_s if options.stall_s is not None else 2 * kafka.request_timeout_ms / 1000
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed", fetch_max_bytes=options.fetch_max_bytes,
                                max_partition_fetch_bytes=options.max_partition_fetch_bytes,
                                request_timeout_ms=kafka.request_timeout_ms, **kafka_client_kwargs(kafka))
    report = _Reporter(progress, options.progress_interval_s)
    stats: JSONObject = {"kind": "read", "topic": topic, "partitions_done": 0, "partitions": 0, "records": 0, "bytes": 0,
             "skipped": 0}
    try:
        await consumer.start()
        # a consumer that subscribes to nothing has no metadata for the topic yet: fetch it
        cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 - aiokafka has no public call for this
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise ExportError(f"cannot read {where}: the topic does not exist (or this client may not see it)")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        # read_committed: the last stable offsets, below which every transaction is decided
        ends = await consumer.end_offsets(assigned)
        starts = await consumer.offsets_for_times({tp: int(since * 1000) for tp in assigned})
        remaining: dict[TopicPartition, int] = {}
        for tp in assigned:
            found = starts.get(tp)
            if found is not None and found.offset < ends[tp]:
                consumer.seek(tp, found.offset)
                remaining[tp] = ends[tp]
        consumer.pause(*(tp for tp in assigned if tp not in remaining))
        stats.update(partitions=len(assigned), partitions_done=len(assigned) - len(remaining))
        report(dict(stats), force=True)
        upper_ms = None if until is None else until * 1000
        positions = {tp: -1 for tp in remaining}
        advanced_at = time.monotonic()
        while remaining:
            if check is not None:
                check()
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=options.batch_records)
            events: list[JSONObject] = []
            past_until = set()
            for tp, records in batch.items():
                end = remaining.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:  # written after the read started
                        break
                    if upper_ms is None or record.timestamp <= upper_ms:
                        value = _decode(record.value)
                        stats["bytes"] += len(record.value or b"")
                        if value is None:
                            stats["skipped"] += 1
                        else:
                            events.append(value)
                if upper_ms is not None and records and records[-1].timestamp > upper_ms:
                    past_until.add(tp)
            if events:
                stats["records"] += len(events)
                sink(events)
            for tp in list(remaining):
                # the position passes control batches (commit / abort markers) and aborted records,
                # which are never delivered: a partition is done when it reaches its end
                position = await consumer.position(tp)
                if position != positions[tp]:
                    positions[tp], advanced_at = position, time.monotonic()
                if tp in past_until or position >= remaining[tp]:
                    del remaining[tp]
                    consumer.pause(tp)
                    stats["partitions_done"] += 1
                    report(dict(stats), force=True)
            if remaining and time.monotonic() - advanced_at > stall_s:
                stuck = ", ".join(f"{tp.partition} at {positions[tp]} of {end}" for tp, end in remaining.items())
                raise ExportError(f"cannot read {where}: no progress for {stall_s:.0f} s (partition {stuck})")
            report(dict(stats))
    except KafkaError as exc:
        raise ExportError(f"cannot read {where}: {exc}") from None  # aiokafka's text names the error
    finally:
        await consumer.stop()
    return stats


async def export_window(kafka: KafkaConfig, join_ttl_s: float, route: str, since: float, until: float | None,
                        destination: str, reason: str = "manual", options: ExportOptions = ExportOptions(),
                        progress: Progress | None = None, check: Callable[[], None] | None = None,
                        may_commit: Callable[[], bool] | None = None) -> Manifest:
    """Export the window's joined rows of `route` (see the module docstring); returns the manifest.

    The join and the Parquet writing block this event loop: run it on a loop of its own (the
    CLI's, or the process feedback.export_job starts). `check` is called between batches and row
    groups and raises to stop the export; `may_commit`, asked once before the manifest is
    written, returning False aborts it. Nothing is left behind by an export that did not finish.
    Raises ExportError (ExportAborted when stopped).
    """
    topics = kafka.topics
    lookback = since - join_ttl_s
    # the folder first: an unwritable destination fails before hours of reading
    writer = ExportWriter(destination, route, since, until, reason=reason, rows_per_file=options.rows_per_file)
    try:
        join = SpillJoin(route, since, until, options.spill_dir)
    except BaseException:
        writer.abort()
        raise
    committed = False
    try:
        await read_topic(kafka, topics.outcomes, since, until, join.add_outcomes, options, progress, check)
        await read_topic(kafka, topics.requests, lookback, until, join.add_requests, options, progress, check)
        for topic in (topics.predictions, topics.shadow_predictions):
            await read_topic(kafka, topic, lookback, until, join.add_predictions, options, progress, check)
        total = join.finish()
        if progress is not None:
            progress({"kind": "join", "rows": total})
        probe = SchemaProbe()
        for group in join.groups(options.row_group_rows, options.row_group_bytes):
            if check is not None:
                check()
            probe.add(group)
            del group  # not held while the generator builds the next one
        writer.schema, writer.json_columns = probe.schema()
        report = _Reporter(progress, options.progress_interval_s)
        for group in join.groups(options.row_group_rows, options.row_group_bytes):
            if check is not None:
                check()
            writer.write(group)
            del group
            report({"kind": "write", "rows": writer.rows, "of": total, "bytes": writer.bytes_written,
                    "files": len(writer.files) + 1})
        if may_commit is not None and not may_commit():
            raise ExportAborted("the export was not committed: its lease was lost")
        manifest = writer.commit()
        committed = True
        if progress is not None:
            progress({"kind": "write", "rows": manifest.rows, "of": total,
                      "bytes": sum(int(f["bytes"] or 0) for f in manifest.files), "files": len(manifest.files)})
        return manifest
    finally:
        if not committed:
            writer.abort()
        join.close()


def describe(event: JSONObject) -> str:
    """One progress line for a person."""
    if event.get("kind") == "read":
        skipped = f", {event['skipped']} undecodable skipped" if event.get("skipped") else ""
        return (f"{event['topic']}: {event['partitions_done']}/{event['partitions']} partitions done, "
                f"{event['records']} records ({event['bytes'] / 1e6:.1f} MB){skipped}")
    if event.get("kind") == "join":
        return f"joined: {event['rows']} rows"
    if event.get("kind") == "write":
        return (f"written: {event['rows']}/{event['of']} rows, {event['bytes'] / 1e6:.1f} MB, "
                f"{event['files']} file(s)")
    return str(event)


def run_export(config: Config, route: str, since: str, until: str | None, out: str | None,
               options: ExportOptions = ExportOptions()) -> int:
    """The CLI command; progress on stderr, the manifest's path on stdout. Raises ExportError for a
    user-fixable problem."""
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

    # aiokafka logs every failed connection attempt; the one line of the ExportError says it all
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    manifest = asyncio.run(export_window(config.kafka, config.feedback.join_ttl_s, route, start, end, destination,
                                         "manual", options, progress=lambda event: say(describe(event))))
    say(f"{manifest.rows} rows ({manifest.serving_rows} serving, {manifest.shadow_rows} shadow) in "
        f"{len(manifest.files)} file(s)")
    print(f"{manifest.path}/manifest.json")
    return 0
