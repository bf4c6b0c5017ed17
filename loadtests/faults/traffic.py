"""Load for the fault scenarios: requests into Kafka at a steady rate, and a small HTTP client.

`SteadyLoad` sends request i at `start + i / rate` (batched per millisecond tick with aiokafka's
batch API, so the generator stays cheap), keyed by its request id, and keeps every request it
could not deliver to send again: a broker outage delays requests, it never drops them. Which
request went to which partition, in which order, is kept for the order check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from gateway.transport.kafka_batches import partition_for
from loadtests.faults.harness import N_FEATURES, ROUTE


def request_value(request_id: str, row: list[float], route: str = ROUTE) -> bytes:
    return orjson.dumps({"request_id": request_id, "route": route, "inputs": {"input": row}})


def good_rows(n: int, seed: int) -> list[list[float]]:
    """Feature rows inside every model's reference range."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, N_FEATURES)).round(4).tolist()


@dataclass
class SteadyLoad:
    """`n` requests at `rate_rps` into `topic`; ids `<tag>-<i>`."""

    bootstrap: str
    topic: str
    tag: str
    n: int
    rate_rps: float
    seed: int = 0
    route: str = ROUTE
    negative_first: bool = False  # rows whose first feature is negative (what the poison model fails on)
    positive_first: bool = False  # rows whose first feature is positive (what no model fails or hangs on)
    sent: int = 0
    failed_sends: int = 0
    order: dict[int, list[str]] = field(default_factory=dict)  # partition -> ids in produce order
    started_s: float = 0.0
    finished_s: float = 0.0
    on_tick: Callable[[int], None] | None = None

    def ids(self) -> list[str]:
        return [f"{self.tag}-{i}" for i in range(self.n)]

    async def run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True, linger_ms=2,
                                    request_timeout_ms=120_000, max_batch_size=256 * 1024)
        await producer.start()
        try:
            partitions = len(await producer.partitions_for(self.topic))
            rows = good_rows(min(self.n, 2000), self.seed)
            if self.negative_first:
                rows = [[-abs(row[0]) - 0.01, *row[1:]] for row in rows]
            elif self.positive_first:
                rows = [[abs(row[0]) + 0.01, *row[1:]] for row in rows]
            pending: list[tuple[asyncio.Future, list[tuple[int, bytes, bytes]]]] = []
            retry: list[tuple[int, bytes, bytes]] = []
            start = time.time() + 0.02
            self.started_s = start
            index = 0
            while index < self.n or retry:
                due = min(self.n, int((time.time() - start) * self.rate_rps) + 1)
                batch: list[tuple[int, bytes, bytes]] = retry
                retry = []
                while index < due:
                    request_id = f"{self.tag}-{index}"
                    key = request_id.encode()
                    part = partition_for(key, partitions)
                    self.order.setdefault(part, []).append(request_id)
                    batch.append((part, key, request_value(request_id, rows[index % len(rows)], self.route)))
                    index += 1
                if batch:
                    pending.extend(await self._send(producer, self.topic, batch))
                    self.sent = index
                if self.on_tick is not None:
                    self.on_tick(index)
                still = []
                for future, records in pending:
                    if not future.done():
                        still.append((future, records))
                    elif future.exception() is not None:
                        self.failed_sends += len(records)
                        retry.extend(records)
                pending = still
                if index >= self.n and not retry and pending:
                    done, _ = await asyncio.wait([f for f, _ in pending], timeout=1.0)
                    continue
                await asyncio.sleep(0.001)
            for future, records in pending:
                with contextlib.suppress(Exception):
                    await future
        finally:
            await producer.stop()
            self.finished_s = time.time()

    @staticmethod
    async def _send(producer: AIOKafkaProducer, topic: str, batch: list[tuple[int, bytes, bytes]]
                    ) -> list[tuple[asyncio.Future, list[tuple[int, bytes, bytes]]]]:
        """Send records grouped per partition; returns (delivery future, its records)."""
        builders: dict[int, tuple[object, list[tuple[int, bytes, bytes]]]] = {}
        out = []
        for record in batch:
            part, key, value = record
            slot = builders.get(part)
            if slot is None:
                slot = builders[part] = (producer.create_batch(), [])
            if slot[0].append(key=key, value=value, timestamp=None) is None:  # type: ignore[attr-defined]
                slot[0].close()  # type: ignore[attr-defined]
                out.append((await producer.send_batch(slot[0], topic, partition=part), slot[1]))
                slot = builders[part] = (producer.create_batch(), [])
                slot[0].append(key=key, value=value, timestamp=None)  # type: ignore[attr-defined]
            slot[1].append(record)
        for part, (builder, records) in builders.items():
            builder.close()  # type: ignore[attr-defined]
            out.append((await producer.send_batch(builder, topic, partition=part), records))
        return out


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass
class HttpTally:
    statuses: dict[int, int] = field(default_factory=dict)
    answered_ids: list[str] = field(default_factory=list)
    retry_after_missing: int = 0
    connect_errors: int = 0

    def add(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + self.connect_errors


def infer_body(request_id: str, row: list[float]) -> bytes:
    return orjson.dumps({"id": request_id, "inputs": [{"name": "input", "shape": [1, N_FEATURES],
                                                       "datatype": "FP32", "data": row}]})


async def http_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes,
                    timeout_s: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 keep-alive POST; returns (status, lower-cased headers, body)."""
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    payload = await asyncio.wait_for(reader.readexactly(length), timeout_s) if length else b""
    return status, headers, payload


async def http_load(port: int, tag: str, connections: int, stop: asyncio.Event, tally: HttpTally,
                    rate_rps: float | None = None, seed: int = 1) -> None:
    """Infer requests on `connections` keep-alive connections until `stop`; closed loop, or
    paced to `rate_rps` in total. Answered (200) request ids go to `tally.answered_ids`."""
    rows = good_rows(500, seed)
    counter = 0
    path = f"/v2/models/{ROUTE}/infer"

    async def worker(slot: int) -> None:
        nonlocal counter
        interval = connections / rate_rps if rate_rps else 0.0
        next_due = time.monotonic()
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not stop.is_set():
            if interval:
                next_due += interval
                delay = next_due - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
            if conn is None:
                try:
                    conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
                except (OSError, asyncio.TimeoutError):
                    tally.connect_errors += 1
                    await asyncio.sleep(0.1)
                    continue
            request_id = f"{tag}-{counter}"
            counter += 1
            try:
                status, headers, _ = await http_post(conn[0], conn[1], path, infer_body(request_id, rows[counter % 500]))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                tally.connect_errors += 1
                with contextlib.suppress(Exception):
                    conn[1].close()
                conn = None
                continue
            tally.add(status)
            if status == 200:
                tally.answered_ids.append(request_id)
            elif status in (429, 503):
                if "retry-after" not in headers:
                    tally.retry_after_missing += 1
                await asyncio.sleep(0.02)  # a client backing off (less than Retry-After: keep the pressure on)
            if headers.get("connection", "").lower() == "close":
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
