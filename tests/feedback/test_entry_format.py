"""The join table's entry format carries a version (feedback.join.ENTRY_FORMAT); records of the
previous format, written before there was one, still decode to the same entries, so a worker
upgraded in place recovers its changelog and RocksDB store (docs/feedback.md, "Changelog entry
format"). The format-1 records below are bytes the previous encoder wrote for these entries."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from feedback.join import ENTRY_FORMAT, Entry, Seen, Served, decode_entry, encode_entry
from feedback.outcome_metrics import PredictionView
from feedback.pairs import Impression

ENTRIES = [
    Entry("r-full", 3, route="churn",
          primary=Served("a", "churn-model", 7, PredictionView(0.83, 1, "yes"), 1200),
          ts_predicted=1_700_000_000.25,
          shadows=(Served("s", "churn-next", 8, PredictionView(0.4, 0, "no"), 1201, shadow=True),),
          outcome=Seen(1.0, 1, 1_700_000_030.5, 77), reward_state="joined", scored=frozenset({"a", "s"}),
          anchor_ts=1_700_000_000.25, early_duplicates=(70, 71)),
    Entry("r-interleave", 0, route="search",
          primary=Served("interleave", "interleave", 0, PredictionView(None, None, None), 5,
                         impression=Impression(("x", "y", "z"), ("r1", "r2", "r1"), ("r1", "r2"))),
          ts_predicted=1_700_000_100.0, outcome=Seen(None, None, 1_700_000_101.0, 9, ("y", "x")),
          reward_state="joined", anchor_ts=1_700_000_100.0),
    Entry("r-orphan", 11, outcome=Seen(0.25, None, 1_700_000_200.0, 4), anchor_ts=1_700_000_200.0),
    Entry("r-defaulted", 1, route="fraud", primary=Served("b", "fraud-model", 2, PredictionView(12.5, None, None), 8),
          ts_predicted=1_700_000_300.0, reward_state="defaulted", anchor_ts=1_700_000_300.0),
]

FORMAT_1 = [
    (b'[3,"churn",["a","churn-model",7,0.83,1,"yes",1200],1700000000.25,[["s","churn-next",8,0.4,0,"no",1201]],'
    b'[1.0,1,1700000030.5,77],1,["a","s"],1700000000.25,[70,71]]'),
    (b'[0,"search",["interleave","interleave",0,null,null,null,5,[["x","y","z"],["r1","r2","r1"],["r1","r2"]]],'
    b'1700000100.0,[],[null,null,1700000101.0,9,["y","x"]],1,[],1700000100.0,[]]'),
    b'[11,null,null,null,[],[0.25,null,1700000200.0,4],0,[],1700000200.0,[]]',
    b'[1,"fraud",["b","fraud-model",2,12.5,null,null,8],1700000300.0,[],null,2,[],1700000300.0,[]]',
]
"""What the encoder before ENTRY_FORMAT wrote for ENTRIES (captured from it)."""


@pytest.mark.parametrize(("entry", "raw"), list(zip(ENTRIES, FORMAT_1)), ids=[e.request_id for e in ENTRIES])
def test_a_record_of_the_previous_format_decodes_to_the_same_entry(entry: Entry, raw: bytes) -> None:
    assert decode_entry(entry.request_id, raw) == entry
    assert decode_entry(entry.request_id, encode_entry(entry)) == entry


def test_records_carry_the_format_version() -> None:
    for entry in ENTRIES:
        record = orjson.loads(encode_entry(entry))
        assert record[0] == f"v{ENTRY_FORMAT}" and len(record) == 11


def _format_1(entry: Entry) -> bytes:
    """The previous encoder's layout: this format's record without its version."""
    return orjson.dumps(orjson.loads(encode_entry(entry))[1:])


names = st.text("abcxyz-", min_size=1, max_size=6)
numbers = st.floats(-1e6, 1e6)
views = st.builds(PredictionView, st.one_of(st.none(), numbers), st.one_of(st.none(), st.integers(0, 3), names),
                  st.one_of(st.none(), names))
impressions = st.builds(Impression, st.lists(names, max_size=3).map(tuple), st.lists(names, max_size=3).map(tuple),
                        st.lists(names, max_size=2).map(tuple))
served = st.builds(Served, names, names, st.integers(0, 99), views, st.integers(0, 10**9),
                   impression=st.one_of(st.none(), impressions))
seen = st.builds(Seen, st.one_of(st.none(), numbers), st.one_of(st.none(), st.integers(0, 3), names), numbers,
                 st.integers(0, 10**9), st.one_of(st.none(), st.lists(names, max_size=3).map(tuple)))
entries = st.builds(
    Entry, names, st.integers(0, 63), route=st.one_of(st.none(), names), primary=st.one_of(st.none(), served),
    ts_predicted=st.one_of(st.none(), numbers),
    shadows=st.lists(served.map(lambda s: Served(s.arm, s.model, s.model_version, s.view, s.offset, shadow=True,
                                                impression=s.impression)), max_size=2).map(tuple),
    outcome=st.one_of(st.none(), seen), reward_state=st.sampled_from(["open", "joined", "defaulted"]),
    scored=st.frozensets(names, max_size=3), anchor_ts=numbers, early_duplicates=st.lists(st.integers(0, 99), max_size=3).map(tuple))


@given(entries)
def test_any_entry_decodes_alike_from_either_format(entry: Entry) -> None:
    assert decode_entry(entry.request_id, encode_entry(entry)) == entry
    assert decode_entry(entry.request_id, _format_1(entry)) == entry


@pytest.mark.parametrize("raw", [b'["v3",0,null,null,null,[],null,0,[],1.0,[]]', b'["v2",0]', b"[1, 2]", b"{}", b"7", b"not json"])
def test_a_record_in_a_format_it_does_not_know_is_refused_in_one_line(raw: bytes) -> None:
    with pytest.raises(ValueError, match="expected format") as caught:
        decode_entry("q", raw)
    assert "\n" not in str(caught.value)


def test_a_newer_format_is_named_in_the_refusal() -> None:
    with pytest.raises(ValueError, match="'v3' is not one this worker reads"):
        decode_entry("q", b'["v3",0,null,null,null,[],null,0,[],1.0,[]]')
