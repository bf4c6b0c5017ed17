"""`KafkaClient.send`: the fast encoding accepts exactly what the checked one accepts and writes
the same bytes (property test), and sent requests reach the gateway and are answered on the real
stack, bounded by `max_queued`, each with its own trace context."""

from __future__ import annotations

import math
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.client import InvalidRequest, KafkaClient
from banditgate.client.validation import encode, fast_request, request_event
from banditgate.events import json_schemas
from banditgate.tracecontext import parse_traceparent, trace_id_of
from tests.client.conftest import N_FEATURES
from tests.kafka_helpers import read_records

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans())
values = st.one_of(numbers, st.text(max_size=3), st.none(), st.lists(numbers, max_size=3))
rows = st.one_of(st.lists(numbers, max_size=6), st.lists(values, max_size=4), numbers, st.text(max_size=3))
inputs = st.one_of(st.dictionaries(st.text(max_size=4), rows, max_size=3), st.just({}))


@settings(max_examples=400, deadline=None)
@given(route=st.one_of(st.text(max_size=5), st.just("x" * 300)), inputs=inputs,
       unit=st.one_of(st.none(), st.text(max_size=4)), routes=st.one_of(st.none(), st.just(frozenset({"churn", "a"}))))
def test_the_fast_encoding_accepts_only_what_the_checked_one_does(route: str, inputs: dict[str, Any],
                                                                  unit: str | None, routes: Any) -> None:
    fast = fast_request(route, inputs, unit, "rid-1", routes)
    try:
        checked = encode(request_event(route, inputs, unit=unit, request_id="rid-1", reply_to=None, items=None,
                                       routes=routes, metadata=None))
    except InvalidRequest:
        assert fast is None  # a refusal always comes from the checked path, with its reason
        return
    assert fast is None or orjson.loads(fast) == orjson.loads(checked)


def test_an_integer_json_cannot_carry_is_out_of_range() -> None:
    assert fast_request("r", {"x": [2**70]}, None, "i", None) is None
    with pytest.raises(InvalidRequest) as caught:
        encode(request_event("r", {"x": [2**70]}, unit=None, request_id="i", reply_to=None, items=None, routes=None,
                             metadata=None))
    assert caught.value.reason == "out_of_range"


def test_a_huge_sum_is_not_mistaken_for_an_infinity() -> None:
    row = [1e308, 1e308]  # the sum overflows; the values are finite
    assert math.isinf(sum(row))
    assert fast_request("r", {"x": row}, None, "i", None) is None  # not sure: the checked path decides
    request_event("r", {"x": row}, unit=None, request_id="i", reply_to=None, items=None, routes=None, metadata=None)


@pytest.mark.stack
async def test_sent_requests_are_delivered_answered_and_traced(stack, topics, gateway) -> None:  # type: ignore[no-untyped-def]
    t = topics.topics
    row = [0.25] * N_FEATURES
    async with KafkaClient(stack.kafka, requests_topic=t.requests, max_queued=7) as client:
        ids = [await client.send("churn", {"input": row}) for _ in range(150)]
        ids.append(await client.send("churn", {"input": row}, unit="u-1", request_id="named"))
        with pytest.raises(InvalidRequest) as caught:
            await client.send("churn", {"input": [0.5, float("nan")]})
        assert caught.value.reason == "not_finite"
        await client.flush()
        stats = client.send_stats()
    assert stats == {"queued": 0, "delivered": 151, "failed": 0}
    assert len(set(ids)) == 151
    schema = json_schemas()["request"]
    requests = await read_records(stack.kafka, t.requests, lambda rs: len(rs) >= 151)
    assert sorted(orjson.loads(r.value)["request_id"] for r in requests) == sorted(ids)
    traces = set()
    for record in requests:
        jsonschema.validate(orjson.loads(record.value), schema)
        traces.add(trace_id_of(parse_traceparent(dict(record.headers)["traceparent"]) or ""))
    assert len(traces) == 151 and "" not in traces  # one fresh, valid trace per request

    def answered(records: list[Any]) -> set[str]:
        return {orjson.loads(r.value)["request_id"] for r in records}

    predictions = await read_records(stack.kafka, t.predictions, lambda rs: set(ids) <= answered(rs))
    assert set(ids) <= answered(predictions)  # the gateway took every fast-encoded event
