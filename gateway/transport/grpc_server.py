"""gRPC sidecar: `inference.GRPCInferenceService` (the OIP proto), `banditgate.Feedback` and
`grpc.health.v1.Health` (grpc_health.py), on grpc.aio in the gateway's own event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np

from banditgate import __version__
from banditgate.events import EventError, outcome_from_obj
from banditgate.tracecontext import from_mapping
from banditgate.tracing import ServerSpan, server_span
from gateway.dataplane import serve_tensors
from gateway.errors import GatewayError, InvalidInput, ModelNotFound, Overloaded
from gateway.request_ids import new_request_id
from gateway.transport.grpc_health import add_health
from gateway.transport.http import EXTENSIONS, SidecarContext, _label_name
from gateway.transport.oip_codec import DTYPES, _raw_bytes, datatype_for, tensor_from_raw
from gateway.transport.proto import banditgate_service_pb2 as bg_pb2
from gateway.transport.proto import banditgate_service_pb2_grpc as bg_grpc
from gateway.transport.proto import grpc_predict_v2_pb2 as pb2
from gateway.transport.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from gateway.validation import check_shape, numbers_for

_CONTENT_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


_CONTENT_DTYPE = {"bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32),
                  "int64_contents": np.dtype(np.int64), "uint_contents": np.dtype(np.uint32),
                  "uint64_contents": np.dtype(np.uint64), "fp32_contents": np.dtype(np.float32),
                  "fp64_contents": np.dtype(np.float64)}


def _parameter(value: Any) -> pb2.InferParameter:
    if isinstance(value, bool):
        return pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb2.InferParameter(int64_param=value)
    return pb2.InferParameter(string_param=str(value))


def retry_trailers(exc: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling a gRPC caller when to come back after an overload: `retry-after`
    (seconds, as REST's header) and `grpc-retry-pushback-ms`, which gRPC's own retry policy obeys."""
    if not isinstance(exc, Overloaded):
        return ()
    seconds = max(1, round(exc.retry_after_s))
    return (("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000)))


async def abort(context: grpc.aio.ServicerContext, exc: GatewayError) -> None:
    """End the call with the error's status, its one-line message and, on overload, when to retry."""
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc), trailing_metadata=retry_trailers(exc))


def _plain(parameter: pb2.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def decode_inputs(request: pb2.ModelInferRequest, max_elements: int, max_inputs: int) -> dict[str, np.ndarray]:
    """numpy arrays from a ModelInferRequest (raw_input_contents or typed contents); raise InvalidInput."""
    if not request.inputs:
        raise InvalidInput("request has no inputs")
    if len(request.inputs) > max_inputs:
        raise InvalidInput(f"request has {len(request.inputs)} inputs, over the limit of {max_inputs}")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    feeds = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.datatype not in DTYPES:
            raise InvalidInput(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
        shape = list(tensor.shape)
        count = check_shape(shape, tensor.name, max_elements)
        if raw:
            feeds[tensor.name] = tensor_from_raw(tensor.name, tensor.datatype, shape, raw[index])
            continue
        if tensor.datatype == "FP16":
            raise InvalidInput(f"input {tensor.name!r}: FP16 must be sent as raw_input_contents")
        values = getattr(tensor.contents, _CONTENT_FIELD[tensor.datatype])
        if len(values) != count:
            raise InvalidInput(f"input {tensor.name!r}: {len(values)} values for shape {shape} ({count} expected)")
        if tensor.datatype == "BYTES":
            feeds[tensor.name] = np.array(list(values), dtype=object).reshape(shape)
            continue
        # the proto field's own width (int_contents is int32 for INT8/16/32), then the declared
        # datatype through the one checked cast: INT8 300 is out_of_range, never wrapped or UNKNOWN
        wide = np.asarray(values, dtype=_CONTENT_DTYPE[_CONTENT_FIELD[tensor.datatype]])
        feeds[tensor.name] = numbers_for(wide, DTYPES[tensor.datatype], f"input {tensor.name!r}").reshape(shape)
    return feeds


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The call's `authorization` metadata (grpc gives bytes only for keys ending in -bin)."""
    value = dict(context.invocation_metadata() or ()).get("authorization")
    return value if isinstance(value, str) else None


MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
"""The server span's name (rpc.service/rpc.method)."""


class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, ctx: SidecarContext) -> None:
        self.ctx = ctx

    async def _guard(self, context: grpc.aio.ServicerContext, admin: bool = False) -> None:
        try:
            self.ctx.check_token(_authorization(context), admin)
        except GatewayError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))

    async def ServerLive(self, request: pb2.ServerLiveRequest,  # noqa: N802 - names fixed by the proto
                         context: grpc.aio.ServicerContext) -> pb2.ServerLiveResponse:
        return pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb2.ServerReadyRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb2.ServerReadyResponse:
        return pb2.ServerReadyResponse(ready=self.ctx.is_ready())

    async def ModelReady(self, request: pb2.ModelReadyRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb2.ModelReadyResponse:
        await self._guard(context)
        try:
            self.ctx.describe(request.name, request.version or None)
            available = self.ctx.available(request.name, request.version or None)
        except GatewayError:
            return pb2.ModelReadyResponse(ready=False)
        return pb2.ModelReadyResponse(ready=self.ctx.is_ready() and available)

    async def ServerMetadata(self, request: pb2.ServerMetadataRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> pb2.ServerMetadataResponse:
        await self._guard(context)
        return pb2.ServerMetadataResponse(name="banditgate", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb2.ModelMetadataRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb2.ModelMetadataResponse:
        await self._guard(context)
        try:
            doc = self.ctx.describe(request.name, request.version or None)
        except GatewayError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        tensor = pb2.ModelMetadataResponse.TensorMetadata
        return pb2.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["outputs"]])

    async def ModelInfer(self, request: pb2.ModelInferRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb2.ModelInferResponse:
        if not self.ctx.tracing.enabled:
            return await self._model_infer(request, context)
        # tracing on: a server span, child of the metadata's traceparent (banditgate.tracing.server_span)
        traced = server_span(self.ctx.tracing, "grpc", MODEL_INFER, request.model_name,
                             from_mapping(dict(context.invocation_metadata() or ())))
        try:
            response = await self._model_infer(request, context, traced)
        except BaseException as exc:
            if traced is not None:  # an abort raised: the code it set is the call's status
                code = context.code() if isinstance(exc, grpc.aio.AbortError) else None
                traced.end(exc, status=code.name if isinstance(code, grpc.StatusCode) else None)
            raise
        if traced is not None:
            traced.end()
        return response

    async def _model_infer(self, request: pb2.ModelInferRequest, context: grpc.aio.ServicerContext,
                           traced: ServerSpan | None = None) -> pb2.ModelInferResponse:
        received = time.monotonic()
        server = self.ctx.config.server
        if server.infer_tokens:
            await self._guard(context)
        try:
            feeds = decode_inputs(request, server.max_tensor_elements, server.max_inputs)
            request_id = request.id or new_request_id()
            unit = _plain(request.parameters["unit_id"]) if "unit_id" in request.parameters else None
            topics = self.ctx.config.kafka.topics
            trace = from_mapping(dict(context.invocation_metadata() or ())) if traced is None else traced.trace
            with self.ctx.admitted():
                async with asyncio.timeout(server.request_timeout_s):
                    answer = await serve_tensors(
                        self.ctx.dataplane, request.model_name, request.model_version or None, feeds, request_id,
                        str(unit) if unit is not None else None, time.time(), received,
                        on_shadows=lambda events: self.ctx.publish(topics.shadow_predictions, events, trace=trace),
                        stages=traced.stages if traced is not None else None)
        except TimeoutError:
            self.ctx.record(_label_name(self.ctx, request.model_name), "grpc", error=TimeoutError("timeout"))
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"inference did not finish within {server.request_timeout_s}s")
        except GatewayError as exc:
            self.ctx.record(_label_name(self.ctx, request.model_name), "grpc", error=exc)
            await abort(context, exc)
        self.ctx.record(_label_name(self.ctx, request.model_name), "grpc", arm=answer.arm)
        self.ctx.publish(self.ctx.config.kafka.topics.predictions, answer.events, trace=trace)
        outputs = answer.outputs
        if request.outputs:
            wanted = [o.name for o in request.outputs]
            missing = [n for n in wanted if n not in outputs]
            if missing:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requested output {missing[0]!r} does not exist")
            outputs = {n: outputs[n] for n in wanted}
        response_parameters = {"model": answer.model.name, "model_version": answer.model.version,
                               "policy": answer.policy, "propensity": str(answer.propensity), "request_id": request_id}
        if answer.arm is not None:
            response_parameters["arm"] = answer.arm
            response_parameters["route"] = request.model_name
        return pb2.ModelInferResponse(
            model_name=request.model_name, model_version=str(answer.model.version), id=request.id,
            parameters={k: _parameter(v) for k, v in response_parameters.items()},
            outputs=[pb2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype_for(array),
                                                              shape=list(array.shape))
                     for name, array in outputs.items()],
            raw_output_contents=[_raw_bytes(array) for array in outputs.values()])


class FeedbackServicer(bg_grpc.FeedbackServicer):
    def __init__(self, ctx: SidecarContext) -> None:
        self.ctx = ctx

    async def PostOutcomes(self, request: bg_pb2.OutcomesRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> bg_pb2.OutcomesResponse:
        try:
            self.ctx.check_token(_authorization(context), admin=False)
        except GatewayError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        accepted, errors = [], []
        for index, item in enumerate(request.outcomes):
            obj: dict[str, Any] = {"request_id": item.request_id}
            if item.HasField("reward"):
                obj["reward"] = item.reward
            if item.HasField("label"):
                obj["label"] = item.label
            if item.HasField("ts"):
                obj["ts"] = item.ts
            if item.clicks:
                obj["clicks"] = list(item.clicks)
            try:
                accepted.append(outcome_from_obj(obj).to_dict())
            except EventError as exc:
                errors.append(f"outcome {index}: {exc}")
        if errors:
            return bg_pb2.OutcomesResponse(accepted=0, errors=errors)
        try:
            trace = from_mapping(dict(context.invocation_metadata() or ()))
            await (self.ctx.produce_outcomes(accepted, trace) if trace else self.ctx.produce_outcomes(accepted))
        except GatewayError as exc:  # refused by the broker (INVALID_ARGUMENT) or Kafka away (UNAVAILABLE)
            await abort(context, exc)
        return bg_pb2.OutcomesResponse(accepted=len(accepted))


def build_server(ctx: SidecarContext, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with both services and the standard health service, bound to the configured
    host/port; returns (server, port)."""
    server_config = ctx.config.server
    options = [("grpc.max_receive_message_length", server_config.max_body_bytes),
               ("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_concurrent_streams", server_config.grpc_max_concurrent_streams),
               # soft and hard limit equal: metadata over max_header_bytes is always refused
               ("grpc.max_metadata_size", server_config.max_header_bytes),
               ("grpc.absolute_max_metadata_size", server_config.max_header_bytes)]
    server = grpc.aio.server(options=options)
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(ctx), server)
    bg_grpc.add_FeedbackServicer_to_server(FeedbackServicer(ctx), server)
    add_health(server, ctx.is_ready)
    address = f"{server_config.host}:{server_config.grpc_port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    return server, port


__all__ = ["ModelNotFound", "build_server", "decode_inputs"]
