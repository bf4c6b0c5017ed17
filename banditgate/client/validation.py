"""Client-side checks with the gateway's validators and reason names (banditgate.events)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Container, Mapping

import numpy as np
import numpy.typing as npt
import orjson

from banditgate.client.errors import InvalidRequest
from banditgate.events import MAX_ID_CHARS, EventError, outcome_from_obj, request_fields
from banditgate.jsontypes import JSONObject, JSONValue

_DTYPES = {"FP16": "f", "FP32": "f", "FP64": "f", "INT8": "i", "INT16": "i", "INT32": "i", "INT64": "i",
           "UINT8": "u", "UINT16": "u", "UINT32": "u", "UINT64": "u", "BOOL": "b", "BYTES": "S"}


def plain_inputs(inputs: Mapping[str, npt.ArrayLike]) -> JSONObject:
    """Inputs as JSON values (numpy arrays as lists); non-finite numbers refused (``not_finite``:
    JSON has no NaN, the encoder would write null)."""
    out: JSONObject = {}
    for name, value in inputs.items():
        if type(value) is list and _flat_and_finite(value):
            out[name] = value  # the common row: no numpy round trip (send's hot path)
            continue
        array = value if isinstance(value, np.ndarray) else None
        if array is None and isinstance(value, (list, tuple, float)):
            try:
                array = np.asarray(value)
            except ValueError:  # ragged: the gateway says why (bad_input)
                array = None
        if array is not None and array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise InvalidRequest("not_finite", f"input {name!r} holds a NaN or an infinity")
        out[name] = value.tolist() if isinstance(value, np.ndarray) else list(value) if isinstance(value, tuple) \
            else value
    return out


def _flat_and_finite(row: list[JSONValue]) -> bool:
    """True for a flat list of finite numbers, found by one C-level sum: NaN and infinities carry
    through it, nested lists and strings make it raise. False sends the row down the general path
    (which also tells a float overflow of the sum from a real infinity)."""
    try:
        total = sum(row)
    except TypeError:
        return False
    return type(total) is int or (type(total) is float and math.isfinite(total))


def fast_request(route: str, inputs: Mapping[str, JSONValue], unit: str | None, request_id: str,
                 routes: Container[str] | None) -> bytes | None:
    """The encoded request event for the common case - flat rows of finite numbers, no items, a
    string unit or none - without building it twice; None when not sure (the caller then takes
    `request_event`, which says what is wrong). It accepts only what `request_event` accepts and
    encodes it identically (a property test holds it to that)."""
    if (type(route) is not str or not route or len(route) > MAX_ID_CHARS or not request_id
            or len(request_id) > MAX_ID_CHARS or (routes is not None and route not in routes)
            or type(inputs) is not dict or not inputs or (unit is not None and type(unit) is not str)):
        return None
    for name, value in inputs.items():
        if type(name) is not str or type(value) is not list:
            return None
        try:  # _flat_and_finite, inline: this is send's hot path
            total = sum(value)
        except TypeError:
            return None
        if type(total) is not int and (type(total) is not float or not math.isfinite(total)):
            return None
    event: JSONObject = {"request_id": request_id, "route": route, "inputs": inputs, "schema_version": 1}
    if unit is not None:
        event["unit_id"] = unit
    try:
        return orjson.dumps(event)
    except orjson.JSONEncodeError:
        return None  # an integer JSON cannot carry: `encode` says so


def encode(event: JSONObject) -> bytes:
    """The event as JSON; an integer beyond 64 bits (which JSON readers cannot take exactly) is the
    gateway's ``out_of_range``."""
    try:
        return orjson.dumps(event)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest("out_of_range", f"request {event.get('request_id')!r} cannot be encoded: {exc}") from None


def request_event(route: str, inputs: Mapping[str, npt.ArrayLike], *, unit: str | None, request_id: str | None,
                  reply_to: str | None, items: list[str] | None, routes: Container[str] | None,
                  metadata: Mapping[str, JSONValue] | None) -> JSONObject:
    """The request event, checked as the gateway will check it; raise InvalidRequest with its reason."""
    obj: JSONObject = {"request_id": request_id or uuid.uuid4().hex, "route": route,
                       "inputs": plain_inputs(inputs)}
    if unit is not None:
        obj["unit_id"] = unit
    if items is not None:
        obj["items"] = list(items)
    if reply_to is not None:
        obj["reply_to"] = reply_to
    try:
        request_fields(obj, routes)
    except EventError as exc:
        raise InvalidRequest(exc.reason, str(exc)) from None
    if metadata is not None:
        check_metadata(obj["inputs"], metadata)
    obj["schema_version"] = 1
    return obj


def check_metadata(inputs: Mapping[str, npt.ArrayLike], metadata: Mapping[str, JSONValue]) -> None:
    """One row per input against the model's OIP metadata (GET /v2/models/{route}): names
    (``bad_input``), shape (``bad_input``) and element kind (``wrong_type``)."""
    specs = {spec["name"]: spec for spec in metadata.get("inputs", [])}
    unknown = sorted(set(inputs) - set(specs))
    if unknown:
        raise InvalidRequest("bad_input", f"input {unknown[0]!r} is not one of the model's inputs {sorted(specs)}")
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise InvalidRequest("bad_input", f"input {missing[0]!r} is missing")
    for name, value in inputs.items():
        spec = specs[name]
        array = np.asarray(value)
        row_shape = [d for d in spec.get("shape", [])[1:]]
        if array.dtype == object or len(array.shape) != len(row_shape) or any(
                d >= 0 and d != s for d, s in zip(row_shape, array.shape)):
            raise InvalidRequest("bad_input", f"input {name!r} has shape {list(array.shape)}, the model takes "
                                              f"rows of {row_shape}")
        kind = _DTYPES.get(spec.get("datatype", ""), "")
        if kind in "fiu" and array.dtype.kind not in "fiub":
            raise InvalidRequest("wrong_type", f"input {name!r} holds {array.dtype.kind!r} values, the model takes "
                                               f"{spec['datatype']}")


def outcome_event(request_id: str, reward: float | None, label: JSONValue, clicks: list[str] | None,
                  ts: float | None) -> JSONObject:
    obj: JSONObject = {"request_id": request_id}
    for key, value in (("reward", reward), ("label", label), ("clicks", clicks), ("ts", ts)):
        if value is not None:
            obj[key] = value
    try:
        return outcome_from_obj(obj).to_dict()
    except EventError as exc:
        raise InvalidRequest(exc.reason, str(exc)) from None
