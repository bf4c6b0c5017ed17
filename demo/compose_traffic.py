"""The compose stack's product service: requests to Kafka at a fixed rate, outcomes after a delay.

`docker compose up` runs it as the `traffic` service so the example deployment learns with no
other step:

    python -m demo.compose_traffic -c banditgate.yaml --rows deploy/traffic/pool.csv

It sends held-out rows (sampled with replacement from a CSV whose last column is the true
`label`; deploy/traffic/pool.csv is written by scripts/build_example_models.py) as request
events on the route, reads the predictions topic, and for each prediction of a request it sent
publishes an outcome after an exponential delay: `reward` 1 when the served label equals the
true one, else 0, and the true `label`. Kafka's address, topics and security come from the same
config file as the gateway's (BANDITGATE_KAFKA overrides the address). It stops after
`--duration-s` (or `--count` requests) and the last outcomes; a line every 10 s says how far it is.

Only runtime dependencies (numpy, aiokafka, orjson): it runs in the Docker image.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import heapq
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from banditgate.events import Outcome, Request, encode

MAX_PENDING = 100_000
"""Requests awaiting their prediction; the oldest are forgotten past this (counted)."""
REPORT_EVERY_S = 10.0


class TrafficError(Exception):
    """The generator cannot run; one line saying why."""

    user_facing = True


@dataclass(frozen=True)
class Rows:
    feature_names: list[str]
    values: list[list[float]]
    labels: list[int]


def load_rows(path: Path) -> Rows:
    """Read a CSV of feature columns and a last `label` column (integers); raise TrafficError."""
    try:
        with path.open(newline="") as handle:
            table = list(csv.reader(handle))
    except OSError as exc:
        raise TrafficError(f"cannot read the rows file {path}: {exc.strerror or exc}") from None
    if len(table) < 2 or not table[0] or table[0][-1] != "label":
        raise TrafficError(f"{path}: expected a header of feature names ending in `label`, and rows")
    values, labels = [], []
    for number, row in enumerate(table[1:], start=2):
        if len(row) != len(table[0]):
            raise TrafficError(f"{path}:{number}: {len(row)} columns, the header has {len(table[0])}")
        try:
            features = np.asarray([float(v) for v in row[:-1]], dtype=np.float32)
            label = int(row[-1])
        except ValueError:
            raise TrafficError(f"{path}:{number}: not a number") from None
        if not np.isfinite(features).all():
            raise TrafficError(f"{path}:{number}: a feature is not finite")
        # float32 values as JSON doubles: the gateway's float32 cast gives back the same bits
        values.append(features.astype(np.float64).tolist())
        labels.append(label)
    return Rows(table[0][:-1], values, labels)


def served_label(prediction: dict[str, Any]) -> int | None:
    """The label a prediction event answered (outputs.label, a scalar or a one-element list)."""
    label = (prediction.get("outputs") or {}).get("label")
    if isinstance(label, list):
        label = label[0] if len(label) == 1 else None
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        return None
    return int(label)


def outcome_for(request_id: str, prediction: dict[str, Any], truth: int, now: float) -> Outcome:
    """Reward 1 when the served label is the truth, else 0; the true label scores shadows too."""
    return Outcome(request_id=request_id, reward=1.0 if served_label(prediction) == truth else 0.0, label=truth,
                   ts=now)


@dataclass
class Counts:
    sent: int = 0
    predictions: int = 0
    outcomes: int = 0
    rewarded: int = 0
    forgotten: int = 0


class Pending:
    """request_id -> true label for requests awaiting a prediction, bounded (oldest forgotten)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self._labels: OrderedDict[str, int] = OrderedDict()
        self._limit = limit
        self.forgotten = 0

    def add(self, request_id: str, label: int) -> None:
        self._labels[request_id] = label
        while len(self._labels) > self._limit:
            self._labels.popitem(last=False)
            self.forgotten += 1

    def pop(self, request_id: str) -> int | None:
        return self._labels.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._labels)


async def run(config: Any, rows: Rows, route: str, input_name: str, rate_rps: float, duration_s: float,
              count: int | None, outcome_delay_s: float, seed: int,
              say: Callable[[str], None] = print) -> Counts:
    """Send requests at `rate_rps` for `duration_s` (or until `count`), outcomes for every
    prediction of ours; then wait up to 30 s for the last predictions and outcomes."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from banditgate.connections import kafka_client_kwargs

    topics = config.kafka.topics
    kwargs = kafka_client_kwargs(config.kafka)
    kwargs["client_id"] = f"{kwargs.get('client_id') or 'banditgate'}-traffic"
    producer = AIOKafkaProducer(**kwargs, enable_idempotence=True, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(topics.predictions, **kwargs, group_id=f"traffic-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed")
    try:
        await producer.start()
        await consumer.start()
    except KafkaError as exc:
        await producer.stop()
        raise TrafficError(f"cannot reach Kafka at {config.kafka.bootstrap_servers}: {exc}") from None
    rng = np.random.default_rng(seed)
    counts = Counts()
    pending = Pending()
    due: list[tuple[float, int, Outcome]] = []
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    total = count if count is not None else int(rate_rps * duration_s)
    last_report = started

    async def read_predictions() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            now_mono = time.monotonic()
            for records in batch.values():
                for record in records:
                    if record.value is None:
                        continue
                    event = orjson.loads(record.value)
                    request_id = event.get("request_id")
                    truth = pending.pop(request_id) if isinstance(request_id, str) else None
                    if truth is None:
                        continue  # not ours, or a duplicate (the gateway is at-least-once)
                    counts.predictions += 1
                    outcome = outcome_for(request_id, event, truth, time.time())
                    at = now_mono + float(rng.exponential(outcome_delay_s))
                    heapq.heappush(due, (at, counts.predictions, outcome))

    async def send_due(until: float) -> None:
        while due and due[0][0] <= until:
            _, _, outcome = heapq.heappop(due)
            await producer.send(topics.outcomes, key=outcome.request_id.encode(), value=encode(outcome))
            counts.outcomes += 1
            counts.rewarded += int(outcome.reward == 1.0)

    reader = asyncio.get_running_loop().create_task(read_predictions(), name="traffic-read")
    try:
        while counts.sent < total:
            now = time.monotonic()
            wanted = min(total, int((now - started) * rate_rps) + 1)
            while counts.sent < wanted:
                row = int(rng.integers(len(rows.values)))
                counts.sent += 1
                request_id = f"traffic-{run_id}-{counts.sent:07d}"
                pending.add(request_id, rows.labels[row])
                request = Request(request_id=request_id, route=route, inputs={input_name: rows.values[row]},
                                  ts=time.time())
                await producer.send(topics.requests, key=request_id.encode(), value=encode(request))
            await send_due(now)
            if reader.done():
                reader.result()  # raises what stopped it
            if now - last_report >= REPORT_EVERY_S:
                last_report = now
                say(_report_line(counts, pending))
            await asyncio.sleep(0.01)
        drain_until = time.monotonic() + 30.0
        while time.monotonic() < drain_until and (len(pending) or due):
            await send_due(time.monotonic())
            if reader.done():
                reader.result()
            await asyncio.sleep(0.05)
        await send_due(float("inf"))
        await producer.flush()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    counts.forgotten = pending.forgotten
    say(_report_line(counts, pending) + " (done)")
    return counts


def _report_line(counts: Counts, pending: Pending) -> str:
    share = counts.rewarded / counts.outcomes if counts.outcomes else 0.0
    return (f"traffic: {counts.sent} requests sent, {counts.predictions} predictions, {counts.outcomes} outcomes "
            f"(reward rate {share:.3f}), {len(pending)} awaiting a prediction")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo.compose_traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="the gateway's YAML configuration (Kafka and topics)")
    parser.add_argument("--rows", required=True, type=Path, help="CSV: feature columns, then the true `label`")
    parser.add_argument("--route", default="diagnosis")
    parser.add_argument("--input-name", default="features", help="the models' input tensor name")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration-s", type=float, default=3600.0, help="how long to send (default one hour)")
    parser.add_argument("--count", type=int, default=None, help="stop after this many requests instead")
    parser.add_argument("--outcome-delay-s", type=float, default=2.0, help="mean delay before an outcome")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from banditgate.config import ConfigError, load_config

    try:
        if not (0 < args.rate <= 10_000) or not (0 < args.duration_s <= 7 * 86_400) or args.outcome_delay_s < 0:
            raise TrafficError("--rate must be in (0, 10000], --duration-s in (0, 604800], --outcome-delay-s >= 0")
        if args.count is not None and args.count <= 0:
            raise TrafficError("--count must be positive")
        config = load_config(args.config)
        if args.route not in {route.name for route in config.routes}:
            raise TrafficError(f"route {args.route!r} is not in {args.config}")
        rows = load_rows(args.rows)
        print(f"traffic: {len(rows.values)} rows from {args.rows}, route {args.route}, {args.rate:g} requests/s to "
              f"{config.kafka.topics.requests} at {config.kafka.bootstrap_servers}", flush=True)
        asyncio.run(run(config, rows, args.route, args.input_name, args.rate, args.duration_s, args.count,
                        args.outcome_delay_s, args.seed, say=lambda line: print(line, flush=True)))
    except (TrafficError, ConfigError) as exc:
        print(f"traffic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
