"""W3C trace context parsing (banditgate.tracecontext): strict, and never an error."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from banditgate.tracecontext import (
    from_kafka_headers,
    from_mapping,
    is_sampled,
    new_traceparent,
    parse_traceparent,
    parse_tracestate,
    span_id_of,
    trace_context,
    trace_id_of,
    with_parent,
)

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HEX = "0123456789abcdef"


def test_valid_traceparents_are_kept_and_invalid_ones_ignored() -> None:
    assert parse_traceparent(VALID) == VALID
    assert parse_traceparent(VALID.encode()) == VALID
    invalid = [
        VALID.upper(),  # uppercase hex
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero parent id
        "ff" + VALID[2:],  # version ff is forbidden
        VALID + "-extra",  # version 00 has exactly four fields
        VALID[:-1],  # too short
        VALID.replace("-", "_"),
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",  # not hex
        "", None, b"\xff" * 55, "0" * 55,
    ]
    for value in invalid:
        assert parse_traceparent(value) is None, value
    # a later version may carry more fields: the four known ones are read, passed on as version 00
    assert parse_traceparent("01" + VALID[2:] + "-what-ever") == VALID
    assert parse_traceparent("01" + VALID[2:] + "x") is None


@given(st.one_of(st.binary(max_size=80), st.text(max_size=80)))
def test_parsing_anything_never_raises_and_only_returns_canonical_values(value: bytes | str) -> None:
    parsed = parse_traceparent(value)
    assert parsed is None or parse_traceparent(parsed) == parsed
    state = parse_tracestate(value)
    assert state is None or (len(state) <= 512 and state.isascii())


@given(st.text(HEX, min_size=32, max_size=32), st.text(HEX, min_size=16, max_size=16),
       st.text(HEX, min_size=2, max_size=2))
def test_every_well_formed_header_with_nonzero_ids_is_accepted(trace_id: str, span_id: str, flags: str) -> None:
    value = f"00-{trace_id}-{span_id}-{flags}"
    expected = value if set(trace_id) != {"0"} and set(span_id) != {"0"} else None
    assert parse_traceparent(value) == expected
    if expected is not None:
        assert trace_id_of(value) == trace_id and span_id_of(value) == span_id
        assert is_sampled(value) == bool(int(flags, 16) & 1)
        assert parse_traceparent(with_parent(value, "1" * 16)) == f"00-{trace_id}-{'1' * 16}-{flags}"


def test_fresh_traceparents_are_valid_and_distinct() -> None:
    made = {new_traceparent() for _ in range(100)}
    assert len(made) == 100 and all(parse_traceparent(t) == t for t in made)
    assert not is_sampled(new_traceparent(sampled=False))


def test_headers_carry_a_valid_context_and_drop_the_rest() -> None:
    assert from_kafka_headers([("x", b"1"), ("traceparent", VALID.encode()), ("tracestate", b"a=1")]) == [
        ("traceparent", VALID.encode()), ("tracestate", b"a=1")]
    assert from_kafka_headers([("traceparent", b"junk"), ("tracestate", b"a=1")]) is None  # no state without a parent
    assert from_kafka_headers([("traceparent", VALID.encode()), ("tracestate", b"a\x00")]) == [
        ("traceparent", VALID.encode())]
    assert from_kafka_headers(()) is None and from_kafka_headers(None) is None
    assert from_mapping({"traceparent": VALID, "tracestate": "x" * 513}) == [("traceparent", VALID.encode())]
    assert from_mapping({"authorization": "Bearer t"}) is None


def test_the_client_sends_the_callers_context_or_a_fresh_one() -> None:
    assert trace_context(VALID, "a=1") == [("traceparent", VALID.encode()), ("tracestate", b"a=1")]
    fresh = trace_context("not-a-traceparent", "a=1")  # invalid: ignored, a fresh one instead, no foreign state
    assert len(fresh) == 1 and fresh[0][0] == "traceparent"
    parsed = parse_traceparent(fresh[0][1])
    assert parsed is not None and trace_id_of(parsed) != trace_id_of(VALID)
