"""The feedback worker's interleaving logic (pure): crediting an outcome's clicks, scoring every
pair of rankers, the join step that emits it once, the ledger item, and the verdicts read back."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.join import (
    Count,
    Entry,
    JoinRules,
    OutcomeIn,
    PredictionIn,
    RouteRules,
    Seen,
    Served,
    decode_entry,
    encode_entry,
    on_outcome,
    on_prediction,
)
from feedback.ledger import FeedbackKeys, LedgerPlanner
from feedback.outcome_metrics import PredictionView
from feedback.pairs import (
    Impression,
    Pairs,
    PairTable,
    impression_from_outputs,
    pair_fields,
    parse_pairs,
    route_verdicts,
    score_impression,
)
from router.interleave import clicked_positions, credit_clicks, pairwise_outcome
from router.preference import PreferenceTest

RULES = JoinRules(ttl_s=3600.0, routes={"search": RouteRules()})
VIEW = PredictionView(score=None, predicted=None)
ARMS = ("a", "b", "c", "d")


@st.composite
def impressions(draw: st.DrawFn) -> tuple[Impression, list[str]]:
    """A shown list over 2..4 rankers (some may have no position), and clicks that may repeat,
    name unshown items and come in any order."""
    n_rankers = draw(st.integers(2, 4))
    arms = ARMS[:n_rankers]
    k = draw(st.integers(0, 8))
    items = tuple(f"i{n}" for n in range(k))
    teams = tuple(draw(st.lists(st.sampled_from(arms), min_size=k, max_size=k)))
    clicks = draw(st.lists(st.sampled_from([*items, "unshown-1", "unshown-2"]), max_size=12))
    return Impression(items, teams, arms), clicks


@settings(max_examples=300, deadline=None)
@given(impressions())
def test_crediting_and_pair_scores_follow_router_interleave(case: tuple[Impression, list[str]]) -> None:
    impression, clicks = case
    score = score_impression(impression, clicks)
    # the same rule as the numpy functions the benchmark and the gateway are tested with
    index = {arm: i for i, arm in enumerate(impression.arms)}
    team = np.array([index[t] for t in impression.teams], dtype=np.int64)
    expected = credit_clicks(team, clicked_positions(impression.items, clicks), len(impression.arms))
    assert [score.credits[arm] for arm in impression.arms] == expected.tolist()
    assert score.unshown_clicks == sum(1 for c in clicks if c not in impression.items)
    outcomes = pairwise_outcome(expected)
    fields = pair_fields(score)
    assert fields["impressions"] == 1
    for a, b in combinations(impression.arms, 2):
        results = [r for r in ("win", "loss", "tie") if f"{a}|{b}|{r}" in fields]
        assert results == [{1: "win", -1: "loss", 0: "tie"}[int(outcomes[index[a], index[b]])]]
        assert f"{b}|{a}|{results[0]}" not in fields  # one name per pair: sorted
    assert sum(v for k, v in fields.items() if k.endswith("|clicks")) == expected.sum()


def test_clicks_credit_teams_once_per_item_and_no_click_is_a_tie() -> None:
    shown = Impression(("x", "y", "z", "w"), ("a", "b", "b", "a"), ("a", "b"))
    assert pair_fields(score_impression(shown, ["y", "y", "z", "x"])) == {
        "impressions": 1.0, "a|b|loss": 1.0, "a|clicks": 1.0, "b|clicks": 2.0}
    assert pair_fields(score_impression(shown, [])) == {"impressions": 1.0, "a|b|tie": 1.0}
    assert pair_fields(score_impression(shown, ["elsewhere", "x", "w"])) == {
        "impressions": 1.0, "a|b|win": 1.0, "a|clicks": 2.0, "clicks_unshown": 1.0}


def test_impressions_come_from_interleave_outputs_only() -> None:
    outputs = {"items": ["x", "y"], "teams": ["b", "a"], "rankings": {"b": ["x", "y"], "a": ["y", "x"], "c": ["y"]}}
    assert impression_from_outputs(outputs) == Impression(("x", "y"), ("b", "a"), ("a", "b", "c"))
    for broken in ({"items": ["x"], "teams": ["a", "b"], "rankings": {"a": [], "b": []}},  # lengths differ
                   {"items": ["x"], "teams": ["z"], "rankings": {"a": [], "b": []}},  # team not a ranker
                   {"items": ["x"], "teams": ["a"], "rankings": {"a": []}},  # one ranker
                   {"items": ["x"], "teams": ["a"]},
                   {"probability": [0.3]}):
        assert impression_from_outputs(broken) is None


def prediction(impression: Impression | None, offset: int = 1) -> PredictionIn:
    served = Served("interleave", "interleave", 0, VIEW, offset, impression=impression)
    return PredictionIn("q", 0, "search", served, 100.0)


def outcome(clicks: list[str] | None, offset: int = 7, reward: float | None = None) -> OutcomeIn:
    return OutcomeIn("q", 0, Seen(reward, None, 101.0, offset, None if clicks is None else tuple(clicks)))


SHOWN = Impression(("x", "y"), ("a", "b"), ("a", "b"))


@pytest.mark.parametrize("outcome_first", [False, True])
def test_the_join_scores_the_clicks_once_in_either_order(outcome_first: bool) -> None:
    if outcome_first:
        entry = on_outcome(None, outcome(["y"]), 102.0, RULES).entry
        step = on_prediction(entry, prediction(SHOWN), RULES)
    else:
        entry = on_prediction(None, prediction(SHOWN), RULES).entry
        step = on_outcome(entry, outcome(["y"]), 102.0, RULES)
    pairs = [e for e in step.effects if isinstance(e, Pairs)]
    assert pairs == [Pairs("search", "q", {"impressions": 1.0, "a|b|loss": 1.0, "b|clicks": 1.0}, 101.0)]
    assert any(isinstance(e, Count) and e.kind == "joined" for e in step.effects)
    # the same outcome replayed (same offset) and redelivered (another offset) add no pair result
    assert on_outcome(step.entry, outcome(["y"]), 103.0, RULES).effects == ()
    again = on_outcome(step.entry, outcome(["y"], offset=8), 103.0, RULES).effects
    assert [e.kind for e in again if isinstance(e, Count)] == ["duplicate"] and not any(isinstance(e, Pairs) for e in again)


def test_clicks_without_an_impression_and_impressions_without_clicks_score_nothing() -> None:
    entry = on_prediction(None, prediction(None), RULES).entry
    assert not any(isinstance(e, Pairs) for e in on_outcome(entry, outcome(["x"]), 102.0, RULES).effects)
    entry = on_prediction(None, prediction(SHOWN), RULES).entry
    assert not any(isinstance(e, Pairs) for e in on_outcome(entry, outcome(None, reward=1.0), 102.0, RULES).effects)


def test_entries_keep_the_impression_and_the_clicks_through_the_changelog() -> None:
    entry = on_prediction(None, prediction(SHOWN), RULES).entry
    joined = on_outcome(entry, outcome(["y", "x"]), 102.0, RULES).entry
    assert isinstance(joined, Entry)
    assert decode_entry("q", encode_entry(joined)) == joined
    # entries written before this change (no impression, no clicks) still decode
    old = Entry("q", 0, route="search", primary=Served("a", "m", 1, VIEW, 3), ts_predicted=1.0,
                outcome=Seen(1.0, None, 2.0, 4))
    assert decode_entry("q", encode_entry(old)) == old


def test_the_ledger_item_adds_the_fields_to_the_pair_hash_once_per_request() -> None:
    keys = FeedbackKeys("p")
    effect = Pairs("search", "q", {"impressions": 1.0, "a|b|win": 1.0}, 101.0)
    # a repeat inside one batch is a second item with the same seen key and token: the script
    # applies a token once per request (it records it in the seen hash), so the repeat adds nothing
    [chunk] = LedgerPlanner(keys, 60.0).plan([effect, effect])
    assert len(chunk.rows) == 2 and chunk.rows[0] == chunk.rows[1]
    seen, token, group = chunk.rows[0]
    assert chunk.keys[seen - 1] == b"p:{search}:fb:seen:q" and token == "pairs"
    assert chunk.keys[group[1] - 1] == "p:{search}:fb:pairs"
    assert {chunk.names[n - 1]: v for n, v in zip(group[2::2], group[3::2])} == effect.fields


@settings(max_examples=50, deadline=None)
@given(st.lists(impressions(), max_size=40))
def test_summed_fields_parse_back_to_the_tallies(cases: list[tuple[Impression, list[str]]]) -> None:
    total: Counter[str] = Counter()
    tally: Counter[tuple[str, str, int]] = Counter()
    for impression, clicks in cases:
        score = score_impression(impression, clicks)
        total.update(pair_fields(score))
        for a, b in combinations(impression.arms, 2):
            tally[(a, b, score.outcome(a, b))] += 1
    table = parse_pairs({name.encode(): str(value).encode() for name, value in total.items()})
    assert table.impressions == len(cases)
    for (a, b) in {(a, b) for a, b, _ in tally}:
        counts = table.counts(a, b)
        assert (counts.wins, counts.losses, counts.ties) == (tally[(a, b, 1)], tally[(a, b, -1)], tally[(a, b, 0)])
        swapped = table.counts(b, a)
        assert (swapped.wins, swapped.losses, swapped.ties) == (counts.losses, counts.wins, counts.ties)


def test_verdicts_are_the_preference_tests() -> None:
    test = PreferenceTest(confidence=0.95)
    table = parse_pairs({"a|b|win": "600", "a|b|loss": "400", "a|b|tie": "50"})
    verdicts = route_verdicts(["b", "a"], table, test)
    counts, evidence, decision = verdicts.pairs[("a", "b")]
    assert (counts.wins, counts.losses, counts.ties, decision) == (600, 400, 50, 1)
    assert evidence == pytest.approx(float(test.log_evidence(600, 400))) and evidence >= verdicts.threshold
    assert verdicts.arms == {"a": "promote", "b": "reject"}
    assert route_verdicts(["a", "b"], PairTable(), test).arms == {"a": "undecided", "b": "undecided"}
    # three rankers: each pair at alpha / 3, as arm_verdicts
    fields = {"a|b|win": "600", "a|b|loss": "400", "a|c|win": "700", "a|c|loss": "300", "b|c|win": "10"}
    three = route_verdicts(["a", "b", "c"], parse_pairs(fields), test)
    wins = np.array([[0, 600, 700], [400, 0, 10], [300, 0, 0]])
    assert list(three.arms.values()) == test.arm_verdicts(wins)
    assert three.threshold == pytest.approx(np.log(3 / 0.05))
    with pytest.raises(ValueError, match="at least two"):
        route_verdicts(["a"], table, test)
