"""Blocking wrappers: each runs its async client on a private event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Container, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Self, TypedDict, TypeVar, Unpack

import numpy.typing as npt

from banditgate.client.http import HttpClient
from banditgate.client.kafka import KafkaClient
from banditgate.client.types import Prediction
from banditgate.jsontypes import JSONObject, JSONValue

if TYPE_CHECKING:
    from banditgate.client.grpc import GrpcClient

T = TypeVar("T")


# The keyword arguments each wrapper passes on unchanged (the async client's defaults apply).
class _Trace(TypedDict, total=False):
    traceparent: str | None
    tracestate: str | None


class _KafkaSend(_Trace, total=False):
    unit: str | None
    request_id: str | None
    items: list[str] | None


class _KafkaPredict(_KafkaSend, total=False):
    timeout_s: float


class _Outcome(_Trace, total=False):
    reward: float | None
    label: JSONValue
    clicks: list[str] | None
    ts: float | None


class _HttpOptions(TypedDict, total=False):
    token: str | None
    ssl_context: ssl.SSLContext | None
    timeout_s: float
    retries: int
    max_backoff_s: float
    routes: Container[str] | None
    check_inputs: bool


class _HttpPredict(_Trace, total=False):
    unit: str | None
    request_id: str | None


class _GrpcOptions(TypedDict, total=False):
    token: str | None
    tls: bool
    root_certificates: bytes | None
    private_key: bytes | None
    certificate_chain: bytes | None
    timeout_s: float
    retries: int
    max_backoff_s: float
    routes: Container[str] | None
    check_inputs: bool
    options: list[tuple[str, Any]] | None  # Any: grpc's channel option values are untyped


class _GrpcPredict(_HttpPredict, total=False):
    version: int | None


class _Loop:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="banditgate-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[object, None, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class SyncKafkaClient:
    """KafkaClient, blocking (``with SyncKafkaClient(...) as client``); same arguments."""

    def __init__(self, bootstrap_servers: str, **kwargs: Any) -> None:  # Any: KafkaClient passes what it does not name to aiokafka's untyped producer and consumer
        self._loop = _Loop()
        self._client = KafkaClient(bootstrap_servers, **kwargs)
        try:
            self._loop.run(self._client.start())
        except BaseException:
            self._loop.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def predict(self, route: str, inputs: Mapping[str, npt.ArrayLike], **kwargs: Unpack[_KafkaPredict]) -> Prediction:
        return self._loop.run(self._client.predict(route, inputs, **kwargs))

    def send(self, route: str, inputs: Mapping[str, npt.ArrayLike], **kwargs: Unpack[_KafkaSend]) -> str:
        return self._loop.run(self._client.send(route, inputs, **kwargs))

    def flush(self) -> None:
        self._loop.run(self._client.flush())

    def report_outcome(self, request_id: str, **kwargs: Unpack[_Outcome]) -> None:
        self._loop.run(self._client.report_outcome(request_id, **kwargs))

    def close(self) -> None:
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.stop()


class SyncHttpClient:
    """HttpClient, blocking; same arguments."""

    def __init__(self, base_url: str, **kwargs: Unpack[_HttpOptions]) -> None:
        self._client = HttpClient(base_url, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def predict(self, route: str, inputs: Mapping[str, npt.ArrayLike], **kwargs: Unpack[_HttpPredict]) -> Prediction:
        return asyncio.run(self._client.predict(route, inputs, **kwargs))

    def report_outcome(self, request_id: str, **kwargs: Unpack[_Outcome]) -> None:
        asyncio.run(self._client.report_outcome(request_id, **kwargs))


class SyncGrpcClient:
    """GrpcClient, blocking (``with SyncGrpcClient(...) as client``); same arguments. Its channel
    lives on a private event loop (a grpc.aio channel belongs to the loop that made it)."""

    def __init__(self, target: str, **kwargs: Unpack[_GrpcOptions]) -> None:
        from banditgate.client.grpc import GrpcClient  # grpcio only for a gRPC client

        self._client: GrpcClient = GrpcClient(target, **kwargs)
        self._loop = _Loop()
        try:
            self._loop.run(self._client.start())
        except BaseException:
            self._loop.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def metadata(self, route: str) -> JSONObject:
        return self._loop.run(self._client.metadata(route))

    def predict(self, route: str, inputs: Mapping[str, npt.ArrayLike], **kwargs: Unpack[_GrpcPredict]) -> Prediction:
        return self._loop.run(self._client.predict(route, inputs, **kwargs))

    def close(self) -> None:
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.stop()
