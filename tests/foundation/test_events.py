"""Event contracts: round trips and validation (pure, property-based)."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate import events
from banditgate.events import EventError, Outcome, Prediction, Request

ids = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s or True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
bounded = st.floats(-events.MAX_MAGNITUDE, events.MAX_MAGNITUDE)
names = st.from_regex(events.NAME_PATTERN, fullmatch=True)
scalars = st.one_of(finite, st.integers(-10**9, 10**9), st.text(max_size=10), st.booleans())
rows = st.lists(scalars, min_size=0, max_size=8)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    inputs = draw(st.dictionaries(st.text(min_size=1, max_size=12), st.one_of(scalars, rows), min_size=1, max_size=4))
    return Request(request_id=draw(ids), route=draw(ids), inputs=inputs,
                   unit_id=draw(st.none() | ids), ts=draw(st.none() | finite),
                   items=draw(st.none() | st.lists(ids, min_size=1, max_size=5).map(tuple)))


@given(requests())
def test_request_round_trip(request: Request) -> None:
    assert events.decode_request(events.encode(request)) == request


@given(st.builds(Outcome, request_id=ids, reward=bounded, label=st.none() | st.integers(0, 5) | st.text(max_size=5),
                 ts=st.none() | bounded))
def test_outcome_round_trip(outcome: Outcome) -> None:
    assert events.decode_outcome(events.encode(outcome)) == outcome


@given(st.builds(Prediction, request_id=ids, route=ids, arm=names, model=names, model_version=st.integers(1, 1000),
                 policy=st.sampled_from(["thompson", "fixed", "shadow"]), propensity=st.floats(0, 1),
                 outputs=st.dictionaries(st.text(min_size=1, max_size=5), st.lists(finite, max_size=3), max_size=3),
                 ts_request=bounded, ts_predicted=bounded, latency_ms=st.floats(0, 1e6),
                 shadow=st.just(False), primary_arm=st.none(), extra=st.just({})))
def test_prediction_round_trip(prediction: Prediction) -> None:
    decoded = events.decode_prediction(events.encode(prediction))
    assert decoded == prediction


def test_shadow_prediction_round_trip() -> None:
    p = Prediction("r1", "churn", "c", "m", 4, "thompson", 1.0, {"y": [1]}, 1.0, 2.0, 3.0, shadow=True, primary_arm="a")
    decoded = events.decode_prediction(events.encode(p))
    assert decoded.shadow and decoded.primary_arm == "a" and decoded == p


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_event_error(raw: bytes) -> None:
    for decode in (events.decode_request, events.decode_outcome, events.decode_prediction):
        try:
            decode(raw)
        except EventError as exc:
            assert exc.reason in events.REASONS
            assert "\n" not in str(exc)


@settings(max_examples=300)
@given(st.recursive(st.none() | st.booleans() | finite | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=30))
def test_arbitrary_json_raises_only_event_error(value: object) -> None:
    raw = orjson.dumps(value)
    for decode in (events.decode_request, events.decode_outcome, events.decode_prediction):
        try:
            decode(raw)
        except EventError as exc:
            assert exc.reason in events.REASONS


@pytest.mark.parametrize(("raw", "reason"), [
    (b"not json", "not_json"),
    (b"[1,2]", "not_object"),
    (b'{"route": "r", "inputs": {"x": [1]}}', "missing_field"),
    (b'{"request_id": 5, "route": "r", "inputs": {"x": [1]}}', "wrong_type"),
    (b'{"request_id": "", "route": "r", "inputs": {"x": [1]}}', "bad_id"),
    (b'{"request_id": "a", "route": "nope", "inputs": {"x": [1]}}', "unknown_route"),
    (b'{"request_id": "a", "route": "r", "inputs": {"x": [1e999]}}', "not_finite"),
    (b'{"request_id": "a", "route": "r", "inputs": {"x": [[[[[[1]]]]]]}}', "too_deep"),
    (b'{"request_id": "a", "route": "r", "inputs": []}', "wrong_type"),
    (b'{"request_id": "a", "route": "r", "inputs": {"x": {"y": 1}}}', "wrong_type"),
])
def test_each_malformed_request_has_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EventError) as info:
        events.decode_request(raw, routes={"r"})
    assert info.value.reason == reason


def test_oversize_is_refused_before_parsing() -> None:
    raw = b'{"request_id": "a", "route": "r", "inputs": {"x": "' + b"x" * 2000 + b'"}}'
    with pytest.raises(EventError) as info:
        events.decode_request(raw, max_bytes=1000)
    assert info.value.reason == "oversize"


@pytest.mark.parametrize(("raw", "reason"), [
    (b'{"request_id": "a", "reward": 1e200}', "out_of_range"),
    (b'{"request_id": "a", "reward": -1000000000000001}', "out_of_range"),
    (b'{"request_id": "a", "reward": 18446744073709551615}', "out_of_range"),
    (b'{"request_id": "a", "reward": 1e400}', "not_finite"),
    (b'{"request_id": "a", "reward": -1e400}', "not_finite"),
    (b'{"request_id": "a", "reward": NaN}', "not_json"),
    (b'{"request_id": "a", "label": 1e200}', "out_of_range"),
    (b'{"request_id": "a", "label": -1e16}', "out_of_range"),
    (b'{"request_id": "a", "label": 1e400}', "not_finite"),
    (b'{"request_id": "a", "reward": 1, "ts": 1e300}', "out_of_range"),
    (b'{"request_id": "a", "clicks": ["' + b'x' * 257 + b'"]}', "bad_id"),
    (b'{"request_id": "a", "clicks": [""]}', "bad_id"),
    (b'{"request_id": "a", "clicks": [' + b",".join([b'"i"'] * 1001) + b']}', "out_of_range"),
    (b'{"request_id": "a", "label": "' + b'y' * 1025 + b'"}', "out_of_range"),
])
def test_poison_outcome_numbers_are_refused_with_their_reason(raw: bytes, reason: str) -> None:
    """Numbers whose square or sum the feedback ledger could not hold (or that are not numbers)."""
    with pytest.raises(EventError) as info:
        events.decode_outcome(raw)
    assert info.value.reason == reason
    assert "\n" not in str(info.value)


def test_outcome_numbers_at_the_bound_are_accepted() -> None:
    bound = events.MAX_MAGNITUDE
    outcome = events.outcome_from_obj({"request_id": "a", "reward": -bound, "label": bound, "ts": bound,
                                       "clicks": ["i"] * events.MAX_CLICKS})
    assert (outcome.reward, outcome.label, outcome.ts) == (-bound, bound, bound)
    assert events.outcome_from_obj({"request_id": "a", "label": 10**15}).label == 10**15


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("arm", "a:b", "bad_id"), ("arm", "a|b", "bad_id"), ("arm", "a\n", "bad_id"), ("arm", "-a", "bad_id"),
    ("model", "m:1", "bad_id"), ("model", "m" * 129, "bad_id"),
    ("ts_predicted", 1e200, "out_of_range"), ("propensity", -1e16, "out_of_range"),
])
def test_prediction_names_and_numbers_are_checked(field: str, value: object, reason: str) -> None:
    doc = {"request_id": "r", "route": "churn", "arm": "a", "model": "m", "model_version": 1, "policy": "thompson",
           "propensity": 0.5, "outputs": {}, "ts_request": 1.0, "ts_predicted": 1.0, "latency_ms": 1.0}
    events.prediction_from_obj(doc)
    with pytest.raises(EventError) as info:
        events.prediction_from_obj({**doc, field: value})
    assert info.value.reason == reason


def test_outcome_needs_something_to_say() -> None:
    with pytest.raises(EventError, match="none of 'reward', 'label', 'clicks'"):
        events.decode_outcome(b'{"request_id": "a"}')
    assert events.decode_outcome(b'{"request_id": "a", "reward": true}').reward == 1.0


def test_dead_letter_payload_is_cut_and_marked() -> None:
    text = events.dead_letter_payload(b"\xff" * 10 + b"a" * 100, limit=20)
    assert text.endswith("[90 more bytes]")
    d = events.DeadLetter("bad", "t", 1, 2, text, "not_json")
    assert events.decode_dead_letter(events.encode(d)) == d


def test_alert_round_trip_and_kind_checked() -> None:
    a = events.Alert("drift", "churn", "a", 3, "psi", 0.3, 0.2, 1.0, {"feature": "age"})
    assert events.decode_alert(events.encode(a)) == a
    with pytest.raises(EventError):
        events.decode_alert(b'{"kind": "party", "route": "r"}')
    assert math.isfinite(a.value)
