"""gRPC sidecar: `inference.GRPCInferenceService` (the OIP proto), `banditgate.Feedback` and
`grpc.health.v1.Health` (grpc_health.py) on a sync `grpc.server`: the transport runs in grpc's
threads, the work that touches the gateway's state on its event loop: ModelInfer's in bursts
(grpc_handoff.InferQueue: decoded and encoded in the call's thread, routed and batched on the
loop with the calls that came with it), the other calls and traced ModelInfer one at a time
(CallBridge).

Why not grpc.aio in the loop: measured on the bench's pinned core, a grpc.aio service that does
nothing costs more server CPU per call than a sync one, and banditgate's grpc.aio servicer cost
far more than that floor (docs/sidecar.md "Where the time goes")."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NoReturn

import grpc
import numpy as np

from banditgate import __version__
from banditgate.events import EventError, outcome_from_obj
from banditgate.jsontypes import JSONObject, JSONValue
from banditgate.proto import banditgate_service_pb2 as bg_pb2
from banditgate.proto import banditgate_service_pb2_grpc as bg_grpc
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from banditgate.tracecontext import from_mapping
from banditgate.tracing import ServerSpan, server_span
from gateway.dataplane import TensorAnswer, serve_tensors
from gateway.errors import GatewayError, InvalidInput, ModelNotFound, Overloaded
from gateway.request_ids import new_request_id
from gateway.transport.grpc_handoff import Cancelled, InferCall, InferQueue
from gateway.transport.grpc_health import add_health
from gateway.transport.http import EXTENSIONS, SidecarContext, _label_name
from gateway.transport.oip_codec import DTYPES, _raw_bytes, datatype_for, tensor_from_raw
from gateway.validation import check_shape, numbers_for

_CONTENT_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


_CONTENT_DTYPE = {"bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32),
                  "int64_contents": np.dtype(np.int64), "uint_contents": np.dtype(np.uint32),
                  "uint64_contents": np.dtype(np.uint64), "fp32_contents": np.dtype(np.float32),
                  "fp64_contents": np.dtype(np.float64)}


def _parameter(value: str | int) -> pb2.InferParameter:
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


def _plain(parameter: pb2.InferParameter) -> JSONValue:
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


class Abort(Exception):
    """End a call with `code`, a one-line `details` and trailing metadata (raised on the event loop,
    applied in the call's thread)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


def aborted(exc: GatewayError) -> Abort:
    """The Abort for a gateway error: its status, its one-line message and, on overload, when to retry."""
    return Abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc), retry_trailers(exc))


def _metadata(context: grpc.ServicerContext) -> dict[str, str | bytes]:
    return dict(context.invocation_metadata() or ())


def _authorization(metadata: dict[str, str | bytes]) -> str | None:
    """The call's `authorization` metadata (grpc gives bytes only for keys ending in -bin)."""
    value = metadata.get("authorization")
    return value if isinstance(value, str) else None


Metadata = dict[str, str | bytes]
LoopHandler = Callable[[Any, Metadata], Coroutine[Any, Any, Any]]  # Any: protobuf messages of several types


MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
"""The server span's name (rpc.service/rpc.method)."""


class CallBridge:
    """Runs a call's loop-side work (`LoopHandler`) on the gateway's event loop from a gRPC server
    thread and waits for it there: routing, batching, admission, metrics and publication stay on
    the loop, the gRPC transport (HTTP/2, protobuf, metadata) runs in grpc's threads.

    A call the client cancels (or whose deadline passes) cancels its loop-side work, as grpc.aio
    did; a loop that stopped answers UNAVAILABLE."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self, handler: LoopHandler, request: Any, metadata: Metadata,  # Any: a protobuf message
            context: grpc.ServicerContext) -> Any:  # Any: a protobuf message
        loop = self.loop
        if loop is None or loop.is_closed():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is not serving (starting or stopped)")
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(  # Any: a protobuf message
            handler(request, metadata), loop)

        def cancel() -> None:  # runs when the call ends: a no-op once it answered
            future.cancel()

        context.add_callback(cancel)
        try:
            return future.result()
        except Abort as exc:
            fail(context, exc)
        except concurrent.futures.CancelledError:
            fail(context, Abort(grpc.StatusCode.UNAVAILABLE, "the call was cancelled (client gone or shutdown)"))
        raise AssertionError("unreachable")  # pragma: no cover - fail() raises


def fail(context: grpc.ServicerContext, exc: Abort) -> NoReturn:
    """End the call in its thread: trailers first, then the status (context.abort raises)."""
    if exc.trailers:
        context.set_trailing_metadata(exc.trailers)
    context.abort(exc.code, exc.details)
    raise AssertionError("context.abort returned")  # pragma: no cover


class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`. Each method runs in a gRPC server thread; what touches the
    gateway's state (dataplane, admission, metrics, publisher) runs on the event loop: through
    the InferQueue for ModelInfer, through the bridge for the rest (and for ModelInfer with
    tracing on, whose server span covers its loop-side stages)."""

    def __init__(self, ctx: SidecarContext, bridge: CallBridge, infer_queue: InferQueue) -> None:
        self.ctx = ctx
        self.bridge = bridge
        self.infer_queue = infer_queue

    def _guard(self, metadata: Metadata, context: grpc.ServicerContext, admin: bool = False) -> None:
        try:
            self.ctx.check_token(_authorization(metadata), admin)
        except GatewayError as exc:
            fail(context, Abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc)))

    def ServerLive(self, request: pb2.ServerLiveRequest,  # noqa: N802 - names fixed by the proto
                   context: grpc.ServicerContext) -> pb2.ServerLiveResponse:
        return pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb2.ServerReadyRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> pb2.ServerReadyResponse:
        return pb2.ServerReadyResponse(ready=self.ctx.is_ready())

    def ModelReady(self, request: pb2.ModelReadyRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> pb2.ModelReadyResponse:
        metadata = _metadata(context)
        self._guard(metadata, context)
        return self.bridge.run(self._model_ready, request, metadata, context)

    async def _model_ready(self, request: pb2.ModelReadyRequest, metadata: Metadata) -> pb2.ModelReadyResponse:
        try:
            self.ctx.describe(request.name, request.version or None)
            available = self.ctx.available(request.name, request.version or None)
        except GatewayError:
            return pb2.ModelReadyResponse(ready=False)
        return pb2.ModelReadyResponse(ready=self.ctx.is_ready() and available)

    def ServerMetadata(self, request: pb2.ServerMetadataRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> pb2.ServerMetadataResponse:
        self._guard(_metadata(context), context)
        return pb2.ServerMetadataResponse(name="banditgate", version=__version__, extensions=EXTENSIONS)

    def ModelMetadata(self, request: pb2.ModelMetadataRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> pb2.ModelMetadataResponse:
        metadata = _metadata(context)
        self._guard(metadata, context)
        return self.bridge.run(self._model_metadata, request, metadata, context)

    async def _model_metadata(self, request: pb2.ModelMetadataRequest, metadata: Metadata) -> pb2.ModelMetadataResponse:
        try:
            doc = self.ctx.describe(request.name, request.version or None)
        except GatewayError as exc:
            raise Abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc)) from None
        tensor = pb2.ModelMetadataResponse.TensorMetadata
        return pb2.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in doc["outputs"]])

    def ModelInfer(self, request: pb2.ModelInferRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> pb2.ModelInferResponse:
        received = time.monotonic()
        metadata = _metadata(context)
        ctx = self.ctx
        if ctx.config.server.infer_tokens:
            self._guard(metadata, context)
        if ctx.tracing.enabled:  # a server span per call, on the loop (its stages are the loop's)
            return self.bridge.run(partial(self._infer, received), request, metadata, context)
        # decoded here, routed and batched on the loop with the calls that came with it, encoded here
        server = ctx.config.server
        unit = _plain(request.parameters["unit_id"]) if "unit_id" in request.parameters else None
        request_id = request.id or new_request_id()
        call = InferCall(request.model_name, request.model_version or None, request_id,
                         str(unit) if unit is not None else None, received, from_mapping(metadata))
        try:
            call.feeds = decode_inputs(request, server.max_tensor_elements, server.max_inputs)
        except GatewayError as exc:
            call.decode_error = exc  # counted on the loop, with the metrics
        try:
            answer = self.infer_queue.serve(call, context.add_callback)
        except GatewayError as exc:
            fail(context, aborted(exc))
        except TimeoutError as exc:
            fail(context, Abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)))
        except Cancelled as exc:
            fail(context, Abort(grpc.StatusCode.UNAVAILABLE, str(exc)))
        try:
            return _response(request, request_id, answer)
        except Abort as exc:
            fail(context, exc)

    async def _infer(self, received: float, request: pb2.ModelInferRequest,
                     metadata: Metadata) -> pb2.ModelInferResponse:
        if not self.ctx.tracing.enabled:
            return await self._infer_traced(received, request, metadata, None)
        # tracing on: a server span, child of the metadata's traceparent (banditgate.tracing.server_span)
        traced = server_span(self.ctx.tracing, "grpc", MODEL_INFER, request.model_name, from_mapping(metadata))
        try:
            response = await self._infer_traced(received, request, metadata, traced)
        except BaseException as exc:
            if traced is not None:  # an Abort carries the call's status
                traced.end(exc, status=exc.code.name if isinstance(exc, Abort) else None)
            raise
        if traced is not None:
            traced.end()
        return response

    async def _infer_traced(self, received: float, request: pb2.ModelInferRequest, metadata: Metadata,
                            traced: ServerSpan | None) -> pb2.ModelInferResponse:
        ctx = self.ctx
        server = ctx.config.server
        topics = ctx.config.kafka.topics
        trace = from_mapping(metadata) if traced is None else traced.trace
        try:
            feeds = decode_inputs(request, server.max_tensor_elements, server.max_inputs)
            request_id = request.id or new_request_id()
            unit = _plain(request.parameters["unit_id"]) if "unit_id" in request.parameters else None
            with ctx.admitted():
                async with asyncio.timeout(server.request_timeout_s):
                    answer = await serve_tensors(
                        ctx.dataplane, request.model_name, request.model_version or None, feeds, request_id,
                        str(unit) if unit is not None else None, time.time(), received,
                        on_shadows=lambda events: ctx.publish(topics.shadow_predictions, events, trace=trace),
                        stages=traced.stages if traced is not None else None)
        except TimeoutError:
            ctx.record(_label_name(ctx, request.model_name), "grpc", error=TimeoutError("timeout"))
            raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"inference did not finish within {server.request_timeout_s}s") from None
        except GatewayError as exc:
            ctx.record(_label_name(ctx, request.model_name), "grpc", error=exc)
            raise aborted(exc) from None
        ctx.record(_label_name(ctx, request.model_name), "grpc", arm=answer.arm)
        ctx.publish(topics.predictions, answer.events, trace=trace)
        return _response(request, request_id, answer)


_TEMPLATES: dict[tuple[object, ...], pb2.ModelInferResponse] = {}
"""Responses with what all answers of one route/model/arm/output layout share, copied per call
(a copy costs a fifth of building the message field by field); cleared when full."""
_MAX_TEMPLATES = 256


def _response(request: pb2.ModelInferRequest, request_id: str, answer: TensorAnswer) -> pb2.ModelInferResponse:
    """The ModelInferResponse for an answer (the outputs the request asked for, all by default);
    raises Abort (INVALID_ARGUMENT) for a requested output the model does not have."""
    outputs = answer.outputs
    if request.outputs:
        wanted = [o.name for o in request.outputs]
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"requested output {missing[0]!r} does not exist")
        outputs = {n: outputs[n] for n in wanted}
    model = answer.model
    key = (request.model_name, model.name, model.version, answer.policy, answer.arm,
           *((name, array.dtype.str, array.shape) for name, array in outputs.items()))
    template = _TEMPLATES.get(key)
    if template is None:
        template = _template(request.model_name, answer, outputs)
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
    response = pb2.ModelInferResponse()
    response.CopyFrom(template)
    if request.id:
        response.id = request.id
    parameters = response.parameters
    parameters["propensity"].string_param = str(answer.propensity)
    parameters["request_id"].string_param = request_id
    response.raw_output_contents.extend([_raw_bytes(array) for array in outputs.values()])
    return response


def _template(name: str, answer: TensorAnswer, outputs: dict[str, np.ndarray]) -> pb2.ModelInferResponse:
    parameter = pb2.InferParameter
    parameters = {"model": parameter(string_param=answer.model.name),
                  "model_version": parameter(int64_param=answer.model.version),
                  "policy": parameter(string_param=answer.policy)}
    if answer.arm is not None:
        parameters["arm"] = parameter(string_param=answer.arm)
        parameters["route"] = parameter(string_param=name)
    tensor = pb2.ModelInferResponse.InferOutputTensor
    return pb2.ModelInferResponse(
        model_name=name, model_version=str(answer.model.version), parameters=parameters,
        outputs=[tensor(name=output, datatype=datatype_for(array), shape=array.shape)
                 for output, array in outputs.items()])


class FeedbackServicer(bg_grpc.FeedbackServicer):
    """`banditgate.Feedback`: checked in the call's thread, published from the loop."""

    def __init__(self, ctx: SidecarContext, bridge: CallBridge) -> None:
        self.ctx = ctx
        self.bridge = bridge

    def PostOutcomes(self, request: bg_pb2.OutcomesRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> bg_pb2.OutcomesResponse:
        metadata = _metadata(context)
        try:
            self.ctx.check_token(_authorization(metadata), admin=False)
        except GatewayError as exc:
            fail(context, Abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc)))
        accepted, errors = [], []
        for index, item in enumerate(request.outcomes):
            obj: JSONObject = {"request_id": item.request_id}
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
        return self.bridge.run(partial(self._publish, accepted), request, metadata, context)

    async def _publish(self, accepted: list[JSONObject], request: bg_pb2.OutcomesRequest,
                       metadata: Metadata) -> bg_pb2.OutcomesResponse:
        try:
            trace = from_mapping(metadata)
            await (self.ctx.produce_outcomes(accepted, trace) if trace else self.ctx.produce_outcomes(accepted))
        except GatewayError as exc:  # refused by the broker (INVALID_ARGUMENT) or Kafka away (UNAVAILABLE)
            raise aborted(exc) from None
        return bg_pb2.OutcomesResponse(accepted=len(accepted))


GRPC_THREADS = 32
"""gRPC server threads: calls served at once (each waits for its loop-side work in its thread;
a health Watch stream holds one for as long as it is open). More calls queue for a thread."""


class GrpcServer:
    """A sync `grpc.server` on `GRPC_THREADS` threads whose calls hand their work to the gateway's
    event loop (CallBridge), with the lifecycle of a grpc.aio server: `await start()`, `await
    stop(grace)` (new calls refused at once, calls in flight get `grace` seconds)."""

    def __init__(self, server: grpc.Server, bridge: CallBridge, executor: ThreadPoolExecutor,
                 infer_queue: InferQueue | None = None) -> None:
        self.server = server
        self.bridge = bridge
        self.executor = executor
        self.infer_queue = infer_queue

    async def start(self) -> None:
        self.bridge.loop = asyncio.get_running_loop()
        if self.infer_queue is not None:
            self.infer_queue.loop = self.bridge.loop
        self.server.start()

    async def stop(self, grace: float | None) -> None:
        # the loop keeps running while the server drains: calls in flight need it to finish
        await asyncio.to_thread(self.server.stop(grace).wait)
        self.executor.shutdown(wait=False, cancel_futures=True)


def build_server(ctx: SidecarContext, credentials: grpc.ServerCredentials | None = None) -> tuple[GrpcServer, int]:
    """The gRPC server with both services and the standard health service, bound to the configured
    host/port; returns (server, port)."""
    server_config = ctx.config.server
    options = [("grpc.max_receive_message_length", server_config.max_body_bytes),
               ("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_concurrent_streams", server_config.grpc_max_concurrent_streams),
               # soft and hard limit equal: metadata over max_header_bytes is always refused
               ("grpc.max_metadata_size", server_config.max_header_bytes),
               ("grpc.absolute_max_metadata_size", server_config.max_header_bytes)]
    bridge = CallBridge()
    infer_queue = InferQueue(ctx)
    executor = ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="grpc")
    server = grpc.server(executor, options=options)
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(ctx, bridge, infer_queue), server)
    bg_grpc.add_FeedbackServicer_to_server(FeedbackServicer(ctx, bridge), server)
    add_health(server, ctx.is_ready)
    address = f"{server_config.host}:{server_config.grpc_port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    return GrpcServer(server, bridge, executor, infer_queue), port


__all__ = ["Abort", "GrpcServer", "ModelNotFound", "build_server", "decode_inputs"]
