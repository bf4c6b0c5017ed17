"""A real `banditgate serve` answers `grpc.health.v1.Health` beside the OIP service, with the same
readiness as OIP's ServerReady, and turns NOT_SERVING as soon as SIGTERM starts its drain (what a
Kubernetes gRPC readiness probe, or a load balancer watching, sees)."""

from __future__ import annotations

import signal

import grpc
import pytest

from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from banditgate.proto import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.stack

Response = health_pb2.HealthCheckResponse
Request = health_pb2.HealthCheckRequest


def test_health_service_serves_readiness_and_drains_on_sigterm(served) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        oip = pb2_grpc.GRPCInferenceServiceStub(channel)
        assert oip.ServerReady(pb2.ServerReadyRequest(), timeout=10).ready
        for service in ("", "inference.GRPCInferenceService", "banditgate.Feedback"):
            assert health.Check(Request(service=service), timeout=10).status == Response.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(Request(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        watch = health.Watch(Request(service=""), timeout=60)
        statuses = [next(watch).status]
        served.process.send_signal(signal.SIGTERM)
        try:
            for message in watch:  # until the server ends the stream as it stops
                statuses.append(message.status)
        except grpc.RpcError as ended:
            assert ended.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), ended
    assert statuses[0] == Response.SERVING
    assert Response.NOT_SERVING in statuses[1:], statuses
    assert served.process.wait(timeout=60) == 0, served.log()[-2000:]
