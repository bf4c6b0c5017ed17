"""Sidecar admission: at most `server.max_in_flight_requests` inference requests are served at
once; the next one is told to come back (429 / RESOURCE_EXHAUSTED with Retry-After) instead of
queueing behind an overloaded gateway. Found by the fault suite's overload scenario, where HTTP
callers waited behind the Kafka backlog and were never told to back off."""

from __future__ import annotations

import pytest

from banditgate.config import parse_config
from gateway.errors import TooManyRequests
from gateway.transport.http import SidecarContext, _error


def _context(limit: int) -> SidecarContext:
    config = parse_config({"server": {"max_in_flight_requests": limit},
                           "routes": [{"name": "r", "arms": [{"name": "a", "model": "m"}]}]}, env={})
    return SidecarContext(config=config, dataplane=None, publish=lambda topic, events: None,  # type: ignore[arg-type]
                          produce_outcomes=None, is_ready=lambda: True)  # type: ignore[arg-type]


def test_the_request_over_the_limit_gets_429_with_retry_after() -> None:
    ctx = _context(limit=2)
    with ctx.admitted(), ctx.admitted():
        assert ctx.in_flight == 2
        with pytest.raises(TooManyRequests) as raised:
            with ctx.admitted():
                pass  # pragma: no cover - never entered
        response = _error(raised.value)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert raised.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert ctx.in_flight == 0


def test_a_slot_is_released_when_serving_fails() -> None:
    ctx = _context(limit=1)
    with pytest.raises(RuntimeError):
        with ctx.admitted():
            raise RuntimeError("inference blew up")
    with ctx.admitted():  # the slot came back
        assert ctx.in_flight == 1


def test_grpc_overload_says_when_to_retry() -> None:
    from gateway.errors import InvalidInput, Overloaded
    from gateway.transport.grpc_server import retry_trailers

    assert dict(retry_trailers(TooManyRequests("busy", retry_after_s=1.0))) == {
        "retry-after": "1", "grpc-retry-pushback-ms": "1000"}
    assert dict(retry_trailers(Overloaded("queue full", retry_after_s=2.4)))["retry-after"] == "2"
    assert retry_trailers(InvalidInput("bad")) == ()
