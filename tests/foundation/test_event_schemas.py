"""Published event schemas (banditgate.events.json_schemas): generated from the event dataclasses,
valid JSON Schemas, and in agreement with the readers and the builders."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jsonschema
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate import events
from banditgate.cli import main
from banditgate.events import EventError

VALIDATORS = {name: jsonschema.Draft202012Validator(schema) for name, schema in events.json_schemas().items()}


def _valid(name: str, obj: Any) -> bool:
    return VALIDATORS[name].is_valid(orjson.loads(orjson.dumps(obj)))


def test_every_schema_is_a_valid_json_schema_with_its_version() -> None:
    assert set(VALIDATORS) == {"request", "prediction", "shadow-prediction", "outcome", "dead-letter", "alert",
                               "routing-change"}
    for schema in events.json_schemas().values():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert "schema_version" in schema["properties"]


def test_the_builders_write_what_the_schemas_describe() -> None:
    p = events.prediction_event("r1", "churn", "a", "m", 3, "fixed", 0.5, {"y": [1.0]}, 1.0, 2.0, 0.3)
    wire = {f.name for f in dataclasses.fields(events.Prediction) if f.metadata["wire"]}
    assert set(p) == wire - {"shadow", "primary_arm"} and p["schema_version"] == events.SCHEMA_VERSION
    assert _valid("prediction", p) and not _valid("shadow-prediction", p)
    assert _valid("shadow-prediction", {**p, "shadow": True, "primary_arm": "b"})
    letter = events.dead_letter_event("bad", "not_json", "bg.requests", 0, 7, "{")
    assert _valid("dead-letter", letter) and set(letter) == {f.name for f in dataclasses.fields(events.DeadLetter)}
    alert = events.Alert("drift", "churn", "a", 3, "feature_drift", 2.0, 1.0, 5.0, {"model": "m"})
    assert _valid("alert", alert.to_dict())
    change = events.RoutingChange(1, "churn", "m", 4, "c", "shadow", "canary", "rule:x", "ok", {}, {}, 5.0, 0)
    assert _valid("routing-change", change.to_dict()) and change.to_dict()["kind"] == "routing_change"
    assert _valid("outcome", events.Outcome("r1", reward=1.0).to_dict())
    assert not _valid("outcome", {"request_id": "r1"})  # none of reward, label, clicks
    assert _valid("request", events.Request("r1", "churn", {"x": [[1, 2]]}, reply_to="bg.replies.svc").to_dict())


def test_readers_refuse_unknown_schema_versions_and_accept_events_without_one() -> None:
    base = {"request_id": "r1", "route": "churn", "inputs": {"x": [1.0]}}
    assert events.request_from_obj(base).schema_version == 1
    for version in (2, "1", 1.5, True):
        try:
            events.request_from_obj({**base, "schema_version": version})
        except EventError as exc:
            assert exc.reason == "unknown_version"
        else:
            raise AssertionError(f"schema_version {version!r} was accepted")
    try:
        events.decode_alert(orjson.dumps({"kind": "drift", "route": "r", "schema_version": 9}))
    except EventError as exc:
        assert exc.reason == "unknown_version"


def test_reply_to_is_checked_against_the_allowed_topics() -> None:
    base = {"request_id": "r1", "route": "churn", "inputs": {"x": [1.0]}, "reply_to": "bg.replies.svc"}
    assert events.request_fields(base, None, lambda t: t.startswith("bg.replies."))[6] == "bg.replies.svc"
    for obj, allowed, reason in ((base, lambda t: False, "reply_refused"),
                                 ({**base, "reply_to": "a b"}, lambda t: True, "wrong_type"),
                                 ({**base, "reply_to": 7}, lambda t: True, "wrong_type")):
        try:
            events.request_fields(obj, None, allowed)
        except EventError as exc:
            assert exc.reason == reason
        else:
            raise AssertionError(f"{obj} was accepted")


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=3))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=2), c, max_size=2),
                      max_leaves=12)


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {"request_id": draw(st.sampled_from(["r1", "", 5, "x" * 257])),
                           "route": draw(st.sampled_from(["churn", "", None])),
                           "inputs": draw(st.one_of(st.dictionaries(st.sampled_from(["a", "b"]), values, max_size=2),
                                                    values))}
    for key, strategy in (("unit_id", st.sampled_from(["u", 7, True, 1.5, None])), ("ts", scalars),
                          ("items", st.one_of(st.lists(st.sampled_from(["i", 3, 2.5]), max_size=2), scalars)),
                          ("reply_to", st.sampled_from(["bg.r", "a b", "a\n", "", 3, None])),
                          ("schema_version", st.sampled_from([1, 2, "1", None]))):
        if draw(st.booleans()):
            obj[key] = draw(strategy)
    return obj


@settings(max_examples=1500, deadline=None)
@given(request_objects())
def test_the_request_schema_accepts_exactly_what_the_gateway_accepts(obj: dict[str, Any]) -> None:
    try:
        events.request_fields(obj, None, lambda _t: True)
        accepted = True
    except EventError:
        accepted = False
    assert _valid("request", obj) == accepted, obj


def test_banditgate_schemas_writes_one_file_per_event(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert main(["schemas", "--out", str(tmp_path / "s")]) == 0
    files = sorted((tmp_path / "s").glob("*.json"))
    assert [f.name for f in files][0] == "alert.v1.schema.json" and len(files) == len(VALIDATORS)
    for f in files:
        jsonschema.Draft202012Validator.check_schema(json.loads(f.read_text()))
