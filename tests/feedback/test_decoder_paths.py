"""The feedback worker's two decoders (feedback/agents.py): the fast path checks the common shape
with a few type tests and comparisons, anything else takes the full validators of
banditgate.events. The fast path must accept exactly what the slow one accepts, with the same
values: otherwise a poison number (a reward of 1e200, an arm named ``a:b``) that the contract
refuses would reach the ledger through the fast path."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from banditgate.config import Topics
from banditgate.events import MAX_CLICKS, MAX_LABEL_CHARS, MAX_MAGNITUDE, MAX_RANKERS, EventError, json_schema
from feedback.agents import JoinProcessor, SourceMessage
from feedback.join import JoinRules, RouteRules
from feedback.metrics import FeedbackMetrics

TOPICS = Topics()
BOUND = MAX_MAGNITUDE

edge_numbers = st.sampled_from([0, 1, -1, 0.5, BOUND, -BOUND, BOUND * (1 + 2**-52), -BOUND * (1 + 2**-52),
                                10**15, 10**15 + 1, -(10**15) - 1, 2**63, 1e200, -1e200, 1e308, 5e-324])
numbers = st.one_of(edge_numbers, st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False))
anything = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2),
                     st.just("x" * (MAX_LABEL_CHARS + 1)), st.just({"a": 1}))
names = st.one_of(st.sampled_from(["a", "b", "churn-gbm", "m.v2", "a:b", "a|b", "", "-a", "a\n", "é", "x" * 128,
                                   "x" * 129]), st.text(max_size=8))


versions = st.sampled_from([1, 1, 2, 0, -1, "1", 1.5, None, True])
"""schema_version: absent (see _maybe), known, unknown, or not an integer."""


def _maybe(draw: st.DrawFn, obj: dict[str, Any], key: str, values: st.SearchStrategy[Any]) -> None:
    if draw(st.booleans()):
        obj[key] = draw(values)


@st.composite
def outcome_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {"request_id": draw(st.sampled_from(["r1", "", 5, "x" * 257]) | st.text(min_size=1, max_size=4))}
    _maybe(draw, obj, "reward", anything)
    _maybe(draw, obj, "label", anything)
    _maybe(draw, obj, "ts", anything)
    _maybe(draw, obj, "schema_version", versions)
    if draw(st.integers(0, 5)) == 0:
        obj["clicks"] = draw(st.one_of(st.lists(st.text(max_size=3), max_size=3), st.just(["i"] * (MAX_CLICKS + 1)),
                                       anything))
    return obj


GOOD_IMPRESSION = {"items": ["i1", "i2"], "teams": ["x", "y"], "rankings": {"x": ["i1"], "y": ["i2"]}}
HOSTILE_IMPRESSIONS = {
    "bad_id": {"items": ["i1", "i2"], "teams": ["x|y", "y"], "rankings": {"x|y": [], "y": []}},
    "out_of_range": {"items": ["i1"], "teams": ["r0"], "rankings": {f"r{k}": [] for k in range(MAX_RANKERS + 1)}},
    "out_of_range_items": {"items": ["i"] * 1001, "teams": ["x"] * 1001, "rankings": {"x": [], "y": []}},
    "out_of_range_id": {"items": ["i" * 257, "j"], "teams": ["x", "y"], "rankings": {"x": [], "y": []}},
}


@st.composite
def prediction_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "request_id": "r1", "route": draw(st.sampled_from(["churn", "churn", "nope", 7])),
        "arm": draw(names), "model": draw(names), "model_version": draw(st.sampled_from([1, 3, True, 1.5, "1"])),
        "policy": draw(st.sampled_from(["thompson", "", "interleave", None])),
        "outputs": draw(st.sampled_from([{"probability": [0.7], "label": 1}, {"y": [1e200]}, {}, [1],
                                         *HOSTILE_IMPRESSIONS.values(), GOOD_IMPRESSION])),
    }
    for key in ("propensity", "ts_request", "ts_predicted", "latency_ms"):
        obj[key] = draw(st.one_of(numbers, st.just(0.5))) if draw(st.integers(0, 4)) else draw(anything)
    _maybe(draw, obj, "schema_version", versions)
    if draw(st.integers(0, 9)) == 0:
        del obj[draw(st.sampled_from(sorted(obj)))]
    return obj


def _processor() -> JoinProcessor:
    # only the decoders are used: they read the topics, the routes and the size limit
    return JoinProcessor(table=None, redis=None, out=None,  # type: ignore[arg-type]
                         rules=JoinRules(ttl_s=600.0, routes={"churn": RouteRules()}), topics=TOPICS,
                         metrics=FeedbackMetrics(CollectorRegistry()))


PROCESSOR = _processor()


def _both(topic: str, obj: Any) -> tuple[Any, Any]:
    """(fast, slow) results: the decoded event, or the EventError's reason."""
    message = SourceMessage(topic, 2, 41, b"r1", orjson.dumps(obj), 1_700_000_000_000)
    out = []
    for decode in (PROCESSOR._decode, PROCESSOR._decode_slow):
        try:
            out.append(decode(message))
        except EventError as exc:
            out.append(exc.reason)
    return out[0], out[1]


def _same(fast: Any, slow: Any) -> None:
    if isinstance(slow, str) or isinstance(fast, str):
        assert fast == slow, f"fast path gave {fast!r}, the full validator {slow!r}"
        return
    assert type(fast) is type(slow)
    for name in fast.__dataclass_fields__:
        a, b = getattr(fast, name), getattr(slow, name)
        assert a == b and type(a) is type(b), f"{name}: fast {a!r}, slow {b!r}"
    if hasattr(fast, "outcome"):
        for name in ("reward", "label", "ts", "offset", "clicks"):
            a, b = getattr(fast.outcome, name), getattr(slow.outcome, name)
            assert a == b and type(a) is type(b), f"outcome.{name}: fast {a!r}, slow {b!r}"


SCHEMAS = {name: jsonschema.Draft202012Validator(json_schema(name)) for name in ("outcome", "prediction")}


def _schema_agrees(name: str, obj: Any, fast: Any) -> None:
    """The published JSON Schema (banditgate.events.json_schema) accepts what the decoders accept.
    Checked where the decoders judge the event alone: a prediction's route must also be one the
    worker is configured for, and an interleave prediction's impression is checked beyond the
    schema (see json_schema's docstring)."""
    if name == "prediction" and (obj.get("route") != "churn" or obj.get("policy") == "interleave"):
        return
    errors = [e.message for e in SCHEMAS[name].iter_errors(orjson.loads(orjson.dumps(obj)))]
    assert (not errors) == (not isinstance(fast, str)), f"decoders: {fast!r}; schema: {errors[:2]}"


@settings(max_examples=1500, deadline=None)
@given(outcome_objects())
def test_fast_outcome_decoder_accepts_exactly_what_the_contract_accepts(obj: dict[str, Any]) -> None:
    fast, slow = _both(TOPICS.outcomes, obj)
    _same(fast, slow)
    _schema_agrees("outcome", obj, fast)


@settings(max_examples=1500, deadline=None)
@given(prediction_objects(), st.sampled_from([TOPICS.predictions, TOPICS.shadow_predictions]))
def test_fast_prediction_decoder_accepts_exactly_what_the_contract_accepts(obj: dict[str, Any], topic: str) -> None:
    fast, slow = _both(topic, obj)
    _same(fast, slow)
    _schema_agrees("prediction", obj, fast)


@pytest.mark.parametrize("version", [2, 0, "1", 1.5, True])
@pytest.mark.parametrize("topic", [TOPICS.outcomes, TOPICS.predictions])
def test_an_unknown_schema_version_is_refused_by_both_paths(version: Any, topic: str) -> None:
    obj: dict[str, Any] = ({"request_id": "r1", "reward": 1.0} if topic == TOPICS.outcomes else
                           {"request_id": "r1", "route": "churn", "arm": "a", "model": "m", "model_version": 1,
                            "policy": "fixed", "outputs": {}, "propensity": 1.0, "ts_request": 1.0,
                            "ts_predicted": 2.0, "latency_ms": 1.0})
    assert not isinstance(_both(topic, obj)[0], str)
    fast, slow = _both(topic, {**obj, "schema_version": version})
    assert fast == slow == "unknown_version"


@pytest.mark.parametrize(("obj", "reason"), [
    ({"request_id": "r1", "reward": 1e200}, "out_of_range"),
    ({"request_id": "r1", "reward": 1.0, "label": 1e200}, "out_of_range"),
    ({"request_id": "r1", "label": -(10**16)}, "out_of_range"),
    ({"request_id": "r1", "reward": 1.0, "ts": 1e300}, "out_of_range"),
    ({"request_id": "r1", "label": "y" * (MAX_LABEL_CHARS + 1)}, "out_of_range"),
])
def test_poison_outcomes_are_refused_by_the_fast_path_too(obj: dict[str, Any], reason: str) -> None:
    """These passed the fast path's type tests before it compared against the bound."""
    fast, slow = _both(TOPICS.outcomes, obj)
    assert fast == slow == reason


@pytest.mark.parametrize("arm", ["a:b", "a|b", "-a", "x" * 129])
def test_a_prediction_whose_arm_is_not_a_name_is_refused(arm: str) -> None:
    obj = {"request_id": "r1", "route": "churn", "arm": arm, "model": "m", "model_version": 1, "policy": "thompson",
           "propensity": 0.5, "outputs": {"probability": [0.7], "label": 1}, "ts_request": 1.0, "ts_predicted": 1.0,
           "latency_ms": 1.0}
    assert _both(TOPICS.predictions, obj) == ("bad_id", "bad_id")
    assert _both(TOPICS.predictions, {**obj, "arm": "a", "model": arm}) == ("bad_id", "bad_id")


@pytest.mark.parametrize("case", sorted(HOSTILE_IMPRESSIONS))
def test_a_hostile_interleave_prediction_is_refused_by_both_paths(case: str) -> None:
    """Before: ranker names were not checked (a '|' broke the pair fields' parsing) nor counted
    (k rankers made k(k-1)/2 pair fields per click in one Lua item), and items neither."""
    obj = {"request_id": "r1", "route": "churn", "arm": "a", "model": "m", "model_version": 1,
           "policy": "interleave", "propensity": 1.0, "outputs": HOSTILE_IMPRESSIONS[case], "ts_request": 1.0,
           "ts_predicted": 1.0, "latency_ms": 1.0}
    reason = "bad_id" if case == "bad_id" else "out_of_range"
    assert _both(TOPICS.predictions, obj) == (reason, reason)
    fast, slow = _both(TOPICS.predictions, {**obj, "outputs": GOOD_IMPRESSION})
    _same(fast, slow)
    assert fast.served.impression is not None
