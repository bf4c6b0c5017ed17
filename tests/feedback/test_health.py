"""The feedback worker's liveness and readiness decisions (pure) and the web port that serves them
beside the metrics (a real HTTP server on loopback; the worker itself: test_health_stack.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from feedback.health import STALE_S, STALL_S, HealthBoard, Probe, liveness, readiness
from feedback.web import start_web_server

READY = Probe(at=100.0, started=True, rebalancing=False, recovered=True, redis_ok=True, partitions=(0, 2))


def test_nothing_reported_yet_is_starting_neither_live_nor_ready() -> None:
    assert not liveness(None, 0.0).ok
    assert not readiness(None, 0.0).ok
    assert "starting" in readiness(None, 0.0).reason


def test_ready_needs_recovered_partitions_and_redis() -> None:
    assert readiness(READY, 101.0).ok and readiness(READY, 101.0).partitions == (0, 2)
    for change, reason in [({"started": False}, "starting"), ({"rebalancing": True}, "rebalancing"),
                           ({"recovered": False}, "recovering"), ({"redis_ok": False}, "Redis does not answer"),
                           ({"fatal": True}, "fatal")]:
        answer = readiness(Probe(**{**READY.__dict__, **change}), 101.0)
        assert not answer.ok and reason in answer.reason, change


def test_a_worker_without_partitions_is_ready_it_idles() -> None:
    answer = readiness(Probe(**{**READY.__dict__, "partitions": ()}), 101.0)
    assert answer.ok and "idle" in answer.reason and answer.partitions == ()


def test_a_loop_that_stops_reporting_is_unready_then_dead() -> None:
    assert readiness(READY, 100.0 + STALE_S).ok
    assert not readiness(READY, 100.0 + STALE_S + 1).ok
    assert liveness(READY, 100.0 + STALE_S + 1).ok  # a slow loop is not restarted at once
    assert not liveness(READY, 100.0 + STALL_S + 1).ok
    # recovering or Redis away: live (restarting would only start the recovery again)
    assert liveness(Probe(**{**READY.__dict__, "recovered": False, "redis_ok": False}), 101.0).ok
    assert not liveness(Probe(**{**READY.__dict__, "fatal": True}), 101.0).ok


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def web() -> Iterator[tuple[int, HealthBoard]]:
    registry = CollectorRegistry()
    Counter("banditgate_feedback_probe_test", "a metric the port must keep serving", registry=registry).inc()
    now = [100.0]
    board = HealthBoard(clock=lambda: now[0])
    server, thread = start_web_server("127.0.0.1", 0, registry, board)
    yield server.server_port, board
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_web_port_serves_probes_beside_the_metrics(web: tuple[int, HealthBoard]) -> None:
    port, board = web
    status, body = _get(port, "/health/ready")
    assert status == 503 and json.loads(body)["ready"] is False
    assert _get(port, "/health/live")[0] == 503
    board.record(READY)
    status, body = _get(port, "/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True, "reason": "ready", "partitions": [0, 2]}
    status, body = _get(port, "/health/live")
    assert status == 200 and json.loads(body)["live"] is True
    board.record(Probe(**{**READY.__dict__, "redis_ok": False}))
    status, body = _get(port, "/health/ready")
    assert status == 503 and json.loads(body)["reason"] == "Redis does not answer"
    assert _get(port, "/health/ready", method="POST")[0] == 405
    status, body = _get(port, "/metrics")
    assert status == 200 and b"banditgate_feedback_probe_test_total 1.0" in body
