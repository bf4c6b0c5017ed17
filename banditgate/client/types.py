"""What the client returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from banditgate.jsontypes import JSONObject


@dataclass(frozen=True, slots=True)
class Prediction:
    """One answered request: the outputs as numpy arrays and which arm/model answered."""

    request_id: str
    route: str
    arm: str
    model: str
    model_version: int
    policy: str
    propensity: float
    outputs: dict[str, np.ndarray]
    latency_ms: float
    """The gateway's time from receipt to answer (Kafka: the prediction event's latency_ms)."""
    round_trip_ms: float
    """The caller's time from sending to having the prediction."""
    event: JSONObject = field(default_factory=dict, repr=False)
    """The prediction event as published (Kafka) or the OIP parameters (HTTP)."""
    traceparent: str | None = None
    """The W3C trace context the prediction carries (Kafka: its record's header; HTTP: the one
    sent): pass it to ``report_outcome(..., traceparent=...)`` so the outcome joins the trace."""

    @classmethod
    def from_event(cls, event: JSONObject, round_trip_ms: float, traceparent: str | None = None) -> Prediction:
        outputs = {name: np.asarray(value) for name, value in (event.get("outputs") or {}).items()}
        return cls(request_id=event["request_id"], route=event["route"], arm=event["arm"], model=event["model"],
                   model_version=int(event["model_version"]), policy=event["policy"],
                   propensity=float(event["propensity"]), outputs=outputs, latency_ms=float(event["latency_ms"]),
                   round_trip_ms=round_trip_ms, event=event, traceparent=traceparent)
