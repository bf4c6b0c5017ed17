"""The HTTP bench's load generator: open-loop accounting (no coordinated omission) and response framing.

Pure: a fake clock and a fake transport, no sockets and no servers.
"""

from __future__ import annotations

import pytest

from loadtests.http_load import OpenLoop, _RestConnection, http_request, summarise


def test_requests_fall_due_at_start_plus_index_over_rate() -> None:
    run = OpenLoop(rate_rps=1000.0, total=5, start=10.0, slots=4)
    assert run.next_due() == 10.0
    assert run.poll(9.9999) == []
    sent = run.poll(10.0025)  # requests 0, 1, 2 are due (10.000, 10.001, 10.002)
    assert len(sent) == 3 and len(set(sent)) == 3
    assert run.next_due() == pytest.approx(10.003)
    assert list(run.send_lags_ns) == pytest.approx([2_500_000, 1_500_000, 500_000], abs=2)
    assert run.poll(10.1) != [] and run.all_due and run.next_due() is None


def test_a_stalled_server_is_charged_for_every_request_it_delayed() -> None:
    # one connection, 1000 requests/s; request 0 takes 50 ms, every other one 0.1 ms
    run = OpenLoop(rate_rps=1000.0, total=60, start=0.0, slots=1)
    (slot,) = run.poll(0.0)
    assert run.poll(0.0495) == []  # 49 more are due, but the only connection is busy
    now = 0.050
    again = run.complete(slot, now)
    while again is not None:  # the backlog goes out back to back as answers come in
        now += 0.0001
        again = run.complete(again, now)
    latencies_ms = [v / 1e6 for v in run.latencies_ns]
    assert latencies_ms[0] == pytest.approx(50.0)
    # request 10 was due at 10 ms and answered at 50 ms + 10 x 0.1 ms: 41 ms, not the 0.1 ms a
    # closed-loop client (timing from its actual send) would report
    assert latencies_ms[10] == pytest.approx(41.0)
    assert min(latencies_ms) > 0.1 and run.answered == 50
    # the waiting shows as send lag too: request 49, due at 49 ms, left at 50 + 48 x 0.1 ms
    assert run.send_lags_ns[49] == pytest.approx(5_800_000, abs=2)


def test_errors_are_counted_and_not_mixed_into_latencies() -> None:
    run = OpenLoop(rate_rps=100.0, total=3, start=0.0, slots=3)
    sent = run.poll(0.05)
    run.complete(sent[0], 0.06, ok=False)
    run.complete(sent[1], 0.06)
    run.complete(sent[2], 0.06)
    assert (run.answered, run.errors, len(run.latencies_ns)) == (2, 1, 2)
    result = summarise(run, throughput_rps=200.0, throughput_errors=0, connections=3)
    assert result["latency_errors"] == 1 and result["latency_unanswered"] == 0


def test_percentiles_come_from_the_histogram_in_milliseconds() -> None:
    run = OpenLoop(rate_rps=1000.0, total=100, start=0.0, slots=100)
    sent = run.poll(0.1)
    for index, slot in enumerate(sent):  # request i answered (i + 1) ms after it was due
        run.complete(slot, index / 1000.0 + (index + 1) / 1000.0)
    result = summarise(run, 2000.0, 0, 100)
    assert result["p50_ms"] == pytest.approx(50.0, rel=0.002)
    assert result["p99_ms"] == pytest.approx(99.0, rel=0.002)
    assert result["throughput_rps"] == 2000.0


def test_open_loop_rejects_a_rate_of_zero() -> None:
    with pytest.raises(ValueError):
        OpenLoop(rate_rps=0.0, total=1, start=0.0, slots=1)


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_responses_are_framed_by_content_length_across_reads() -> None:
    seen: list[tuple[int, int]] = []
    connection = _RestConnection(7, lambda slot, status, now: seen.append((slot, status)))
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    first = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
    second = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nRetry-After: 1\r\n\r\n{}"
    stream = first + second
    connection.data_received(stream[:20])
    connection.data_received(stream[20:len(first) - 3])
    assert seen == []
    connection.data_received(stream[len(first) - 3:len(first) + 5])
    assert seen == [(7, 200)]
    connection.data_received(stream[len(first) + 5:])
    assert seen == [(7, 200), (7, 503)] and not connection.buffer


def test_a_response_without_content_length_closes_the_connection_with_a_reason() -> None:
    connection = _RestConnection(0, lambda *args: None)
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert transport.closed and "Content-Length" in str(connection.failure)


def test_requests_are_encoded_once_as_keep_alive_posts() -> None:
    request = http_request("127.0.0.1", 8080, "/v2/models/m/infer", b'{"inputs":[]}')
    head, body = request.split(b"\r\n\r\n")
    assert head.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
    assert b"Content-Length: 13" in head and b"Connection: close" not in head and body == b'{"inputs":[]}'
