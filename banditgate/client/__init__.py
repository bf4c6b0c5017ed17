"""banditgate's client library: what a product service imports (docs/client.md).

Small and typed, importing no server code (only banditgate.events, the contracts): requests are
checked here with the gateway's own validators, so a wrong event fails in the caller with the
reason name the gateway would have dead-lettered it with.

- :class:`KafkaClient` (async): ``predict`` by request-reply over Kafka (the request carries
  ``reply_to``; the gateway also publishes the prediction there), ``send`` fire-and-forget,
  ``report_outcome``.
- :class:`HttpClient` (async): ``predict`` and ``report_outcome`` over the Open Inference
  Protocol REST API, with a bearer token, TLS and retries that honour ``Retry-After``.
- :class:`SyncKafkaClient`, :class:`SyncHttpClient`: the same, blocking (a private event loop).
"""

from banditgate.client.errors import ClientError, GatewayRejected, InvalidRequest, PredictionTimeout
from banditgate.client.http import HttpClient
from banditgate.client.kafka import KafkaClient
from banditgate.client.sync import SyncHttpClient, SyncKafkaClient
from banditgate.client.types import Prediction

__all__ = ["ClientError", "GatewayRejected", "HttpClient", "InvalidRequest", "KafkaClient", "Prediction",
           "PredictionTimeout", "SyncHttpClient", "SyncKafkaClient"]
