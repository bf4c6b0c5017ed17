"""`grpc.health.v1.Health` follows the readiness it is given: Check and Watch over a real gRPC
server on loopback (the gateway's kind: a sync `grpc.server` on threads) (no Kafka needed: readiness is a flag here; tests/sidecar/test_grpc_health_stack.py
runs it in a real gateway)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gateway.transport.grpc_health import SERVICES, HealthServicer, serving_status
from banditgate.proto import health_pb2, health_pb2_grpc

Response = health_pb2.HealthCheckResponse


def test_serving_status_names_the_services_this_server_runs() -> None:
    assert SERVICES == {"", "inference.GRPCInferenceService", "banditgate.Feedback"}
    assert serving_status("", True) == Response.SERVING
    assert serving_status("inference.GRPCInferenceService", False) == Response.NOT_SERVING
    assert serving_status("grpc.reflection.v1.ServerReflection", True) == Response.SERVICE_UNKNOWN


async def test_check_and_watch_follow_readiness() -> None:
    ready = {"value": False}
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(lambda: ready["value"], interval_s=0.01), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest
            assert (await stub.Check(check(service=""), timeout=10)).status == Response.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Check(check(service="no.such.Service"), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            watch = stub.Watch(check(service="banditgate.Feedback"), timeout=30)
            assert (await watch.read()).status == Response.NOT_SERVING
            ready["value"] = True
            assert (await watch.read()).status == Response.SERVING
            assert (await stub.Check(check(service="inference.GRPCInferenceService"), timeout=10)).status \
                == Response.SERVING
            ready["value"] = False
            assert (await watch.read()).status == Response.NOT_SERVING
            watch.cancel()

            # an unknown name: SERVICE_UNKNOWN, and the call stays open (the protocol's Watch)
            unknown_watch = stub.Watch(check(service="no.such.Service"), timeout=30)
            assert (await unknown_watch.read()).status == Response.SERVICE_UNKNOWN
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(unknown_watch.read(), timeout=0.2)  # nothing more: no change
            unknown_watch.cancel()
    finally:
        await asyncio.to_thread(server.stop(grace=None).wait)
