"""banditgate.cloudevents, pure: ce_id is unique per (source, event) across the event types one
source emits, headers are bounded by MAX_HEADER_BYTES (what record_limit leaves free), and the
switch off leaves the trace context only (no servers)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from banditgate import cloudevents
from banditgate.cloudevents import MAX_HEADER_BYTES, MAX_NATURAL_ID_BYTES, event_id, header_bytes, headers_for, source
from banditgate.events import MAX_ID_CHARS, MAX_NAME_CHARS, NAME_PATTERN
from banditgate.kafka_delivery import RECORD_OVERHEAD_BYTES, REQUEST_OVERHEAD_BYTES, record_limit
from banditgate.tracecontext import new_traceparent
from tests.kafka_helpers import largest_headers

request_ids = st.text(min_size=1, max_size=MAX_ID_CHARS)
arms = st.from_regex(NAME_PATTERN[:-1] + r"\Z", fullmatch=True)


def natural_ids(request_id: str, arm: str) -> dict[tuple[str, bytes], str]:
    """ce_id -> what it stands for, for the events the gateway emits from one route's source."""
    rid = request_id.encode()
    return {event_id("prediction", rid): f"prediction {request_id!r}",
            event_id("shadow-prediction", arm.encode() + b":" + rid): f"shadow {arm!r} of {request_id!r}"}


@given(st.lists(st.tuples(request_ids, arms), min_size=2, max_size=6, unique=True))
def test_events_of_one_source_never_share_an_id(requests: list[tuple[str, str]]) -> None:
    seen: dict[bytes, str] = {}
    for request_id, arm in requests:
        for ce_id, what in natural_ids(request_id, arm).items():
            assert seen.setdefault(ce_id, what) == what, (ce_id, seen[ce_id], what)


def test_the_ids_that_used_to_collide_differ() -> None:
    # before: the prediction of request "k-1/c" and the shadow on arm c of request "k-1" were both "k-1/c"
    assert event_id("prediction", b"k-1/c") != event_id("shadow-prediction", b"c:k-1")
    assert headers_for("prediction", "/s")(b"k-1", b"t")[0] == ("ce_id", b"prediction:k-1")


@given(st.text(min_size=1, max_size=5 * MAX_ID_CHARS))
def test_an_id_is_stable_and_bounded(request_id: str) -> None:
    natural = request_id.encode()
    ce_id = event_id("prediction", natural)
    assert ce_id == event_id("prediction", natural)  # a retry or a replay: the same id
    assert len(ce_id) <= len(b"prediction:") + MAX_NATURAL_ID_BYTES
    if len(natural) <= MAX_NATURAL_ID_BYTES:
        assert ce_id == b"prediction:" + natural


def test_the_largest_headers_take_max_header_bytes() -> None:
    headers = largest_headers()
    assert len(headers) == 7 and header_bytes(headers) == MAX_HEADER_BYTES


def test_record_limit_leaves_room_for_the_largest_headers() -> None:
    for topic_bytes in (20_000, 1_048_588):
        limit = record_limit(topic_bytes, 8 << 20)
        assert limit + RECORD_OVERHEAD_BYTES + header_bytes(largest_headers()) <= topic_bytes
    assert record_limit(10_000_000, 1 << 20) == (1 << 20) - REQUEST_OVERHEAD_BYTES - RECORD_OVERHEAD_BYTES \
        - MAX_HEADER_BYTES


def test_a_route_that_is_not_a_name_stays_out_of_the_source() -> None:
    assert source("gateway", "fixed-route") == "/banditgate/gateway/fixed-route"
    assert source("feedback", "x" * (MAX_NAME_CHARS + 1)) == source("feedback", "a b") == "/banditgate/feedback"


def test_switched_off_a_record_keeps_its_trace_context_only() -> None:
    trace = [("traceparent", new_traceparent().encode())]
    assert headers_for("prediction", "/s", enabled=False)(b"r", b"t", trace) == trace
    assert headers_for("prediction", "/s", enabled=False)(b"r", b"t") == []
    assert cloudevents.headers("outcome", "/s", b"x", None, enabled=False) == []
    assert cloudevents.attributes(headers_for("prediction", "/s")(b"r", b"t", trace))["id"] == "prediction:r"


def test_ce_time_is_rfc3339_milliseconds_across_second_and_millisecond_boundaries() -> None:
    from datetime import UTC, datetime

    for epoch_s in (1796674209.1234, 1796674209.1236, 1796674209.9999, 1796674210.0, 1796674210.0004, 0.5):
        expected = datetime.fromtimestamp(int(epoch_s * 1000) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        assert cloudevents.ce_time(epoch_s) == expected.encode(), epoch_s


def test_the_modules_doctests_hold() -> None:
    import doctest

    from banditgate import kafka_delivery

    for module in (cloudevents, kafka_delivery):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.failed == 0 and result.attempted > 0, module.__name__
