"""predict over the Open Inference Protocol gRPC API (``inference.GRPCInferenceService/ModelInfer``)
of the gateway's sidecar.

Routes as the sidecar takes them (docs/sidecar.md): `model_name` is the route (its policy picks the
arm; a concrete model name with a `version` bypasses the router), ``parameters["unit_id"]`` keys
sticky routes, and the answer's parameters say route, arm, model, model_version, policy,
propensity and the request_id the prediction was logged under.

Tensors travel binary both ways: each input as ``raw_input_contents`` (little-endian, row-major;
BYTES elements as a 4-byte little-endian length and the bytes), outputs read from
``raw_output_contents`` (typed contents too, for another server). A row is one request, as over
Kafka and REST: each input gets a leading batch dimension of 1 and each output loses it.

Metadata: ``authorization: Bearer <token>``, W3C ``traceparent`` (and ``tracestate``) as over
REST. TLS with ``tls=True`` or any of the PEM arguments (a client certificate for mTLS).

Retries: UNAVAILABLE (a full queue, a model not ready, no connection) and RESOURCE_EXHAUSTED (too
many requests in flight) are retried up to `retries` times, waiting what the server's trailing
metadata says (``grpc-retry-pushback-ms``, else ``retry-after`` seconds), else an exponential
backoff from 0.1 s, capped by `max_backoff_s`; every other status is final (DEADLINE_EXCEEDED too:
the request may have been served).

grpcio and protobuf are imported when this module is, and this module only when a gRPC client is
made (``banditgate.client.GrpcClient`` resolves lazily).
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import urllib.parse
from collections.abc import Container, Mapping
from typing import Any, Self

import grpc
import numpy as np
import numpy.typing as npt

from banditgate.client.errors import ClientError, GatewayRejected, InvalidRequest
from banditgate.client.types import Prediction
from banditgate.client.validation import check_metadata
from banditgate.jsontypes import JSONObject
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from banditgate.tracecontext import trace_context

# numpy dtype -> OIP datatype of a binary tensor (as the gateway's oip_codec names them)
_DATATYPE = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16",
             np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.int8): "INT8",
             np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
             np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}
_DTYPE = {name: dtype for dtype, name in _DATATYPE.items()}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# the gateway's reason for each final status (its REST errors map the same way, client/http.py)
_REASONS = {grpc.StatusCode.INVALID_ARGUMENT: "bad_input", grpc.StatusCode.NOT_FOUND: "unknown_route",
            grpc.StatusCode.UNAUTHENTICATED: "not_authorized", grpc.StatusCode.PERMISSION_DENIED: "not_authorized",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded", grpc.StatusCode.UNAVAILABLE: "model_unavailable",
            grpc.StatusCode.DEADLINE_EXCEEDED: "timeout"}


def encode_tensor(name: str, value: Any) -> tuple[pb2.ModelInferRequest.InferInputTensor, bytes]:  # Any: numpy's array-likes
    """One request row as a binary OIP input tensor of shape [1, *row shape]; InvalidRequest with
    the gateway's reason for what it would refuse (``not_finite``, ``wrong_type``)."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype.kind in "US" or array.dtype == object:
        flat = array.reshape(-1)
        if not all(isinstance(v, (str, bytes)) for v in flat):
            raise InvalidRequest("wrong_type", f"input {name!r} mixes strings with other values")
        parts = [v.encode() if isinstance(v, str) else v for v in flat]
        raw = b"".join(struct.pack("<I", len(p)) + p for p in parts)
        datatype = "BYTES"
    else:
        known = _DATATYPE.get(array.dtype)
        if known is None:
            raise InvalidRequest("wrong_type", f"input {name!r} has dtype {array.dtype}, which OIP cannot carry")
        datatype = known
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidRequest("not_finite", f"input {name!r} holds a NaN or an infinity")
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1, *array.shape]), raw


def decode_output(tensor: pb2.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> np.ndarray:
    """An output tensor as numpy (from its raw bytes, else its typed contents); ClientError when the
    answer does not add up (a server speaking another protocol)."""
    shape = [int(d) for d in tensor.shape]
    count = math.prod(shape)
    if tensor.datatype == "BYTES":
        if raw is None:
            return np.array(list(tensor.contents.bytes_contents), dtype=object).reshape(shape)
        out = np.empty(count, dtype=object)
        offset = 0
        for i in range(count):
            if offset + 4 > len(raw):
                raise ClientError("bad_answer", f"output {tensor.name!r}: BYTES data ends early")
            (length,) = struct.unpack_from("<I", raw, offset)
            out[i] = raw[offset + 4:offset + 4 + length]
            offset += 4 + length
        return out.reshape(shape)
    dtype = _DTYPE.get(tensor.datatype)
    if dtype is None:
        raise ClientError("bad_answer", f"output {tensor.name!r} has unknown datatype {tensor.datatype!r}")
    if raw is None:
        if tensor.datatype == "FP16":
            raise ClientError("bad_answer", f"output {tensor.name!r}: FP16 comes only as raw contents")
        values = getattr(tensor.contents, _CONTENTS[tensor.datatype])
        array = np.asarray(values, dtype=dtype)
    else:
        if len(raw) != count * dtype.itemsize:
            raise ClientError("bad_answer", f"output {tensor.name!r}: {len(raw)} bytes for shape {shape} "
                                            f"{tensor.datatype}")
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    if array.size != count:
        raise ClientError("bad_answer", f"output {tensor.name!r}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _plain(parameter: pb2.InferParameter) -> Any:  # Any: protobuf's oneof (bool, int or str)
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def retry_hint(metadata: Any) -> float | None:  # Any: grpc's Metadata
    """Seconds the server asked us to wait (``grpc-retry-pushback-ms``, else ``retry-after``); None
    when it said nothing usable. A negative pushback means "do not retry" in gRPC: None too, the
    caller's backoff then applies."""
    pairs = {str(k).lower(): v for k, v in (metadata or ())}
    for key, scale in (("grpc-retry-pushback-ms", 1000.0), ("retry-after", 1.0)):
        value = pairs.get(key)
        if value is None:
            continue
        try:
            seconds = float(value.decode() if isinstance(value, bytes) else value) / scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


class GrpcClient:
    """Async OIP gRPC client (``async with GrpcClient("gateway:8081", token=...)``)."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, timeout_s: float = 10.0, retries: int = 3,
                 max_backoff_s: float = 5.0, routes: Container[str] | None = None, check_inputs: bool = True,
                 options: list[tuple[str, Any]] | None = None) -> None:  # Any: grpc's channel option values
        """`target`: host:port (a ``grpc://``/``grpcs://`` prefix is accepted; grpcs means TLS).
        TLS with `tls` or any PEM argument; `private_key` + `certificate_chain` for mTLS.
        `check_inputs`: fetch each route's metadata once and check inputs against it before sending.
        `options`: grpc channel options (e.g. grpc.max_receive_message_length)."""
        parsed = urllib.parse.urlsplit(target) if "://" in target else None
        if parsed is not None:
            if parsed.scheme not in ("grpc", "grpcs") or not parsed.netloc:
                raise ValueError(f"target {target!r} is not host:port, grpc://host:port or grpcs://host:port")
            tls = tls or parsed.scheme == "grpcs"
            target = parsed.netloc
        if retries < 0 or not timeout_s > 0 or max_backoff_s < 0:
            raise ValueError("retries and max_backoff_s must be >= 0 and timeout_s > 0")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain")
        self.target = target
        self.token = token
        self.tls = tls or root_certificates is not None or private_key is not None
        self._pems = (root_certificates, private_key, certificate_chain)
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_backoff_s = max_backoff_s
        self.routes = routes
        self.check_inputs = check_inputs
        self._options = list(options or [])
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb2_grpc.GRPCInferenceServiceStub | None = None
        self._metadata: dict[str, JSONObject] = {}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the channel (in the running event loop: a grpc.aio channel belongs to one loop)."""
        if self._channel is not None:
            return
        if self.tls:
            credentials = grpc.ssl_channel_credentials(*self._pems)
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=self._options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        self._stub = pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def metadata(self, route: str) -> JSONObject:
        """The route's model metadata (inputs, outputs) as the REST API gives it, cached."""
        if route not in self._metadata:
            stub = await self._started()
            answer = await self._call(stub.ModelMetadata, pb2.ModelMetadataRequest(name=route), self._auth())
            self._metadata[route] = {
                "name": answer.name, "versions": list(answer.versions), "platform": answer.platform,
                "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in answer.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in answer.outputs]}
        return self._metadata[route]

    async def predict(self, route: str, inputs: Mapping[str, npt.ArrayLike], *, unit: str | None = None,
                      request_id: str | None = None, version: int | None = None, traceparent: str | None = None,
                      tracestate: str | None = None) -> Prediction:
        """One row per input (as over Kafka); a route's policy picks the arm (`version`: only with a
        concrete model name). Raises InvalidRequest, GatewayRejected (with the gateway's reason) or
        ClientError."""
        if self.routes is not None and route not in self.routes:
            raise InvalidRequest("unknown_route", f"route {route!r} is not one of the routes given to the client")
        if not inputs:
            raise InvalidRequest("bad_input", "a request needs at least one input")
        encoded = [encode_tensor(name, value) for name, value in inputs.items()]
        if self.check_inputs:
            check_metadata({name: value if isinstance(value, np.ndarray) else np.asarray(value)
                            for name, value in inputs.items()}, await self.metadata(route))
        request = pb2.ModelInferRequest(model_name=route, model_version=str(version) if version is not None else "",
                                        id=request_id or "", inputs=[tensor for tensor, _ in encoded],
                                        raw_input_contents=[raw for _, raw in encoded])
        if unit is not None:
            request.parameters["unit_id"].string_param = unit
        trace = trace_context(traceparent, tracestate)
        metadata = self._auth() + tuple((name, value.decode()) for name, value in trace)
        stub = await self._started()
        started = time.monotonic()
        answer = await self._call(stub.ModelInfer, request, metadata)
        elapsed_ms = (time.monotonic() - started) * 1000.0
        params = {key: _plain(value) for key, value in answer.parameters.items()}
        raw = list(answer.raw_output_contents)
        if raw and len(raw) != len(answer.outputs):
            raise ClientError("bad_answer", f"{len(raw)} raw_output_contents for {len(answer.outputs)} outputs")
        outputs = {}
        for index, tensor in enumerate(answer.outputs):
            array = decode_output(tensor, raw[index] if raw else None)
            outputs[tensor.name] = array[0] if array.ndim and array.shape[0] == 1 else array
        return Prediction(request_id=str(params.get("request_id", request_id or "")),
                          route=str(params.get("route", route)), arm=str(params.get("arm", "")),
                          model=str(params.get("model", answer.model_name)),
                          model_version=int(params.get("model_version", 0)), policy=str(params.get("policy", "")),
                          propensity=float(params.get("propensity", 1.0)), outputs=outputs, latency_ms=elapsed_ms,
                          round_trip_ms=elapsed_ms, event=params, traceparent=trace[0][1].decode())

    async def _started(self) -> pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            await self.start()
        assert self._stub is not None  # noqa: S101 - start() set it
        return self._stub

    def _auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    async def _call(self, method: Any, request: Any, metadata: tuple[tuple[str, str], ...]) -> Any:  # Any: grpc's stub methods are untyped
        backoff = 0.1
        for attempt in range(self.retries + 1):
            try:
                return await method(request, metadata=metadata, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in _RETRIED or attempt == self.retries:
                    raise _rejected(exc, self.target) from None
                wait = retry_hint(exc.trailing_metadata())
            await asyncio.sleep(min(self.max_backoff_s, wait if wait is not None else backoff))
            backoff *= 2
        raise AssertionError("unreachable")  # pragma: no cover


def _rejected(exc: grpc.aio.AioRpcError, target: str) -> ClientError:
    code = exc.code()
    message = (exc.details() or code.name)[:500]
    if code == grpc.StatusCode.UNAVAILABLE and not exc.trailing_metadata():
        # no answer from a gateway at all (connection refused, TLS handshake failed)
        return ClientError("unreachable", f"{target} did not answer: {message}")
    return GatewayRejected(_REASONS.get(code, "grpc_error"), f"gRPC {code.name}: {message}")
