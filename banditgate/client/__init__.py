"""banditgate's client library: what a product service imports (docs/client.md).

Small and typed, importing no server code (only banditgate.events, the contracts): requests are
checked here with the gateway's own validators, so a wrong event fails in the caller with the
reason name the gateway would have dead-lettered it with.

- :class:`KafkaClient` (async): ``predict`` by request-reply over Kafka (the request carries
  ``reply_to``; the gateway also publishes the prediction there), ``send`` fire-and-forget,
  ``report_outcome``.
- :class:`HttpClient` (async): ``predict`` and ``report_outcome`` over the Open Inference
  Protocol REST API, with a bearer token, TLS and retries that honour ``Retry-After``.
- :class:`GrpcClient` (async): ``predict`` over the Open Inference Protocol gRPC API, binary
  tensors both ways, with a bearer token, TLS and retries that honour the server's retry hint.
  It is imported on first use (``banditgate.client.GrpcClient``), so grpcio and protobuf load only
  for a service that speaks gRPC.
- :class:`SyncKafkaClient`, :class:`SyncHttpClient`, :class:`SyncGrpcClient`: the same, blocking
  (a private event loop).
"""

from typing import TYPE_CHECKING

from banditgate.client.errors import ClientError, GatewayRejected, InvalidRequest, PredictionTimeout
from banditgate.client.http import HttpClient
from banditgate.client.kafka import KafkaClient
from banditgate.client.sync import SyncGrpcClient, SyncHttpClient, SyncKafkaClient
from banditgate.client.types import Prediction

if TYPE_CHECKING:
    from banditgate.client.grpc import GrpcClient

__all__ = ["ClientError", "GatewayRejected", "GrpcClient", "HttpClient", "InvalidRequest", "KafkaClient",
           "Prediction", "PredictionTimeout", "SyncGrpcClient", "SyncHttpClient", "SyncKafkaClient"]


def __getattr__(name: str) -> object:
    # the gRPC client loads grpcio and protobuf: only when a caller asks for it
    if name == "GrpcClient":
        from banditgate.client.grpc import GrpcClient

        return GrpcClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
