"""predict and report_outcome over the Open Inference Protocol REST API of the gateway's sidecar.

The standard library's HTTP client runs in a worker thread (no extra dependency). Retries: a 429
or 503 answer (overloaded, not ready) and a refused connection are retried up to `retries` times,
waiting what ``Retry-After`` says (else an exponential backoff from 0.1 s, capped by
`max_backoff_s`); a 4xx other than 429 is the caller's mistake and never retried.

Trace context: `predict` and `report_outcome` send a W3C ``traceparent`` header (the caller's when
valid, else a fresh one; ``tracestate`` with the caller's own); the gateway carries it onto the
prediction event, and ``Prediction.traceparent`` is the one sent.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Container, Mapping
from typing import Self

import numpy as np
import numpy.typing as npt
import orjson

from banditgate.client.errors import ClientError, GatewayRejected, InvalidRequest
from banditgate.client.types import Prediction
from banditgate.client.validation import check_metadata, outcome_event, plain_inputs
from banditgate.jsontypes import JSONObject, JSONValue
from banditgate.tracecontext import trace_context

_OIP_TYPES = {"f": "FP32", "i": "INT64", "u": "UINT64", "b": "BOOL"}
_RETRIED = (429, 503)


class HttpClient:
    """Async OIP REST client (``async with HttpClient("http://gateway:8080", token=...)``)."""

    def __init__(self, base_url: str, *, token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 timeout_s: float = 10.0, retries: int = 3, max_backoff_s: float = 5.0,
                 routes: Container[str] | None = None, check_inputs: bool = True) -> None:
        """`check_inputs`: fetch each route's metadata once and check inputs against it before sending."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} is not an http:// or https:// URL")
        if retries < 0 or timeout_s <= 0 or max_backoff_s < 0:
            raise ValueError("retries and max_backoff_s must be >= 0 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_backoff_s = max_backoff_s
        self.routes = routes
        self.check_inputs = check_inputs
        self._metadata: dict[str, JSONObject] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def metadata(self, route: str) -> JSONObject:
        """The route's model metadata (inputs, outputs), cached."""
        if route not in self._metadata:
            self._metadata[route] = await self._call("GET", f"/v2/models/{urllib.parse.quote(route, safe='')}")
        return self._metadata[route]

    async def predict(self, route: str, inputs: Mapping[str, npt.ArrayLike], *, unit: str | None = None,
                      request_id: str | None = None, traceparent: str | None = None,
                      tracestate: str | None = None) -> Prediction:
        """One row per input (as over Kafka); the router picks the arm. Raises InvalidRequest,
        GatewayRejected (with the gateway's reason) or ClientError."""
        if self.routes is not None and route not in self.routes:
            raise InvalidRequest("unknown_route", f"route {route!r} is not one of the routes given to the client")
        rows = plain_inputs(inputs)
        if self.check_inputs:
            check_metadata(rows, await self.metadata(route))
        tensors = []
        for name, value in rows.items():
            array = np.asarray(value)[None, ...]
            kind = array.dtype.kind
            tensors.append({"name": name, "shape": list(array.shape), "datatype": _OIP_TYPES.get(kind, "BYTES"),
                            "data": array.reshape(-1).tolist()})
        doc: JSONObject = {"inputs": tensors, "parameters": {}}
        if request_id is not None:
            doc["id"] = request_id
        if unit is not None:
            doc["parameters"]["unit_id"] = unit
        started = time.monotonic()
        trace = trace_context(traceparent, tracestate)
        answer = await self._call("POST", f"/v2/models/{urllib.parse.quote(route, safe='')}/infer", doc, trace)
        params = answer.get("parameters") or {}
        outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"])[0] for o in answer.get("outputs", [])}
        return Prediction(request_id=str(params.get("request_id", request_id or "")), route=route,
                          arm=str(params.get("arm", "")), model=str(params.get("model", answer.get("model_name"))),
                          model_version=int(params.get("model_version", 0)), policy=str(params.get("policy", "")),
                          propensity=float(params.get("propensity", 1.0)), outputs=outputs,
                          latency_ms=(time.monotonic() - started) * 1000.0,
                          round_trip_ms=(time.monotonic() - started) * 1000.0, event=params,
                          traceparent=trace[0][1].decode())

    async def report_outcome(self, request_id: str, *, reward: float | None = None, label: JSONValue = None,
                             clicks: list[str] | None = None, ts: float | None = None, traceparent: str | None = None,
                             tracestate: str | None = None) -> None:
        """Post an outcome; pass the prediction's `traceparent` to continue its trace."""
        await self._call("POST", "/v2/outcomes", outcome_event(request_id, reward, label, clicks, ts),
                         trace_context(traceparent, tracestate))

    async def _call(self, method: str, path: str, doc: JSONObject | None = None,
                    trace: list[tuple[str, bytes]] | None = None) -> JSONObject:
        return await asyncio.to_thread(self._call_blocking, method, path, doc, trace)

    def _call_blocking(self, method: str, path: str, doc: JSONObject | None,
                       trace: list[tuple[str, bytes]] | None = None) -> JSONObject:
        headers = {"accept": "application/json"}
        for name, value in trace or ():
            headers[name] = value.decode()
        body = None
        if doc is not None:
            body = orjson.dumps(doc)
            headers["content-type"] = "application/json"
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        backoff = 0.1
        for attempt in range(self.retries + 1):
            # the scheme was checked to be http or https in __init__
            request = urllib.request.Request(self.base_url + path, data=body, headers=headers, method=method)  # noqa: S310
            wait = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s,  # noqa: S310 - the caller's URL
                                            context=self.ssl_context) as response:
                    return json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as exc:
                text = exc.read().decode("utf-8", "replace")
                if exc.code not in _RETRIED or attempt == self.retries:
                    raise _rejected(exc.code, text) from None
                wait = _retry_after(exc.headers.get("retry-after"))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt == self.retries:
                    raise ClientError("unreachable", f"{self.base_url} did not answer: {exc}") from None
            time.sleep(min(self.max_backoff_s, wait if wait is not None else backoff))
            backoff *= 2
        raise AssertionError("unreachable")  # pragma: no cover


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


def _rejected(status: int, text: str) -> GatewayRejected:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = {}
    message = str(doc.get("error", text))[:500] if isinstance(doc, dict) else text[:500]
    reason = doc.get("reason") if isinstance(doc, dict) and isinstance(doc.get("reason"), str) else None
    if reason is None:
        reason = {400: "bad_input", 401: "not_authorized", 403: "not_authorized", 404: "unknown_route",
                  413: "oversize", 429: "overloaded", 503: "model_unavailable", 504: "timeout"}.get(status, "http_error")
    return GatewayRejected(reason, f"HTTP {status}: {message}")
