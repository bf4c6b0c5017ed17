"""`grpc.health.v1.Health` beside the OIP endpoints: the standard check that Kubernetes' gRPC
probes, grpc_health_probe and gRPC load balancers call.

The status is the gateway's readiness, the same answer as REST's ``/v2/health/ready`` and OIP's
``ServerReady``: SERVING once started with the broker reachable, NOT_SERVING while Kafka does not
answer and from the first moment of a shutdown, so a probe takes the replica out of rotation while
it drains. Like the other health endpoints it needs no token (docs/sidecar.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc

from banditgate.proto import banditgate_service_pb2 as bg_pb2
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import health_pb2, health_pb2_grpc

Status = health_pb2.HealthCheckResponse.ServingStatus
SERVICES = frozenset({"", pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                      bg_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name})
"""The names a check may ask about: "" (the whole server) and the services this server runs."""
WATCH_INTERVAL_S = 0.25
"""How often a Watch stream looks at readiness again (one attribute read: a watcher costs nothing
measurable, and a change reaches it within this time)."""


def serving_status(service: str, ready: bool) -> Status:
    """SERVING or NOT_SERVING (readiness) for a known service name, SERVICE_UNKNOWN otherwise."""
    if service not in SERVICES:
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check and Watch, answered from `is_ready` (the gateway's readiness)."""

    def __init__(self, is_ready: Callable[[], bool], interval_s: float = WATCH_INTERVAL_S) -> None:
        self._is_ready = is_ready
        self._interval_s = interval_s

    def Check(self, request: health_pb2.HealthCheckRequest,  # noqa: N802 - names fixed by the proto
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = serving_status(request.service, self._is_ready())
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            # the protocol's answer to an unknown name (a probe naming a service we do not run)
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: health_pb2.HealthCheckRequest,  # noqa: N802
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        """The current status at once, then one message per change. It runs (holding one of the
        server's threads) until the caller hangs up or the server stops, noticed within one
        interval; an unknown name gets SERVICE_UNKNOWN and the call stays open, as the protocol
        says."""
        last: Status | None = None
        while context.is_active():
            status = serving_status(request.service, self._is_ready())
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            time.sleep(self._interval_s)


def add_health(server: grpc.Server, is_ready: Callable[[], bool]) -> None:
    """Serve `grpc.health.v1.Health` on `server`, following `is_ready`."""
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(is_ready), server)
