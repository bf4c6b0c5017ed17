"""Event contracts shared by gateway, router and feedback (pure: no I/O, imports nothing of ours but the JSON aliases of banditgate.jsontypes).

Every Kafka value is a JSON object encoded with orjson. Times (`ts`, `ts_request`,
`ts_predicted`) are seconds since the Unix epoch as floats; `latency_ms` is milliseconds.

Decoding never raises anything but :class:`EventError`, whose `reason` is a short, stable
machine-readable code (used as a metric label) and whose message is one human line.

Numbers from outside are bounded, not only finite: an outcome's ``reward``, a numeric ``label``
and its ``ts``, and a prediction's numbers must lie in [-MAX_MAGNITUDE, MAX_MAGNITUDE] (else
``out_of_range``; NaN and infinities are ``not_finite``). The feedback ledger adds rewards, their
squares and squared label errors into running sums; with every value bounded by 1e15 a square is
at most 4e30, so a sum overflows only after about 1e277 of them (and integers below the bound
are exact as doubles). ``clicks`` hold at most MAX_CLICKS item ids of 1..MAX_ID_CHARS characters;
a string label at most MAX_LABEL_CHARS. A prediction's ``arm`` and ``model`` are names
(NAME_PATTERN, as routes and arms are in the configuration: no ``:`` or ``|``, which Redis keys
and hash fields use as separators), else ``bad_id``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import orjson

from banditgate.jsontypes import JSONObject, JSONValue

DEFAULT_MAX_EVENT_BYTES = 1_048_576
MAX_ID_CHARS = 256
MAX_NESTING = 4  # inputs may hold rows of rows (e.g. an image) but not arbitrarily deep trees
MAX_MAGNITUDE = 1e15
"""Largest absolute value of an outcome's reward, numeric label and ts, and of a prediction's
numbers (see the module docstring: no sum or square the feedback ledger keeps can overflow)."""
MAX_CLICKS = 1000
"""Most item ids one outcome's ``clicks`` may list."""
MAX_LABEL_CHARS = 1024
MAX_RANKERS = 16
"""Most rankers (arms) one interleave route may have: a prediction's impression names each, and the
worker keeps a pair of counters per two of them (k rankers, k(k-1)/2 pairs per click)."""
"""Longest string label."""
MAX_NAME_CHARS = 128
"""The longest route, arm or model name."""
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{MAX_NAME_CHARS - 1}}}$"
"""Route, arm and model names (banditgate.config validates configured names with it)."""
_NAME = re.compile(NAME_PATTERN)

SCHEMA_VERSION = 1
"""The version of the event layouts this code writes (every event's ``schema_version``)."""
KNOWN_SCHEMA_VERSIONS = frozenset({1})
"""The versions the readers accept. An event without ``schema_version`` was written before the
field existed and reads as version 1; any other value is refused (``unknown_version``)."""
TOPIC_PATTERN = r"^[A-Za-z0-9._\-]{1,249}$"
"""A Kafka topic name (what the broker accepts): a request's ``reply_to``."""
_TOPIC = re.compile(TOPIC_PATTERN)

ALERT_KINDS = frozenset({"drift", "quality", "rollback", "promote", "reject", "guardrail", "retrain",
                         "refused"})  # refused: a new version over its admission budgets

# reason codes: bounded set, safe as Prometheus label values
REASONS = (
    "oversize", "not_json", "not_object", "missing_field", "wrong_type", "bad_id",
    "unknown_route", "not_finite", "too_deep", "bad_input", "out_of_range", "inference_failed",
    "model_unavailable", "internal_error", "redis_refused",
    # outputs the broker refuses for good (gateway/transport/delivery.py)
    "output_too_large", "output_refused", "not_authorized",
    # a schema_version this reader does not know; a reply topic the gateway may not write to
    "unknown_version", "reply_refused",
)


class EventError(ValueError):
    """An event is malformed. `reason` is one of REASONS; str(self) is one clear line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# value types: each dataclass is the one definition of its event. A field's ``metadata["schema"]``
# is its JSON Schema (what the readers below accept, see `json_schemas`); a field with
# ``metadata["wire"] = False`` is not an event key of its own.


def _wire(schema: JSONObject, doc: str, default: object = MISSING, factory: Callable[[], object] | None = None,
          wire: bool = True) -> Any:  # Any: like dataclasses.field, whose stub returns Any so a specifier fits every field type
    metadata = {"schema": {**schema, "description": doc}, "wire": wire}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _id(doc: str) -> Any:  # Any: a field specifier, as _wire (dataclasses.field's stub returns Any)
    return _wire({"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}, doc)


def _portable(pattern: str) -> str:
    """`pattern` for a JSON Schema: ``$`` becomes "no character follows", because Python's ``$``
    (which jsonschema uses) also matches before a final newline and ECMA-262's does not."""
    assert pattern.endswith("$")  # noqa: S101 - the patterns above, fixed
    return pattern[:-1] + r"(?![\s\S])"


_NUMBER = {"type": "number", "minimum": -MAX_MAGNITUDE, "maximum": MAX_MAGNITUDE}
_NAME_SCHEMA = {"type": "string", "pattern": _portable(NAME_PATTERN)}
_VERSION_DOC = ("layout version (absent: 1, events written before the field); readers refuse versions they "
                "do not know with reason unknown_version")


def _version() -> Any:  # Any: a field specifier, as _wire (dataclasses.field's stub returns Any)
    return _wire({"type": ["integer", "null"], "enum": [*sorted(KNOWN_SCHEMA_VERSIONS), None]}, _VERSION_DOC,
                 default=SCHEMA_VERSION)


def _input_value(depth: int) -> JSONObject:
    """What `_check_value` accepts at `depth`: a scalar, or (above MAX_NESTING) a list whose first
    element is one at depth + 1 (only the first elements are walked; the model's metadata checks
    the rest)."""
    scalar: JSONObject = {"type": ["string", "number", "boolean", "null"]}
    if depth >= MAX_NESTING:
        return scalar
    return {"anyOf": [scalar, {"type": "array", "prefixItems": [_input_value(depth + 1)]}]}


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request: one row per input name (or, for ranking routes, one row per item)."""

    request_id: str = _id("correlates the prediction and the outcomes (the record key, too)")
    route: str = _id("a configured route (else unknown_route)")
    inputs: Mapping[str, JSONValue] = _wire({"type": "object", "minProperties": 1,
                                             "additionalProperties": _input_value(0)},
                                            "input name -> row (numbers, strings or lists nested up to "
                                            f"{MAX_NESTING} levels); shape and dtype follow the model's metadata")
    unit_id: str | None = _wire({"type": ["string", "integer", "null"]},
                                "the sticky key (same unit, same arm where the route is sticky)", default=None)
    ts: float | None = _wire({"type": ["number", "null"]}, "when the request was made (epoch seconds)", default=None)
    items: tuple[str, ...] | None = _wire(
        {"type": ["array", "null"], "minItems": 1, "items": {"type": ["string", "integer"]}},
        "ranking routes: candidate ids, one input row each", default=None)
    reply_to: str | None = _wire({"type": ["string", "null"], "pattern": _portable(TOPIC_PATTERN)},
                                 "a topic the gateway also publishes the prediction to (keyed by request_id); "
                                 "allowed only where it matches kafka.reply_topics (else reply_refused)",
                                 default=None)
    schema_version: int = _version()

    def to_dict(self) -> JSONObject:
        out: JSONObject = {"schema_version": self.schema_version, "request_id": self.request_id,
                           "route": self.route, "inputs": dict(self.inputs)}
        if self.unit_id is not None:
            out["unit_id"] = self.unit_id
        if self.ts is not None:
            out["ts"] = self.ts
        if self.items is not None:
            out["items"] = list(self.items)
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        return out


def prediction_event(request_id: str, route: str, arm: str, model: str, model_version: int, policy: str,
                     propensity: float, outputs: JSONObject, ts_request: float, ts_predicted: float,
                     latency_ms: float) -> JSONObject:
    """A prediction event as the gateway publishes it (the fields of :class:`Prediction`; a shadow
    adds ``shadow`` and ``primary_arm``, an interleave prediction ``rankers`` and ``method``).
    A plain function building one dict: the gateway calls it once per answered row."""
    return {"schema_version": SCHEMA_VERSION, "request_id": request_id, "route": route, "arm": arm, "model": model,
            "model_version": model_version, "policy": policy, "propensity": propensity, "outputs": outputs,
            "ts_request": ts_request, "ts_predicted": ts_predicted, "latency_ms": latency_ms}


@dataclass(frozen=True, slots=True)
class Prediction:
    """What an arm answered for one request (a shadow prediction when `shadow` is true)."""

    request_id: str = _id("the request's id (the record key)")
    route: str = _id("the request's route")
    arm: str = _wire(_NAME_SCHEMA, "the arm that answered")
    model: str = _wire(_NAME_SCHEMA, "the arm's model")
    model_version: int = _wire({"type": "integer"}, "the model version that answered")
    policy: str = _id("the route's policy (thompson, fixed, shadow, interleave, direct)")
    propensity: float = _wire(_NUMBER, "the probability with which the policy chose this arm")
    outputs: Mapping[str, JSONValue] = _wire({"type": "object"}, "output name -> the row's values")
    ts_request: float = _wire(_NUMBER, "when the request was made (epoch seconds)")
    ts_predicted: float = _wire(_NUMBER, "when the prediction was made (epoch seconds)")
    latency_ms: float = _wire(_NUMBER, "gateway time from receipt to answer, milliseconds")
    shadow: bool = _wire({}, "true: a shadow arm's prediction (shadow-predictions topic)", default=False)
    primary_arm: str | None = _wire({}, "shadows: the arm that answered the request", default=None)
    extra: Mapping[str, JSONValue] = _wire({}, "further keys (interleave: rankers, method)", factory=dict, wire=False)
    schema_version: int = _version()

    def to_dict(self) -> JSONObject:
        out = prediction_event(self.request_id, self.route, self.arm, self.model, self.model_version, self.policy,
                               self.propensity, dict(self.outputs), self.ts_request, self.ts_predicted,
                               self.latency_ms)
        out["schema_version"] = self.schema_version
        if self.shadow:
            out["shadow"] = True
            out["primary_arm"] = self.primary_arm
        if self.extra:
            out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened after a prediction: a reward for the serving arm and/or a ground-truth label."""

    request_id: str = _id("the request the outcome belongs to (the record key)")
    reward: float | None = _wire({"type": ["number", "boolean", "null"], "minimum": -MAX_MAGNITUDE,
                                  "maximum": MAX_MAGNITUDE}, "scores the arm that served", default=None)
    label: JSONValue = _wire({"anyOf": [_NUMBER, {"type": "string", "maxLength": MAX_LABEL_CHARS},
                                        {"type": ["boolean", "null"]}]},
                             "ground truth: scores every model that predicted the request, shadows included",
                             default=None)
    ts: float | None = _wire({"type": ["number", "null"], "minimum": -MAX_MAGNITUDE, "maximum": MAX_MAGNITUDE},
                             "when it happened (epoch seconds; absent: the record's time)", default=None)
    clicks: tuple[str, ...] | None = _wire(
        {"type": ["array", "null"], "maxItems": MAX_CLICKS,
         "items": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}, {"type": "integer"}]}},
        "ranking routes: clicked item ids in click order", default=None)
    schema_version: int = _version()

    def to_dict(self) -> JSONObject:
        out: JSONObject = {"schema_version": self.schema_version, "request_id": self.request_id}
        if self.reward is not None:
            out["reward"] = self.reward
        if self.label is not None:
            out["label"] = self.label
        if self.ts is not None:
            out["ts"] = self.ts
        if self.clicks is not None:
            out["clicks"] = list(self.clicks)
        return out


def dead_letter_event(error: str, reason: str, topic: str, partition: int, offset: int, payload: str
                      ) -> JSONObject:
    """A dead-letter event (the fields of :class:`DeadLetter`)."""
    return {"schema_version": SCHEMA_VERSION, "error": error, "reason": reason, "topic": topic,
            "partition": partition, "offset": offset, "payload": payload}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that could not be processed, with why and where it came from."""

    error: str = _wire({"type": "string"}, "what was wrong, one line")
    topic: str = _wire({"type": "string"}, "where the event was read")
    partition: int = _wire({"type": "integer"}, "its partition (-1: not from a record)")
    offset: int = _wire({"type": "integer"}, "its offset (-1: not from a record)")
    payload: str = _wire({"type": "string"}, "the original bytes as text, cut to 64 KiB")
    reason: str = _wire({"type": "string"}, "machine-readable reason (a metric label), e.g. " + ", ".join(REASONS),
                        default="bad_input")
    schema_version: int = _version()

    def to_dict(self) -> JSONObject:
        out = dead_letter_event(self.error, self.reason, self.topic, self.partition, self.offset, self.payload)
        out["schema_version"] = self.schema_version
        return out


ALERT_STATES = frozenset({"firing", "resolved"})


@dataclass(frozen=True, slots=True)
class Alert:
    """Something operators or automation should act on (drift, quality, rollout decisions).

    state: ``firing`` (the default: every alert of a kind without episodes) or ``resolved``.
    Drift and quality alerts come per alarm episode: one ``firing`` when it opens, one
    ``resolved`` when it has been quiet (docs/drift.md); both carry details.model and
    details.feature (None for a whole-model signal). Consumers written before the field read
    every alert as firing; read it as ``alert.get("state", "firing")``."""

    kind: str = _wire({"type": "string", "enum": sorted(ALERT_KINDS)}, "what happened")
    route: str = _id("the route it concerns (the record key)")
    arm: str | None = _wire({"type": ["string", "null"]}, "the arm it concerns, if one")
    model_version: int | None = _wire({"type": ["integer", "null"]}, "the model version it concerns, if one")
    metric: str = _wire({"type": "string"}, "what was measured")
    value: float = _wire({"type": ["number", "null"]}, "the measured value")
    threshold: float = _wire({"type": ["number", "null"]}, "the value it was compared with")
    ts: float = _wire({"type": ["number", "null"]}, "when (epoch seconds)")
    details: Mapping[str, JSONValue] = _wire({"type": ["object", "null"]}, "kind-specific details", factory=dict)
    state: str = _wire({"type": "string", "enum": sorted(ALERT_STATES)}, "firing or resolved (absent: firing)",
                       default="firing")
    schema_version: int = _version()

    def to_dict(self) -> JSONObject:
        out: JSONObject = {"schema_version": self.schema_version, "kind": self.kind, "state": self.state, "route": self.route,
               "arm": self.arm, "model_version": self.model_version,
               "metric": self.metric, "value": self.value, "threshold": self.threshold, "ts": self.ts}
        if self.details:
            out["details"] = dict(self.details)
        return out


@dataclass(frozen=True, slots=True)
class RoutingChange:
    """One rollout transition (routing-changes topic, keyed by route): who moved which arm from
    which stage to which, with the routing before and after (router/rollout.py AuditRecord)."""

    seq: int = _wire({"type": "integer"}, "the rollout state's seq after the change")
    route: str = _id("the route (the record key)")
    model: str = _wire({"type": "string"}, "the candidate's model")
    version: int = _wire({"type": "integer"}, "the candidate's model version")
    arm: str = _wire({"type": "string"}, "the candidate arm")
    from_stage: str = _wire({"type": "string"}, "stage before")
    to_stage: str = _wire({"type": "string"}, "stage after")
    actor: str = _wire({"type": "string"}, "rule:<criterion> for automation, admin:<who> for an operator")
    reason: str = _wire({"type": "string"}, "why, one line")
    before: Mapping[str, JSONValue] = _wire({"type": "object"}, "routing before")
    after: Mapping[str, JSONValue] = _wire({"type": "object"}, "routing after")
    ts: float = _wire({"type": "number"}, "when (epoch seconds)")
    from_seq: int = _wire({"type": "integer"}, "the state's seq before the change")
    alert_kind: str | None = _wire({"type": ["string", "null"]}, "promote/reject/rollback (alerts topic), else null",
                                   default=None)
    details: Mapping[str, JSONValue] = _wire({"type": "object"}, "criterion details", factory=dict)
    kind: str = _wire({"const": "routing_change"}, "always routing_change", default="routing_change")
    schema_version: int = _version()

    def to_dict(self) -> JSONObject:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("before", "after", "details"):
            out[key] = dict(out[key])
        return out


# ---------------------------------------------------------------------------------------------
# JSON Schemas, generated from the dataclasses above


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

EVENT_TYPES: dict[str, type] = {"request": Request, "prediction": Prediction, "shadow-prediction": Prediction,
                                "outcome": Outcome, "dead-letter": DeadLetter, "alert": Alert,
                                "routing-change": RoutingChange}
"""Schema name -> its definition; every event banditgate reads or writes."""

CLOUDEVENT_TYPES: dict[str, str] = {name: f"io.banditgate.{name}.v{SCHEMA_VERSION}" for name in EVENT_TYPES}
"""Schema name -> the CloudEvents ``type`` of its records (``ce_type`` header, banditgate.cloudevents):
``io.banditgate.prediction.v1``, ``io.banditgate.dead-letter.v1``, ...; the suffix is the layout's
schema_version."""


def json_schema(name: str) -> JSONObject:
    """The JSON Schema (draft 2020-12) of event `name` (a key of EVENT_TYPES), built from the
    dataclass's fields: a field without a default is required. What the readers accept beyond a
    schema: a reader also checks what needs the configuration (a route is configured, a reply
    topic allowed), an interleave prediction's impression, and that an integer is not written as
    a float (JSON Schema reads 1.0 as an integer; the readers refuse it)."""
    cls = EVENT_TYPES[name]
    properties: JSONObject = {}
    required = []
    for f in fields(cls):
        if not f.metadata.get("wire", True):
            continue
        properties[f.name] = dict(f.metadata["schema"])
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
    doc = " ".join((cls.__doc__ or "").split())
    schema: JSONObject = {"$schema": SCHEMA_DIALECT, "$id": f"banditgate:{name}:v{SCHEMA_VERSION}",
                              "title": f"banditgate {name} event (schema_version {SCHEMA_VERSION})",
                              "description": doc, "type": "object", "properties": properties, "required": required}
    if cls is Outcome:
        schema["anyOf"] = [{"required": [key], "properties": {key: {"not": {"type": "null"}}}}
                           for key in ("reward", "label", "clicks")]
    if name == "shadow-prediction":
        properties["shadow"] = {"const": True, "description": properties["shadow"]["description"]}
        properties["primary_arm"] = {**_NAME_SCHEMA, "description": properties["primary_arm"]["description"]}
        schema["required"] = [*required, "shadow", "primary_arm"]
    return schema


def json_schemas() -> dict[str, JSONObject]:
    """Every event's JSON Schema by name (`banditgate schemas`, GET /v2/schemas)."""
    return {name: json_schema(name) for name in EVENT_TYPES}


# ---------------------------------------------------------------------------------------------
# encoding


def encode(event: Request | Prediction | Outcome | DeadLetter | Alert | RoutingChange) -> bytes:
    """Serialize an event to JSON bytes (orjson)."""
    return orjson.dumps(event.to_dict())


def dead_letter_payload(raw: bytes, limit: int = 65_536) -> str:
    """The original bytes as text for a dead-letter event, cut to `limit` characters."""
    text = raw[:limit].decode("utf-8", errors="replace")
    return text if len(raw) <= limit else text + f"...[{len(raw) - limit} more bytes]"


# ---------------------------------------------------------------------------------------------
# decoding and validation


def load_object(raw: bytes | None, kind: str, max_bytes: int) -> JSONObject:
    """Parse one event's bytes into a JSON object; raise EventError (oversize, not JSON, not an object)."""
    if raw is None:
        raise EventError("not_json", f"{kind} record has no value (a tombstone)")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise EventError("not_json", f"{kind} event is {type(raw).__name__}, not bytes")
    if len(raw) > max_bytes:
        raise EventError("oversize", f"{kind} event is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "not_finite" if "infinity" in str(exc).lower() else "not_json"
        raise EventError(reason, f"{kind} event is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EventError("not_object", f"{kind} event is a JSON {type(obj).__name__}, not an object")
    return obj


def check_version(obj: JSONObject, kind: str) -> int:
    """The event's schema_version (1 when absent: written before the field); raise EventError
    (unknown_version) for a version this reader does not know."""
    version = obj.get("schema_version")
    if version is None:
        return 1
    if type(version) is int and version in KNOWN_SCHEMA_VERSIONS:
        return version
    raise EventError("unknown_version", f"{kind} event has schema_version {str(version)[:32]!r}; this reader knows "
                                        f"{', '.join(map(str, sorted(KNOWN_SCHEMA_VERSIONS)))}")


def _require_id(obj: JSONObject, key: str, kind: str) -> str:
    if key not in obj:
        raise EventError("missing_field", f"{kind} event has no '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise EventError("wrong_type", f"{kind} event '{key}' must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_CHARS:
        raise EventError("bad_id", f"{kind} event '{key}' must have 1..{MAX_ID_CHARS} characters, has {len(value)}")
    return value


def _optional_ts(obj: JSONObject, key: str, kind: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError("wrong_type", f"{kind} event '{key}' must be a number (epoch seconds), got {type(value).__name__}")
    return float(value)


def _check_value(value: JSONValue, path: str, depth: int) -> None:
    """Input values: numbers, strings, booleans, null, or lists of them nested up to MAX_NESTING.

    Only the nesting of the first elements is walked: a row's element types and shape are
    checked, vectorized, against the model's metadata later (a mixed or ragged row fails there),
    so this stays O(depth) per input instead of O(elements) on the hot path. Non-finite numbers
    cannot come out of orjson; those built in Python are caught here for scalars and by the
    model validation's finiteness check for rows.
    """
    while isinstance(value, list):
        if depth >= MAX_NESTING:
            raise EventError("too_deep", f"request input '{path}' is nested deeper than {MAX_NESTING} levels")
        if not value:
            return
        value = value[0]
        depth += 1
    if isinstance(value, dict):
        raise EventError("wrong_type", f"request input '{path}' holds an object; inputs are numbers, strings or lists")
    if isinstance(value, float) and not math.isfinite(value):
        raise EventError("not_finite", f"request input '{path}' is not a finite number")


def request_fields(obj: JSONObject, routes: Container[str] | None = None,
                   reply_allowed: Callable[[str], bool] | None = None
                   ) -> tuple[str, str, JSONObject, str | None, float | None, tuple[str, ...] | None, str | None]:
    """Validate a decoded request object; return (request_id, route, inputs, unit_id, ts, items,
    reply_to). `reply_allowed` says whether the gateway may write to a reply topic (None: not
    checked here).

    The tuple form spares the hot path one object per request; raise EventError with the reason.
    """
    request_id = _require_id(obj, "request_id", "request")
    if "schema_version" in obj:
        check_version(obj, "request")
    route = _require_id(obj, "route", "request")
    if routes is not None and route not in routes:
        raise EventError("unknown_route", f"request {request_id!r} names unknown route {route!r}")
    inputs = obj.get("inputs")
    if inputs is None:
        raise EventError("missing_field", f"request {request_id!r} has no 'inputs'")
    if not isinstance(inputs, dict) or not inputs:
        raise EventError("wrong_type", f"request {request_id!r} 'inputs' must be a non-empty object of input name -> row")
    for name, value in inputs.items():
        _check_value(value, name, 0)
    unit_id = obj.get("unit_id")
    if unit_id is not None:
        if not isinstance(unit_id, (str, int)) or isinstance(unit_id, bool):
            raise EventError("wrong_type", f"request {request_id!r} 'unit_id' must be a string, got {type(unit_id).__name__}")
        unit_id = str(unit_id)
    items = obj.get("items")
    if items is not None:
        if not isinstance(items, list) or not items or not all(isinstance(i, (str, int)) for i in items):
            raise EventError("wrong_type", f"request {request_id!r} 'items' must be a non-empty list of ids")
        items = tuple(str(i) for i in items)
    ts = obj.get("ts")
    if ts is not None:
        ts = _optional_ts(obj, "ts", "request")
    reply_to = obj.get("reply_to")
    if reply_to is not None:
        if not isinstance(reply_to, str) or _TOPIC.fullmatch(reply_to) is None:
            raise EventError("wrong_type", f"request {request_id!r} 'reply_to' must be a topic name "
                                           "(1..249 letters, digits, '.', '_', '-')")
        if reply_allowed is not None and not reply_allowed(reply_to):
            raise EventError("reply_refused", f"request {request_id!r} asks for replies on topic {reply_to!r}, "
                                              "which matches no kafka.reply_topics pattern of this gateway")
    return request_id, route, inputs, unit_id, ts, items, reply_to


def request_from_obj(obj: JSONObject, routes: Container[str] | None = None) -> Request:
    """Validate a decoded request object against the contract; raise EventError with the reason."""
    request_id, route, inputs, unit_id, ts, items, reply_to = request_fields(obj, routes)
    return Request(request_id=request_id, route=route, inputs=inputs, unit_id=unit_id, ts=ts, items=items,
                   reply_to=reply_to, schema_version=check_version(obj, "request"))


def decode_request(raw: bytes, routes: Container[str] | None = None,
                   max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Request:
    """Decode and validate one request event; raise EventError (only) when it is malformed."""
    return request_from_obj(load_object(raw, "request", max_bytes), routes)


def _bounded(value: float, what: str) -> float:
    """`value` (an int or a float) as a float if it is finite and within MAX_MAGNITUDE; raise
    EventError (not_finite / out_of_range) otherwise. One comparison when it fits."""
    if -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE:
        return float(value)
    if isinstance(value, float) and math.isnan(value):
        raise EventError("not_finite", f"{what} is not a number (NaN)")
    if isinstance(value, float) and math.isinf(value):
        raise EventError("not_finite", f"{what} is not finite")
    shown = repr(value) if isinstance(value, float) or abs(value) < 10**24 else f"{str(value)[:24]}..."
    raise EventError("out_of_range", f"{what} is {shown}, outside [-{MAX_MAGNITUDE:g}, {MAX_MAGNITUDE:g}]")


def is_name(value: object) -> bool:
    """Whether `value` is a route, arm or model name (NAME_PATTERN)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def outcome_from_obj(obj: JSONObject) -> Outcome:
    """Validate a decoded outcome object; raise EventError with the reason."""
    request_id = _require_id(obj, "request_id", "outcome")
    version = check_version(obj, "outcome")
    reward = obj.get("reward")
    if reward is not None:
        if isinstance(reward, bool):
            reward = float(reward)
        if not isinstance(reward, (int, float)):
            raise EventError("wrong_type", f"outcome {request_id!r} 'reward' must be a number, got {type(reward).__name__}")
        reward = _bounded(reward, f"outcome {request_id!r} 'reward'")
    label = obj.get("label")
    if label is not None:
        if not isinstance(label, (str, int, float, bool)):
            raise EventError("wrong_type", f"outcome {request_id!r} 'label' must be a number, string or boolean")
        if isinstance(label, str):
            if len(label) > MAX_LABEL_CHARS:
                raise EventError("out_of_range", f"outcome {request_id!r} 'label' has {len(label)} characters, "
                                                 f"over {MAX_LABEL_CHARS}")
        elif not isinstance(label, bool):
            _bounded(label, f"outcome {request_id!r} 'label'")
    clicks = obj.get("clicks")
    if clicks is not None:
        if not isinstance(clicks, list) or not all(isinstance(c, (str, int)) for c in clicks):
            raise EventError("wrong_type", f"outcome {request_id!r} 'clicks' must be a list of item ids")
        if len(clicks) > MAX_CLICKS:
            raise EventError("out_of_range", f"outcome {request_id!r} 'clicks' lists {len(clicks)} items, "
                                             f"over {MAX_CLICKS}")
        clicks = tuple(str(c) for c in clicks)
        if not all(0 < len(c) <= MAX_ID_CHARS for c in clicks):
            raise EventError("bad_id", f"outcome {request_id!r} 'clicks' item ids must have 1..{MAX_ID_CHARS} characters")
    if reward is None and label is None and clicks is None:
        raise EventError("missing_field", f"outcome {request_id!r} has none of 'reward', 'label', 'clicks'")
    ts = _optional_ts(obj, "ts", "outcome")
    if ts is not None:
        _bounded(ts, f"outcome {request_id!r} 'ts'")
    return Outcome(request_id=request_id, reward=reward, label=label, ts=ts, clicks=clicks, schema_version=version)


def decode_outcome(raw: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Outcome:
    """Decode and validate one outcome event; raise EventError (only) when it is malformed."""
    return outcome_from_obj(load_object(raw, "outcome", max_bytes))


_PREDICTION_NUMBERS = ("propensity", "ts_request", "ts_predicted", "latency_ms")


def prediction_from_obj(obj: JSONObject) -> Prediction:
    """Validate a decoded (shadow-)prediction object; raise EventError with the reason."""
    request_id = _require_id(obj, "request_id", "prediction")
    schema_version = check_version(obj, "prediction")
    route = _require_id(obj, "route", "prediction")
    arm = _require_id(obj, "arm", "prediction")
    model = _require_id(obj, "model", "prediction")
    for key, name in (("arm", arm), ("model", model)):
        if _NAME.fullmatch(name) is None:
            raise EventError("bad_id", f"prediction {request_id!r} '{key}' {name[:64]!r} is not a name (letters, digits, "
                                       "'_', '.', '-'; at most 128 characters)")
    policy = _require_id(obj, "policy", "prediction")
    version = obj.get("model_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise EventError("wrong_type", f"prediction {request_id!r} 'model_version' must be an integer")
    numbers = {}
    for key in _PREDICTION_NUMBERS:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EventError("wrong_type" if key in obj else "missing_field",
                             f"prediction {request_id!r} '{key}' must be a number")
        numbers[key] = _bounded(value, f"prediction {request_id!r} '{key}'")
    outputs = obj.get("outputs")
    if not isinstance(outputs, dict):
        raise EventError("wrong_type", f"prediction {request_id!r} 'outputs' must be an object")
    known = {"request_id", "route", "arm", "model", "model_version", "policy", "outputs", "shadow",
             "primary_arm", "schema_version", *_PREDICTION_NUMBERS}
    extra = {k: v for k, v in obj.items() if k not in known}
    shadow = bool(obj.get("shadow", False))
    primary = obj.get("primary_arm")
    return Prediction(request_id=request_id, route=route, arm=arm, model=model, model_version=version,
                      policy=policy, outputs=outputs, shadow=shadow,
                      primary_arm=primary if isinstance(primary, str) else None, extra=extra,
                      schema_version=schema_version, **numbers)


def decode_prediction(raw: bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Prediction:
    """Decode and validate one prediction or shadow-prediction event."""
    return prediction_from_obj(load_object(raw, "prediction", max_bytes))


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Decode a dead-letter event (written by us)."""
    obj = load_object(raw, "dead-letter", DEFAULT_MAX_EVENT_BYTES * 8)
    version = check_version(obj, "dead-letter")
    try:
        return DeadLetter(error=str(obj["error"]), topic=str(obj["topic"]), partition=int(obj["partition"]),
                          offset=int(obj["offset"]), payload=str(obj["payload"]),
                          reason=str(obj.get("reason", "bad_input")), schema_version=version)
    except (KeyError, TypeError, ValueError) as exc:
        raise EventError("missing_field", f"dead-letter event is incomplete: {exc}") from None


def decode_alert(raw: bytes) -> Alert:
    """Decode an alert event."""
    return alert_from_obj(load_object(raw, "alert", DEFAULT_MAX_EVENT_BYTES))


def alert_from_obj(obj: Mapping[str, JSONValue]) -> Alert:
    """Validate an alert object (decoded, or built as a dict by a monitor); raise EventError."""
    obj = dict(obj)
    version = check_version(obj, "alert")
    kind = obj.get("kind")
    if kind not in ALERT_KINDS:
        raise EventError("wrong_type", f"alert 'kind' must be one of {sorted(ALERT_KINDS)}, got {kind!r}")
    route = _require_id(obj, "route", "alert")
    state = obj.get("state", "firing")  # absent in alerts written before episodes: firing
    if state not in ALERT_STATES:
        raise EventError("wrong_type", f"alert 'state' must be one of {sorted(ALERT_STATES)}, got {state!r}")
    try:
        return Alert(kind=kind, route=route, arm=obj.get("arm"), model_version=obj.get("model_version"),
                     metric=str(obj.get("metric", "")), value=float(obj.get("value", 0.0)),
                     threshold=float(obj.get("threshold", 0.0)), ts=float(obj.get("ts", 0.0)),
                     details=obj.get("details") or {}, state=state, schema_version=version)
    except (TypeError, ValueError) as exc:
        raise EventError("wrong_type", f"alert has a non-numeric field: {exc}") from None
