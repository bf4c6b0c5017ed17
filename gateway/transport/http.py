"""REST sidecar: the Open Inference Protocol (KServe V2) plus outcomes and admin, on Starlette.

Thin: decode (JSON or the binary tensor extension), call the dataplane, encode. Errors are
`{"error": "..."}` with the status their exception carries; overload is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import Counter as CounterChild
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from banditgate import __version__
from banditgate.config import LOOPBACK_HOSTS, Config
from banditgate.events import SCHEMA_VERSION, EventError, json_schemas, outcome_from_obj
from banditgate.jsontypes import JSONObject, JSONValue
from banditgate.tracecontext import TraceHeaders, parse_traceparent, parse_tracestate, trace_headers
from banditgate.tracing import OFF, ServerSpan, Tracing, server_span
from gateway.dataplane import Dataplane, finish_tensors, start_tensors
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    TooManyRequests,
    Unauthorized,
    error_reason,
)
from gateway.request_ids import new_request_id
from gateway.transport.oip_codec import build_rest_response, parse_rest_infer
from gateway.transport.openapi import OPENAPI

if TYPE_CHECKING:
    from gateway.admin import Admin
    from gateway.batching.batcher import RowsResult
    from gateway.metrics import GatewayMetrics
    from gateway.models.onnx_runtime import OnnxModel, TensorSpec

HEADER_LENGTH = "inference-header-content-length"
# bounded label values for errors that carry no reason of their own
EXTENSIONS = ["binary_tensor_data", "banditgate_routing", "banditgate_outcomes"]


@dataclass
class SidecarContext:
    """What the REST and gRPC servers need from the running gateway."""

    config: Config
    dataplane: Dataplane
    publish: Callable[..., None]
    """(topic, events, trace=None): queue events for Kafka, with the request's trace context
    (banditgate.tracecontext.TraceHeaders) as their headers."""
    produce_outcomes: Callable[..., Awaitable[None]]
    """(outcomes, trace=None): publish outcomes, with the caller's trace context as headers."""
    is_ready: Callable[[], bool]
    admin: Admin | None = None  # when arm statistics are wired
    registry: CollectorRegistry = field(default_factory=lambda: REGISTRY)
    metrics: GatewayMetrics | None = None
    in_flight: int = 0
    """Inference requests being served now (REST and gRPC)."""
    tracing: Tracing = OFF
    """Spans (banditgate.tracing; the Kafka loop's): a server span per inference request when on."""
    _ok_counters: dict[tuple[str, str | None, str], CounterChild] = field(default_factory=dict)
    """banditgate_requests_total's "ok" children by (name, arm, transport): `labels()` takes a lock
    and builds a tuple key each call (5 us of a REST request); no code removes these children."""

    _deferred: dict[str, OnnxModel] = field(default_factory=dict)
    """Models (by key) whose batchers hold rows REST requests queued in this turn of the loop."""

    def flush_soon(self, model: OnnxModel) -> None:
        """Flush `model`'s deferred rows (`start_tensors(defer=True)`) at the loop's next turn,
        with the rows of every other request started in this turn: the requests that uvicorn
        read in one wake-up share a batch (one ONNX Runtime run, one dispatch) instead of each
        running alone on an idle model, as the gRPC hand-off's bursts do."""
        if not self._deferred:
            asyncio.get_running_loop().call_soon(self._flush_deferred)
        self._deferred[model.key] = model

    def _flush_deferred(self) -> None:
        models = list(self._deferred.values())
        self._deferred.clear()
        for model in models:
            self.dataplane.batcher(model).kick()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of `server.max_in_flight_requests` slots while serving; raise TooManyRequests
        (429 / RESOURCE_EXHAUSTED, Retry-After) when none is free."""
        self.admit()
        try:
            yield
        finally:
            self.in_flight -= 1

    def admit(self) -> None:
        """Take one of `server.max_in_flight_requests` slots (give it back with `in_flight -= 1`);
        raise TooManyRequests when none is free. `admitted` for code that is not one block."""
        limit = self.config.server.max_in_flight_requests
        if self.in_flight >= limit:
            raise TooManyRequests(f"{self.in_flight} inference requests in flight (limit {limit}); retry shortly",
                                  retry_after_s=1.0)
        self.in_flight += 1

    def record(self, name: str, transport: str, arm: str | None = None, error: Exception | None = None,
               count: int = 1) -> None:
        """Count one sidecar request in banditgate_requests_total / _request_errors_total (`count`
        answered ones when there is no error)."""
        if self.metrics is None:
            return
        if error is None:
            key = (name, arm, transport)
            child = self._ok_counters.get(key)
            if child is None:
                if len(self._ok_counters) >= 4096:  # routes x arms x transports: bounded anyway
                    self._ok_counters.clear()
                child = self._ok_counters[key] = self.metrics.requests.labels(name, arm or "-", "ok", transport)
            child.inc(count)
            return
        reason = error_reason(error)
        self.metrics.requests.labels(name, "-", "error", transport).inc()
        self.metrics.errors.labels(name, reason, transport).inc()

    def check_token(self, authorization: str | None, admin: bool) -> None:
        """Raise Unauthorized/Forbidden unless the bearer token is one of the configured ones.

        Without infer tokens inference is open; without admin tokens the admin API is closed
        unless `server.admin_open` says otherwise (docs/security.md)."""
        server = self.config.server
        tokens = server.admin_tokens if admin else server.infer_tokens
        if not tokens:
            if admin and not server.admin_open:
                raise Forbidden("the admin API is closed: no server.admin_tokens are configured "
                                "(or set server.admin_open: true on a loopback-only gateway)")
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        # only ASCII blanks around the token: str.strip() would also eat a non-breaking space
        offered = authorization[7:].strip(" \t").encode()
        # compare against every token in constant time, without stopping at the first match
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(offered, token.get_secret_value().encode())
        if not matched:
            raise Forbidden("the bearer token is not valid for this endpoint")

    def check_admin(self, method: str, headers: Mapping[str, str], scheme: str) -> None:
        """Every check of an admin request, in order: the API is not closed, the Host is one of
        ours (DNS rebinding), an Origin is our own (a cross-site page), the admin token, and a
        POST's Content-Type is JSON (a cross-site form cannot send that without a preflight).
        Raises Forbidden (403), Unauthorized (401) or UnsupportedMediaType (415)."""
        server = self.config.server
        if not server.admin_tokens and not server.admin_open:
            self.check_token(None, admin=True)  # closed: 403 with the reason
        host = headers.get("host")
        if not host_allowed(host, server.allowed_hosts, server.host):
            raise Forbidden(f"Host {_shown(host)} is not a name this gateway answers admin requests for "
                            "(server.allowed_hosts)")
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, scheme, host or ""):
            raise Forbidden(f"cross-site admin request refused: Origin {_shown(origin)} is not this gateway's "
                            f"origin {scheme}://{host}")
        self.check_token(headers.get("authorization"), admin=True)
        if method == "POST":
            media_type = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                raise UnsupportedMediaType(f"admin POST requests need Content-Type: application/json "
                                           f"(got {_shown(headers.get('content-type'))})")

    def describe(self, name: str, version: str | None) -> JSONObject:
        """OIP model metadata for a route name (its first arm's model) or a concrete model."""
        dataplane = self.dataplane
        runtime = dataplane.routes.get(name) if not version else None
        if runtime is not None:
            arm = runtime.route.arms[0]
            model = dataplane.repository.get(arm.model, arm.version)
            versions = sorted({str(dataplane.repository.resolve(a.model, a.version)) for a in runtime.route.arms})
            platform = f"banditgate_route:{runtime.route.policy}"
        else:
            model = dataplane.repository.get(name, int(version) if version and version.isascii() and version.isdigit() else "latest")
            versions = [str(m.version) for m in dataplane.repository.loaded() if m.name == name]
            platform = "onnxruntime_onnx"
        def spec(s: TensorSpec) -> JSONObject:
            return {"name": s.name, "datatype": s.datatype, "shape": [-1 if d is None else d for d in s.shape]}
        return {"name": name, "versions": versions, "platform": platform,
                "inputs": [spec(s) for s in model.inputs], "outputs": [spec(s) for s in model.outputs]}

    def available(self, name: str, version: str | None) -> bool:
        """Whether a route (any of its arms' models) or a model version can answer now: False for
        a model whose batches time out (it fails fast until a probe answers in time). Raises
        ModelNotFound like `describe`."""
        dataplane = self.dataplane
        if not version and name in dataplane.routes:
            return dataplane.route_available(name)
        spec: int | str = int(version) if version and version.isascii() and version.isdigit() else "latest"
        return dataplane.model_available(dataplane.repository.get(name, spec))


class UnsupportedMediaType(GatewayError):
    http_status = 415
    grpc_code = "INVALID_ARGUMENT"


def _shown(value: str | None) -> str:
    """A header value as it may appear in an error line: quoted, at most 80 characters."""
    return "none" if value is None else repr(value[:80])


_DEFAULT_PORTS = {"http": "80", "https": "443"}
_WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")  # noqa: S104  # nosec B104: to recognise a wildcard bind by, not a bind


def host_name(host: str) -> str:
    """The name part of a Host header (`[::1]:8080` -> `::1`, `Example.com.:80` -> `example.com`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_allowed(host: str | None, allowed: Sequence[str], bound: str) -> bool:
    """Whether an admin request's Host header names this gateway: one of `server.allowed_hosts`
    (`*`: any), or by default the bind address (unless a wildcard), localhost and the loopbacks."""
    if "*" in allowed:
        return True
    if not host:
        return False  # HTTP/1.1 requires Host; a browser always sends one
    names = set(allowed) if allowed else {*LOOPBACK_HOSTS, *([bound.lower()] if bound not in _WILDCARD_ADDRESSES else [])}
    return host_name(host) in names


def _origin_key(scheme: str, host: str) -> str:
    host = host.strip().lower()
    port = _DEFAULT_PORTS.get(scheme)
    if port and host.endswith(f":{port}"):  # a browser leaves the default port out of Host and Origin
        host = host[: -len(port) - 1]
    return f"{scheme}://{host}"


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether a request's Origin header is the origin the request was sent to (scheme + Host)."""
    origin_scheme, separator, origin_host = origin.strip().lower().partition("://")
    if not separator or "/" in origin_host:
        return False  # "null" (a sandboxed page, a file), or not an origin at all
    return _origin_key(origin_scheme, origin_host) == _origin_key(scheme.lower(), host)


def _label_name(ctx: SidecarContext, name: str) -> str:
    """A route or loaded model name as a metric label; anything else (unbounded input) is '-'."""
    if name in ctx.dataplane.routes or any(m.name == name for m in ctx.dataplane.repository.loaded()):
        return name
    return "-"


def _json(doc: JSONValue, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def _error(exc: Exception) -> Response:
    status = getattr(exc, "http_status", 500)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return _json({"error": str(exc)}, status, headers)


async def _body(request: Request, limit: int) -> bytes:
    return await _receive_body(request.receive, request.headers.get("content-length"), limit)


class _TooLarge(GatewayError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "oversize"


class _Timeout(GatewayError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    reason = "timeout"


def build_app(ctx: SidecarContext) -> SidecarApp:
    """The REST surface (see gateway/transport/openapi.py for the document served at /v2/openapi.json)."""
    server = ctx.config.server

    def guarded(handler: Callable[[Request], Awaitable[Response]], admin: bool = False, auth: bool = True):  # type: ignore[no-untyped-def]
        async def endpoint(request: Request) -> Response:
            try:
                if admin:
                    ctx.check_admin(request.method, request.headers, request.url.scheme)
                elif auth:
                    ctx.check_token(request.headers.get("authorization"), admin)
                return await handler(request)
            except GatewayError as exc:
                return _error(exc)
        return endpoint

    async def live(_: Request) -> Response:
        return _json({"live": True})

    async def ready(_: Request) -> Response:
        ok = ctx.is_ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(_: Request) -> Response:
        return _json({"name": "banditgate", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: Request) -> Response:
        params = request.path_params
        return _json(ctx.describe(params["name"], params.get("version")))

    async def model_ready(request: Request) -> Response:
        params = request.path_params
        try:
            ctx.describe(params["name"], params.get("version"))
        except ModelNotFound:
            return _json({"name": params["name"], "ready": False}, 404)
        ok = ctx.is_ready() and ctx.available(params["name"], params.get("version"))
        return _json({"name": params["name"], "ready": ok}, 200 if ok else 503)

    async def infer(request: Request) -> Response:
        params = request.path_params
        status, headers, body = await (infer_rest_traced if ctx.tracing.enabled else infer_rest)(
            ctx, request.scope, request.receive, params["name"], params.get("version"))
        return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})

    async def outcomes(request: Request) -> Response:
        body = await _body(request, server.max_body_bytes)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        items = doc if isinstance(doc, list) else [doc]
        accepted, errors = [], []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                errors.append(f"outcome {index}: not a JSON object")
                continue
            try:
                accepted.append(outcome_from_obj(item).to_dict())
            except EventError as exc:
                errors.append(f"outcome {index}: {exc}")
        if errors:
            return _json({"error": errors[0], "errors": errors, "accepted": 0}, 400)
        trace = _trace(request.scope)
        await (ctx.produce_outcomes(accepted, trace) if trace else ctx.produce_outcomes(accepted))
        return _json({"accepted": len(accepted)})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    async def schemas(_: Request) -> Response:
        return _json({"schema_version": SCHEMA_VERSION, "schemas": json_schemas()})

    async def openapi(_: Request) -> Response:
        return _json(OPENAPI)

    async def admin_dispatch(request: Request) -> Response:
        if ctx.admin is None:
            raise GatewayError("admin operations are not available")
        return _json(await ctx.admin.handle(request.path_params, request.method,
                                            await _body(request, server.max_body_bytes)))

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", guarded(live, auth=False), methods=["GET"]),
        Route("/v2/health/ready", guarded(ready, auth=False), methods=["GET"]),
        Route("/v2", guarded(server_metadata), methods=["GET"]),
        Route(model, guarded(model_metadata), methods=["GET"]),
        Route(versioned, guarded(model_metadata), methods=["GET"]),
        Route(f"{model}/ready", guarded(model_ready), methods=["GET"]),
        Route(f"{versioned}/ready", guarded(model_ready), methods=["GET"]),
        # POST is answered by SidecarApp before Starlette; these routes give other methods their 405
        Route(f"{model}/infer", guarded(infer), methods=["POST"]),
        Route(f"{versioned}/infer", guarded(infer), methods=["POST"]),
        Route("/v2/outcomes", guarded(outcomes), methods=["POST"]),
        Route("/v2/openapi.json", guarded(openapi, auth=False), methods=["GET"]),
        Route("/v2/schemas", guarded(schemas, auth=False), methods=["GET"]),
        Route("/metrics", guarded(metrics, auth=False), methods=["GET"]),
        Route("/v2/admin/{action}", guarded(admin_dispatch, admin=True), methods=["GET", "POST"]),
        Route("/v2/admin/routes/{route}", guarded(admin_dispatch, admin=True), methods=["GET"]),
        Route("/v2/admin/routes/{route}/arms/{arm}/{action}", guarded(admin_dispatch, admin=True), methods=["POST"]),
        Route("/v2/admin/routes/{route}/rollout/{rollout_action}", guarded(admin_dispatch, admin=True),
              methods=["GET", "POST"]),
    ]

    async def not_found(_: Request, exc: Exception) -> Response:
        return _json({"error": "no such endpoint"}, 404)

    async def bad_method(_: Request, exc: Exception) -> Response:
        return _json({"error": "method not allowed"}, 405)

    async def crashed(_: Request, exc: Exception) -> Response:
        return _json({"error": f"internal error: {type(exc).__name__}"}, 500)

    starlette = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method, Exception: crashed})
    return SidecarApp(ctx, starlette)


# -- the infer hot path -----------------------------------------------------------------------
#
# POST /v2/models/{name}[/versions/{version}]/infer is served by a plain ASGI callable in front of
# Starlette: no routing table, middleware stack, Request or Response objects per call. Everything
# else goes to Starlette. (Starlette's layers were a fifth of a REST request's CPU.)

_JSON = [(b"content-type", b"application/json")]


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(name, version) for an OIP infer path, else None. `name` and `version` are one path
    segment each, as in Starlette's `{name}` (the path is already percent-decoded)."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


class SidecarApp:
    """The REST surface: the infer fast path, then Starlette for every other endpoint."""

    def __init__(self, ctx: SidecarContext, app: Starlette) -> None:
        self.ctx = ctx
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = infer_target(scope["path"])
            if target is not None:
                status, headers, body = await self._infer(scope, receive, *target)
                await send({"type": "http.response.start", "status": status,
                            "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _infer(self, scope: Scope, receive: Receive, name: str,
                     version: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        ctx = self.ctx
        try:
            # one attribute test when tracing is off: the untraced path has no wrapper
            return await (infer_rest_traced if ctx.tracing.enabled else infer_rest)(ctx, scope, receive, name, version)
        except GatewayError as exc:
            headers = list(_JSON)
            if isinstance(exc, Overloaded):
                headers.append((b"retry-after", str(max(1, round(exc.retry_after_s))).encode()))
            return getattr(exc, "http_status", 500), headers, orjson.dumps({"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a bug: answer 500 in one line, like Starlette's handler
            return 500, list(_JSON), orjson.dumps({"error": f"internal error: {type(exc).__name__}"})


def _trace(scope: Scope) -> TraceHeaders | None:
    """The request's valid W3C trace context (`traceparent`, `tracestate`), or None."""
    parent = state = None
    for key, value in scope["headers"]:
        if key == b"traceparent":
            parent = value
        elif key == b"tracestate":
            state = value
    if parent is None:
        return None
    traceparent = parse_traceparent(parent)
    return trace_headers(traceparent, parse_tracestate(state) if traceparent is not None else None)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _receive_body(receive: Receive, length: str | None, limit: int) -> bytes:
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise InvalidInput("Content-Length is not a number")
        if int(length) > limit:
            raise _TooLarge(f"request body of {length} bytes is over the limit of {limit}")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_EXPIRED = "banditgate: server.request_timeout_s passed"
"""The message a request's rows' future is cancelled with when its time is up (`_wait_rows`)."""


async def _wait_rows(future: asyncio.Future[RowsResult], timeout_s: float) -> None:
    """Wait for a request's rows (`TensorCall.future`) at most `timeout_s`; raise TimeoutError
    when the time is up, after cancelling the future (as asyncio.timeout cancelling the caller
    did). A GatewayError in the future is left for finish_tensors to raise and count. One loop
    timer and no Timeout object or task uncancel bookkeeping: that was 10 us of a REST request."""
    expiry = asyncio.get_running_loop().call_later(timeout_s, future.cancel, _EXPIRED)
    try:
        await future  # cancelling the caller cancels the rows' future, as before
    except GatewayError:
        pass
    except asyncio.CancelledError as exc:
        if exc.args and exc.args[0] is _EXPIRED:
            raise TimeoutError from None
        raise
    finally:
        expiry.cancel()


INFER_ROUTE = "POST /v2/models/{name}/infer"
INFER_VERSION_ROUTE = "POST /v2/models/{name}/versions/{version}/infer"
"""The server spans' names (banditgate.tracing.server_span): the route templates."""


async def infer_rest_traced(ctx: SidecarContext, scope: Scope, receive: Receive,
                            name: str, version: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """`infer_rest` inside a server span (called instead of it when tracing is on). The bearer
    token is checked first: a refused call makes no span, so an unauthenticated caller can neither
    create spans nor choose their parent (docs/deploy.md, Tracing)."""
    if ctx.config.server.infer_tokens:
        ctx.check_token(_header(scope, b"authorization"), admin=False)
    traced = server_span(ctx.tracing, "http", INFER_VERSION_ROUTE if version else INFER_ROUTE, name, _trace(scope))
    if traced is None:  # not sampled, over tracing.max_request_spans_per_s, or tracing went off meanwhile
        return await infer_rest(ctx, scope, receive, name, version, authenticated=True)
    try:
        answered = await infer_rest(ctx, scope, receive, name, version, traced, authenticated=True)
    except BaseException as exc:
        traced.end(exc)
        raise
    traced.end()
    return answered


async def infer_rest(ctx: SidecarContext, scope: Scope, receive: Receive, name: str, version: str | None,
                     traced: ServerSpan | None = None, *,
                     authenticated: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One OIP REST infer call: (status, headers, body). Raises GatewayError for 4xx/5xx.
    `traced`: the request's server span (infer_rest_traced), whose decide, queue and infer
    become its children and which its events name as their parent; `authenticated`: the caller
    (infer_rest_traced) has checked the bearer token already."""
    received = time.monotonic()
    trace = _trace(scope) if traced is None else traced.trace
    server = ctx.config.server
    if server.infer_tokens and not authenticated:
        ctx.check_token(_header(scope, b"authorization"), admin=False)
    body = await _receive_body(receive, _header(scope, b"content-length"), server.max_body_bytes)
    header = _header(scope, b"inference-header-content-length")
    if header is not None and not (header.isascii() and header.isdigit()):
        raise InvalidInput(f"{HEADER_LENGTH} is not a number")
    parsed = parse_rest_infer(body, int(header) if header is not None else None, server.max_tensor_elements,
                              server.max_inputs)
    feeds = {t.name: t.array for t in parsed.inputs}
    request_id = parsed.id or new_request_id()
    unit = parsed.parameters.get("unit_id")
    try:
        ctx.admit()
        try:
            # serve_tensors without its coroutine, and with one loop timer instead of asyncio.timeout
            call = start_tensors(
                ctx.dataplane, name, version, feeds, request_id, str(unit) if unit is not None else None,
                time.time(), received,
                on_shadows=lambda events: ctx.publish(ctx.config.kafka.topics.shadow_predictions, events, trace=trace),
                stages=traced.stages if traced is not None else None, defer=True)
            ctx.flush_soon(call.model)
            if not call.future.done():
                await _wait_rows(call.future, server.request_timeout_s)
            answer = finish_tensors(call)
        finally:
            ctx.in_flight -= 1
    except TimeoutError:
        error = _Timeout(f"inference did not finish within {server.request_timeout_s}s")
        ctx.record(_label_name(ctx, name), "rest", error=error)
        raise error from None
    except GatewayError as exc:
        ctx.record(_label_name(ctx, name), "rest", error=exc)
        raise
    ctx.record(_label_name(ctx, name), "rest", arm=answer.arm)
    ctx.publish(ctx.config.kafka.topics.predictions, answer.events, trace=trace)
    outputs = answer.outputs
    binary: set[str] = set()
    if parsed.outputs is not None:
        wanted = {output for output, _b in parsed.outputs}
        unknown = sorted(wanted - set(outputs))
        if unknown:
            raise InvalidInput(f"requested output {unknown[0]!r} does not exist (outputs: {sorted(outputs)})")
        outputs = {output: array for output, array in outputs.items() if output in wanted}
        binary = {output for output, is_binary in parsed.outputs if is_binary}
    all_binary = bool(parsed.parameters.get("binary_data_output", False))
    parameters: JSONObject = {"model": answer.model.name, "model_version": answer.model.version,
                                  "policy": answer.policy, "propensity": answer.propensity,
                                  "request_id": request_id}
    if answer.arm is not None:
        parameters["arm"] = answer.arm
        parameters["route"] = name
    body_out, header_length = build_rest_response(name, str(answer.model.version), parsed.id, parameters, outputs,
                                                  binary, all_binary)
    if header_length is None:
        return 200, _JSON, body_out
    return 200, [(b"content-type", b"application/octet-stream"),
                 (b"inference-header-content-length", str(header_length).encode())], body_out
