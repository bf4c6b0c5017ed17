"""The values a batch of requests passes through the gateway as: a `Pending` request from any
transport, the route it is served on (`RouteRuntime`) and the `Answer` it gets.

Their own module, below both `gateway.dataplane` (route / validate / infer) and
`gateway.ranking` (interleave routes, called by the dataplane), so neither imports the other's
module to name them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from banditgate.config import Route
from banditgate.jsontypes import JSONObject, JSONValue
from router.decision import RoutePolicy


@dataclass(slots=True)
class Pending:
    """One request as the dataplane sees it, whatever transport it came from."""

    request_id: str
    inputs: Mapping[str, JSONValue]
    unit_id: str | None
    ts_request: float  # epoch seconds the request was made (its `ts`, else when we received it)
    received_s: float  # monotonic seconds when we received it
    items: tuple[str, ...] | None = None  # ranking requests: candidate ids, one input row each


@dataclass(slots=True)
class Answer:
    """The outcome for one request: a prediction (+ shadow predictions) or an error."""

    prediction: JSONObject | None = None
    shadows: list[JSONObject] | None = None
    error: tuple[str, str] | None = None  # (reason, message)
    outputs: dict[str, np.ndarray] | None = None  # raw output rows, for OIP responses


@dataclass
class RouteRuntime:
    route: Route
    policy: RoutePolicy
