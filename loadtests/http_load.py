"""One load generator for every system in `banditgate bench http`: REST, gRPC and the in-process limit.

Run as its own process, one measurement per run, printing one JSON line on stdout:

    python -m loadtests.http_load rest SPEC.json
    python -m loadtests.http_load grpc SPEC.json
    python -m loadtests.http_load ort  SPEC.json

Each measurement has the same two phases for every system:

1. **Max sustained throughput**: a closed loop that keeps `connections` requests in flight, for
   `throughput_s` seconds after `warmup_s`; answered requests (status 200 / OK) per second.
2. **Latency at half of that maximum**: an open loop at `fraction` x the rate just measured, for
   `latency_s` seconds. Request i is due at `start + i / rate` whatever happened before, and its
   latency is *completion time - intended send time*: time spent behind a stalled server or
   waiting for a free connection is charged to the system (no coordinated omission). Latencies go
   into an HdrHistogram in nanoseconds.

Transports:

- REST: raw asyncio protocols on uvloop, `connections` HTTP/1.1 keep-alive connections with one
  request in flight on each (no pipelining). The request is encoded once (same body bytes for
  every server); a response is parsed only as far as its status line and Content-Length.
- gRPC: grpc.aio, one channel (HTTP/2), the ModelInferRequest serialised once and sent through a
  bytes-in/bytes-out unary method (no protobuf work per call on the client), at most
  `connections` calls in flight.
- ORT: no network and no server: `session.run` on one row in a loop, in this process, timed the
  same way (closed loop, then an open loop at half its rate). The limit for any server of this
  model on this core.

Pacing: the open-loop sender sleeps until about 1.5 ms before the next due time (event-loop
timers are millisecond-grained), then spins on the event loop with `asyncio.sleep(0)`, which
polls sockets without blocking, so a request leaves within microseconds of its intended time.
How far sends lagged behind their intended times is reported (`send_lag_p99_us`) so a
generator that could not keep up is visible rather than hidden in the server's figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import stat
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

perf_counter = time.perf_counter

#: HdrHistogram range: 1 ns .. 60 s, 3 significant digits
_HIST_MAX_NS = 60_000_000_000


class LoadError(Exception):
    """The load could not be applied (connection refused, protocol error); one line saying why."""


# --------------------------------------------------------------------------------------------
# Open-loop accounting (pure: no sockets, no clock of its own)
# --------------------------------------------------------------------------------------------


@dataclass
class OpenLoop:
    """Intended send times, free slots and per-request latency for an open-loop run.

    Request i is due at `start + i / rate_rps` for i in [0, total). A due request takes a free
    slot (a connection, or a permit for an in-flight call) or waits in a FIFO backlog until one is
    released; either way its latency is measured from its *intended* time. Times are seconds from
    any monotonic clock the caller uses consistently.
    """

    rate_rps: float
    total: int
    start: float
    slots: int
    issued: int = 0
    answered: int = 0
    errors: int = 0
    latencies_ns: array = field(default_factory=lambda: array("q"))
    send_lags_ns: array = field(default_factory=lambda: array("q"))
    _free: deque = field(default_factory=deque)
    _backlog: deque = field(default_factory=deque)
    _in_flight: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate_rps <= 0 or self.slots < 1 or self.total < 0:
            raise ValueError("OpenLoop needs rate_rps > 0, slots >= 1 and total >= 0")
        # round robin over the slots, so every keep-alive connection stays in use (a server may
        # close one that sits idle longer than its keep-alive timeout)
        self._free = deque(range(self.slots))

    def intended(self, index: int) -> float:
        """The time request `index` is due."""
        return self.start + index / self.rate_rps

    def next_due(self) -> float | None:
        """When the next not-yet-due request falls due (None once all are due)."""
        return self.intended(self.issued) if self.issued < self.total else None

    @property
    def all_due(self) -> bool:
        return self.issued >= self.total

    @property
    def in_flight(self) -> int:
        return len(self._in_flight) + len(self._backlog)

    def poll(self, now: float) -> list[int]:
        """Slots to send a request on now: requests due by `now` that found a free slot."""
        while self.issued < self.total and self.intended(self.issued) <= now:
            self._backlog.append(self.issued)
            self.issued += 1
        sends = []
        while self._backlog and self._free:
            sends.append(self._take(self._free.popleft(), now))
        return sends

    def complete(self, slot: int, now: float, ok: bool = True) -> int | None:
        """Record the answer on `slot` at `now`; return the slot again if a waiting request goes on it now."""
        index = self._in_flight.pop(slot)
        if ok:
            self.answered += 1
            self.latencies_ns.append(max(1, int((now - self.intended(index)) * 1e9)))
        else:
            self.errors += 1
        if self._backlog:
            return self._take(slot, now)
        self._free.append(slot)
        return None

    def _take(self, slot: int, now: float) -> int:
        index = self._backlog.popleft()
        self._in_flight[slot] = index
        self.send_lags_ns.append(max(0, int((now - self.intended(index)) * 1e9)))
        return slot


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) used so far by process `pid` and its live descendants
    (MLServer's inference workers, for one); 0 without a pid."""
    if not pid:
        return 0.0
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    family, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for child, (parent, _) in stats.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    for member in family:
        total += stats.get(member, (0, 0.0))[1]
    return total


def summarise(open_loop: OpenLoop, throughput_rps: float, throughput_errors: int, connections: int,
              cpu_us_per_request: float | None = None, generator_busy: float | None = None) -> dict[str, Any]:
    """The JSON result of one measurement: throughput, latency percentiles (ms) and how the load went."""
    from hdrh.histogram import HdrHistogram

    histogram = HdrHistogram(1, _HIST_MAX_NS, 3)
    for value in open_loop.latencies_ns:
        histogram.record_value(min(value, _HIST_MAX_NS))
    lags = sorted(open_loop.send_lags_ns)
    lag_p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else 0

    def ms(percentile: float) -> float:
        return round(histogram.get_value_at_percentile(percentile) / 1e6, 4) if open_loop.answered else float("nan")

    return {"throughput_rps": round(throughput_rps, 1), "p50_ms": ms(50), "p99_ms": ms(99), "p999_ms": ms(99.9),
            "max_ms": round(histogram.get_max_value() / 1e6, 4) if open_loop.answered else float("nan"),
            "latency_rate_rps": round(open_loop.rate_rps, 1), "latency_sent": open_loop.issued,
            "latency_answered": open_loop.answered, "latency_errors": open_loop.errors,
            "latency_unanswered": open_loop.issued - open_loop.answered - open_loop.errors,
            "throughput_errors": throughput_errors, "send_lag_p99_us": round(lag_p99 / 1e3, 1),
            "connections": connections,
            "server_cpu_us_per_request": round(cpu_us_per_request, 1) if cpu_us_per_request else None,
            "generator_cpu_busy": round(generator_busy, 3) if generator_busy is not None else None}


async def pace(open_loop: OpenLoop, send: Callable[[int], None], wait: Callable[[float], Any],
               drain_s: float = 5.0) -> None:
    """Drive `open_loop` in real time: call `send(slot)` for each request as it falls due, then wait
    (at most `drain_s`) for the answers still out.

    Between sends, `wait(seconds)` blocks until the next due time or until one of the sockets the
    answers arrive on is readable, whichever is first (select(2) has microsecond timeouts; the
    event loop's timers have millisecond ones); the loop then reads what arrived.
    """
    sleep = asyncio.sleep
    while not open_loop.all_due:
        for slot in open_loop.poll(perf_counter()):
            send(slot)
        due = open_loop.next_due()
        if due is None:
            break
        gap = due - perf_counter()
        if gap > 0:
            wait(gap)
        await sleep(0)  # one event-loop pass: read the answers that arrived
    deadline = perf_counter() + drain_s
    while open_loop.in_flight and perf_counter() < deadline:
        await sleep(0.001)


def socket_waiter(fds: list[int]) -> Callable[[float], Any]:
    """`wait(seconds)`: block until one of `fds` is readable or the time is up."""
    def wait(seconds: float) -> None:
        try:
            select.select(fds, [], [], seconds)
        except (OSError, ValueError) as exc:  # a socket closed under us: the caller's check names it
            raise LoadError(f"a connection closed during the open loop ({exc})") from None
    return wait


def process_sockets() -> list[int]:
    """This process's socket file descriptors (for gRPC, whose sockets and wake-up pipe are grpc's own)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                fds.append(int(name))
        except OSError:
            continue
    return fds


# --------------------------------------------------------------------------------------------
# REST: raw protocol over keep-alive connections
# --------------------------------------------------------------------------------------------


def http_request(host: str, port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """One pre-encoded HTTP/1.1 keep-alive POST."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


def _content_length(buffer: bytearray, header_end: int) -> int:
    head = bytes(buffer[:header_end]).lower()
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise LoadError(f"response without Content-Length: {head[:200]!r}")
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17:end if end >= 0 else len(head)])


class _RestConnection(asyncio.Protocol):
    """One keep-alive connection; calls `on_response(slot, status, now)` for each full response."""

    def __init__(self, slot: int, on_response: Callable[[int, int, float], None]) -> None:
        self.slot = slot
        self.on_response = on_response
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.failure: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        buffer = self.buffer
        buffer += data
        while True:
            header_end = buffer.find(b"\r\n\r\n")
            if header_end < 0:
                return
            try:
                total = header_end + 4 + _content_length(buffer, header_end)
            except (LoadError, ValueError) as exc:
                self.failure = exc if isinstance(exc, LoadError) else LoadError(f"bad Content-Length: {exc}")
                assert self.transport is not None  # noqa: S101
                self.transport.close()
                return
            if len(buffer) < total:
                return
            status = int(buffer[9:12])
            del buffer[:total]
            self.on_response(self.slot, status, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.failure is None:
            self.failure = LoadError(f"the server closed a connection{f': {exc}' if exc else ''}")


async def _rest_connect(host: str, port: int, count: int,
                        on_response: Callable[[int, int, float], None]) -> list[_RestConnection]:
    loop = asyncio.get_running_loop()
    connections = []
    for slot in range(count):
        try:
            _, protocol = await loop.create_connection(lambda s=slot: _RestConnection(s, on_response), host, port)
        except OSError as exc:
            raise LoadError(f"cannot connect to {host}:{port}: {exc}") from None
        connections.append(protocol)
    return connections


async def rest_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Both phases against one REST endpoint (see the module docstring)."""
    host, port, k = spec["host"], int(spec["port"]), int(spec["connections"])
    request = http_request(host, port, spec["path"], Path(spec["body_file"]).read_bytes())
    state = {"closed": True, "running": False, "counting": False, "count": 0, "errors": 0, "out": 0}
    open_loop: OpenLoop | None = None

    def on_response(slot: int, status: int, now: float) -> None:
        if state["closed"]:
            if state["counting"]:
                if status == 200:
                    state["count"] += 1
                else:
                    state["errors"] += 1
            if state["running"]:
                connections[slot].transport.write(request)  # type: ignore[union-attr]
            else:
                state["out"] -= 1
            return
        assert open_loop is not None  # noqa: S101
        again = open_loop.complete(slot, now, ok=status == 200)
        if again is not None:
            connections[again].transport.write(request)  # type: ignore[union-attr]

    connections = await _rest_connect(host, port, k, on_response)

    def check() -> None:
        for connection in connections:
            if connection.closed:
                raise LoadError(f"REST {host}:{port}{spec['path']}: {connection.failure}")

    # phase 1: closed loop
    state["running"] = True
    state["out"] = k
    for connection in connections:
        connection.transport.write(request)  # type: ignore[union-attr]
    await asyncio.sleep(float(spec["warmup_s"]))
    check()
    server_pid = spec.get("server_pid")
    cpu_before, own_before = process_cpu_s(server_pid), time.process_time()
    state["counting"] = True
    started = perf_counter()
    await asyncio.sleep(float(spec["throughput_s"]))
    count, errors, elapsed = state["count"], state["errors"], perf_counter() - started
    cpu_per_request = (process_cpu_s(server_pid) - cpu_before) * 1e6 / max(1, count)
    generator_busy = (time.process_time() - own_before) / elapsed
    state["counting"] = False
    state["running"] = False
    deadline = perf_counter() + 10
    while state["out"] > 0 and perf_counter() < deadline:
        await asyncio.sleep(0.005)
    check()
    if count == 0:
        raise LoadError(f"REST {host}:{port}{spec['path']}: no successful answer in {elapsed:.1f}s "
                        f"({errors} errors)")
    throughput = count / elapsed

    # phase 2: open loop at a fraction of the maximum
    rate = throughput * float(spec["fraction"])
    open_loop = OpenLoop(rate, int(rate * float(spec["latency_s"])), perf_counter() + 0.05, k)
    state["closed"] = False

    def send(slot: int) -> None:
        connections[slot].transport.write(request)  # type: ignore[union-attr]

    await pace(open_loop, send, socket_waiter([c.transport.get_extra_info("socket").fileno()  # type: ignore[union-attr]
                                               for c in connections]))
    check()
    for connection in connections:
        connection.transport.close()  # type: ignore[union-attr]
    return summarise(open_loop, throughput, errors, k, cpu_per_request, generator_busy)


# --------------------------------------------------------------------------------------------
# gRPC: grpc.aio with a pre-serialised request
# --------------------------------------------------------------------------------------------


def grpc_request_bytes(model_name: str, model_version: str, input_name: str, row: Any) -> bytes:
    """A serialised ModelInferRequest for one FP32 row sent as raw_input_contents."""
    from banditgate.proto import grpc_predict_v2_pb2 as pb2

    request = pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = "FP32"
    tensor.shape.extend(list(row.shape))
    request.raw_input_contents.append(row.astype("<f4").tobytes())
    return request.SerializeToString()


async def grpc_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Both phases against one gRPC endpoint (see the module docstring)."""
    import grpc
    import numpy as np

    k = int(spec["connections"])
    target = f"{spec['host']}:{spec['port']}"
    row = np.asarray(spec["row"], dtype=np.float32).reshape(1, -1)
    payload = grpc_request_bytes(spec["model_name"], spec.get("model_version", ""), spec["input_name"], row)
    channel = grpc.aio.insecure_channel(target)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    where = f"gRPC {target} model {spec['model_name']!r}"
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
    except TimeoutError:
        raise LoadError(f"{where}: channel not ready within 10s") from None
    try:
        await infer(payload, timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise LoadError(f"{where}: {exc.code().name}: {exc.details()}") from None

    state = {"running": True, "counting": False, "count": 0, "errors": 0}
    first_error: list[str] = []

    async def worker() -> None:
        while state["running"]:
            try:
                await infer(payload)
                ok = True
            except grpc.aio.AioRpcError as exc:
                ok = False
                if not first_error:
                    first_error.append(f"{exc.code().name}: {exc.details()}")
            if state["counting"]:
                state["count" if ok else "errors"] += 1

    workers = [asyncio.ensure_future(worker()) for _ in range(k)]
    await asyncio.sleep(float(spec["warmup_s"]))
    server_pid = spec.get("server_pid")
    cpu_before, own_before = process_cpu_s(server_pid), time.process_time()
    state["counting"] = True
    started = perf_counter()
    await asyncio.sleep(float(spec["throughput_s"]))
    count, errors, elapsed = state["count"], state["errors"], perf_counter() - started
    cpu_per_request = (process_cpu_s(server_pid) - cpu_before) * 1e6 / max(1, count)
    generator_busy = (time.process_time() - own_before) / elapsed
    state["counting"] = False
    state["running"] = False
    await asyncio.wait(workers, timeout=10)
    if count == 0:
        raise LoadError(f"{where}: no successful answer in {elapsed:.1f}s ({errors} errors; {first_error[:1]})")
    throughput = count / elapsed

    rate = throughput * float(spec["fraction"])
    open_loop = OpenLoop(rate, int(rate * float(spec["latency_s"])), perf_counter() + 0.05, k)
    loop = asyncio.get_running_loop()

    async def call(slot: int) -> None:
        while True:
            try:
                await infer(payload)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            again = open_loop.complete(slot, perf_counter(), ok)
            if again is None:
                return

    def send(slot: int) -> None:
        loop.create_task(call(slot))

    await pace(open_loop, send, socket_waiter(process_sockets()))
    await channel.close()
    return summarise(open_loop, throughput, errors, k, cpu_per_request, generator_busy)


# --------------------------------------------------------------------------------------------
# Bare ONNX Runtime in this process: the limit
# --------------------------------------------------------------------------------------------


def ort_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """session.run on one row: closed loop for throughput, then an open loop at `fraction` of it."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(spec["model"], sess_options=options, providers=["CPUExecutionProvider"])
    feeds = {spec["input_name"]: np.asarray(spec["row"], dtype=np.float32).reshape(1, -1)}
    run = session.run

    deadline = perf_counter() + float(spec["warmup_s"])
    while perf_counter() < deadline:
        run(None, feeds)
    count = 0
    started, cpu_before = perf_counter(), time.process_time()
    deadline = started + float(spec["throughput_s"])
    while True:
        for _ in range(256):
            run(None, feeds)
        count += 256
        now = perf_counter()
        if now >= deadline:
            break
    throughput = count / (now - started)
    cpu_per_call = (time.process_time() - cpu_before) * 1e6 / count

    # open loop with one slot, written out lean (the generic OpenLoop bookkeeping would cost as
    # much as the call): request i is due at start + i * interval; a call that starts late because
    # the previous ones ran long is still timed from its intended time
    rate = throughput * float(spec["fraction"])
    total = int(rate * float(spec["latency_s"]))
    interval = 1.0 / rate
    latencies = array("d", bytes(8 * total))
    lags = array("d", bytes(8 * total))
    start = perf_counter() + 0.01
    for index in range(total):
        due = start + index * interval
        now = perf_counter()
        while now < due:  # spin: the call itself takes microseconds
            now = perf_counter()
        run(None, feeds)
        latencies[index] = perf_counter() - due
        lags[index] = now - due
    open_loop = OpenLoop(rate, total, start, 1)
    open_loop.issued = open_loop.answered = total
    open_loop.latencies_ns = array("q", (max(1, int(v * 1e9)) for v in latencies))
    open_loop.send_lags_ns = array("q", (int(v * 1e9) for v in lags))
    return summarise(open_loop, throughput, 0, 1, cpu_per_call)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("rest", "grpc", "ort"):
        print("usage: python -m loadtests.http_load {rest|grpc|ort} SPEC.json", file=sys.stderr)
        return 2
    kind, spec = argv[0], json.loads(Path(argv[1]).read_text())
    try:
        if kind == "ort":
            result = ort_measure(spec)
        else:
            import uvloop

            result = uvloop.run(rest_measure(spec) if kind == "rest" else grpc_measure(spec))
    except LoadError as exc:
        print(f"load generator: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
