"""The join state machine (pure): either order, duplicates, late, expiry, default reward, replays."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.join import (
    NO_ROUTE,
    Count,
    DropOutcome,
    DueIndex,
    Entry,
    JoinRules,
    Label,
    OutcomeIn,
    PredictionIn,
    Reward,
    RouteRules,
    Seen,
    Served,
    decode_entry,
    due_at,
    encode_entry,
    on_due,
    on_outcome,
    on_prediction,
)
from feedback.outcome_metrics import PredictionView

TTL = 1000.0
RULES = JoinRules(ttl_s=TTL, routes={"r": RouteRules(), "d": RouteRules(reward_wait_s=100.0, default_reward=0.0),
                                     "g": RouteRules(reward="gaussian")})
VIEW = PredictionView(score=0.8, predicted=1)


def primary(offset: int = 10, route: str = "r", ts: float = 0.0, arm: str = "a") -> PredictionIn:
    return PredictionIn("q", 0, route, Served(arm, "m", 1, VIEW, offset), ts)


def shadow(offset: int = 20, route: str = "r", ts: float = 0.0, arm: str = "s") -> PredictionIn:
    return PredictionIn("q", 0, route, Served(arm, "m", 2, PredictionView(score=0.3, predicted=0), offset,
                                              shadow=True), ts)


def outcome(offset: int = 30, reward: float | None = 1.0, label: object = 1, ts: float = 5.0) -> OutcomeIn:
    return OutcomeIn("q", 0, Seen(reward, label, ts, offset))


def kinds(effects: tuple) -> list[str]:
    return [e.kind if isinstance(e, Count) else type(e).__name__ for e in effects]


# ---------------------------------------------------------------------------------------------
# fixed scenarios


def test_prediction_then_outcome_joins_reward_and_label() -> None:
    step = on_prediction(None, primary(), RULES)
    assert step.changed and step.effects == ()
    step = on_outcome(step.entry, outcome(), now=10.0, rules=RULES)
    assert kinds(step.effects) == ["joined", "Reward", "Label"]
    reward = step.effects[1]
    assert isinstance(reward, Reward) and reward.reward == 1.0 and not reward.default and reward.served.arm == "a"
    assert step.entry is not None and step.entry.reward_state == "joined" and step.entry.scored == {"a"}


def test_outcome_first_waits_for_its_prediction() -> None:
    step = on_outcome(None, outcome(), now=10.0, rules=RULES)
    assert step.changed and step.effects == () and step.entry is not None and step.entry.anchor_ts == 5.0
    step = on_prediction(step.entry, primary(), RULES)
    assert kinds(step.effects) == ["joined", "Reward", "Label"]


def test_duplicate_outcome_is_counted_and_changes_nothing() -> None:
    entry = on_outcome(on_prediction(None, primary(), RULES).entry, outcome(), 10.0, RULES).entry
    step = on_outcome(entry, outcome(offset=31, reward=0.0), 11.0, RULES)
    assert not step.changed and step.entry == entry
    assert step.effects == (Count("r", "q", "duplicate", "dup:31", "a"),)


def test_duplicates_before_the_prediction_are_counted_on_the_route_once_it_is_known() -> None:
    entry = on_outcome(None, outcome(offset=30), 10.0, RULES).entry
    entry = on_outcome(entry, outcome(offset=31), 10.0, RULES).entry
    assert on_outcome(entry, outcome(offset=31), 10.0, RULES).changed is False  # replay of the duplicate
    step = on_prediction(entry, primary(), RULES)
    assert Count("r", "q", "duplicate", "dup:31", "a") in step.effects
    assert kinds(step.effects).count("duplicate") == 1


def test_replayed_events_are_no_ops() -> None:
    entry = on_prediction(None, primary(), RULES).entry
    joined = on_outcome(entry, outcome(), 10.0, RULES).entry
    assert on_outcome(joined, outcome(), 10.0, RULES) .effects == ()
    assert on_prediction(joined, primary(), RULES).effects == ()
    dup = on_prediction(joined, primary(offset=11), RULES)
    assert kinds(dup.effects) == ["prediction_duplicate"]


def test_shadow_after_join_is_scored_against_label_and_primary() -> None:
    entry = on_outcome(on_prediction(None, primary(), RULES).entry, outcome(), 10.0, RULES).entry
    step = on_prediction(entry, shadow(), RULES)
    assert kinds(step.effects) == ["Label"]
    label = step.effects[0]
    assert isinstance(label, Label) and label.served.shadow and label.primary is not None and label.primary.arm == "a"
    assert step.entry is not None and step.entry.scored == {"a", "s"}


def test_shadow_before_primary_waits_for_it() -> None:
    entry = on_prediction(None, shadow(), RULES).entry
    entry = on_outcome(entry, outcome(), 10.0, RULES).entry
    assert entry is not None and entry.scored == frozenset()
    step = on_prediction(entry, primary(), RULES)
    assert sorted(e.served.arm for e in step.effects if isinstance(e, Label)) == ["a", "s"]


def test_default_reward_applies_once_and_a_later_outcome_is_late() -> None:
    entry = on_prediction(None, primary(route="d", ts=0.0), RULES).entry
    assert entry is not None and due_at(entry, RULES) == 100.0
    assert on_due(entry, 99.0, RULES).effects == ()
    step = on_due(entry, 100.0, RULES)
    assert kinds(step.effects) == ["default", "Reward"]
    reward = step.effects[1]
    assert isinstance(reward, Reward) and reward.default and reward.reward == 0.0
    defaulted = step.entry
    assert defaulted is not None and defaulted.reward_state == "defaulted" and due_at(defaulted, RULES) == TTL
    assert on_due(defaulted, 200.0, RULES).effects == ()
    late = on_outcome(defaulted, outcome(reward=1.0), 300.0, RULES)
    assert kinds(late.effects) == ["late", "Label"]  # the label still scores quality; the reward does not count
    again = on_outcome(late.entry, outcome(offset=31), 301.0, RULES)
    assert kinds(again.effects) == ["duplicate"]


def test_outcome_before_the_deadline_prevents_the_default() -> None:
    entry = on_outcome(on_prediction(None, primary(route="d"), RULES).entry, outcome(reward=1.0), 50.0, RULES).entry
    assert entry is not None and entry.reward_state == "joined"
    assert on_due(entry, 150.0, RULES).effects == ()


def test_orphan_expires_after_ttl_and_is_dead_lettered() -> None:
    entry = on_outcome(None, outcome(ts=5.0), 10.0, RULES).entry
    assert entry is not None and due_at(entry, RULES) == 5.0 + TTL
    assert on_due(entry, 5.0 + TTL - 1, RULES).effects == ()
    step = on_due(entry, 5.0 + TTL, RULES)
    assert step.entry is None and step.changed
    assert kinds(step.effects) == ["orphan", "DropOutcome"]
    drop = step.effects[1]
    assert isinstance(drop, DropOutcome) and drop.reason == "orphan" and drop.outcome.offset == 30


def test_outcome_older_than_ttl_is_an_orphan_at_once() -> None:
    step = on_outcome(None, outcome(ts=0.0), now=TTL + 1, rules=RULES)
    assert step.entry is None and not step.changed
    assert kinds(step.effects) == ["orphan", "DropOutcome"]
    assert step.effects[0] == Count(NO_ROUTE, "q", "orphan", "orphan:30")


def test_unanswered_prediction_expires_and_is_counted() -> None:
    entry = on_prediction(None, primary(ts=0.0), RULES).entry
    step = on_due(entry, TTL, RULES)
    assert step.entry is None and kinds(step.effects) == ["unanswered"]


def test_joined_entry_expires_silently() -> None:
    entry = on_outcome(on_prediction(None, primary(), RULES).entry, outcome(), 10.0, RULES).entry
    step = on_due(entry, TTL, RULES)
    assert step.entry is None and step.changed and step.effects == ()


def test_out_of_range_reward_is_dead_lettered_and_the_entry_keeps_waiting() -> None:
    entry = on_prediction(None, primary(), RULES).entry
    step = on_outcome(entry, outcome(reward=3.0), 10.0, RULES)
    assert kinds(step.effects) == ["DropOutcome", "invalid"]
    assert step.entry is not None and step.entry.outcome is None and step.entry.reward_state == "open"
    fixed = on_outcome(step.entry, outcome(offset=31, reward=1.0), 10.0, RULES)
    assert kinds(fixed.effects) == ["joined", "Reward", "Label"]
    gaussian = on_outcome(on_prediction(None, primary(route="g"), RULES).entry, outcome(reward=3.0), 10.0, RULES)
    assert kinds(gaussian.effects) == ["joined", "Reward", "Label"]


def test_label_only_outcome_joins_without_reward() -> None:
    step = on_outcome(on_prediction(None, primary(route="d"), RULES).entry, outcome(reward=None), 10.0, RULES)
    assert kinds(step.effects) == ["joined", "Label"]
    assert on_due(step.entry, 500.0, RULES).effects == ()  # no default after an outcome


def test_entry_encoding_round_trips() -> None:
    entry = on_prediction(on_outcome(None, outcome(), 10.0, RULES).entry, shadow(), RULES).entry
    entry = on_prediction(entry, primary(), RULES).entry
    assert entry is not None
    assert decode_entry("q", encode_entry(entry)) == entry
    with pytest.raises(ValueError, match="expected format"):
        decode_entry("q", b"[1, 2]")


# ---------------------------------------------------------------------------------------------
# properties: any order, duplicates, replays after a crash


@dataclass
class Ledger:
    """What Redis does with effects: each (route, request_id, token) applies once."""

    seen: set[tuple[str, str, str]] = field(default_factory=set)
    applied: list[object] = field(default_factory=list)

    def apply(self, effects: tuple) -> None:
        for effect in effects:
            if isinstance(effect, DropOutcome):
                continue
            key = (effect.route, effect.request_id, effect.token)
            if isinstance(effect, Count) and effect.kind in ("joined", "default"):
                key = (effect.route, effect.request_id, "decision")
            if isinstance(effect, Reward):
                key = (effect.route, effect.request_id, "reward")
            if key not in self.seen:
                self.seen.add(key)
                self.applied.append(effect)


def run(events: list, ledger: Ledger, entry: Entry | None = None, now: float = 10.0) -> Entry | None:
    for event in events:
        if isinstance(event, OutcomeIn):
            step = on_outcome(entry, event, now, RULES)
        else:
            step = on_prediction(entry, event, RULES)
        ledger.apply(step.effects)
        if step.changed:
            entry = step.entry
    return entry


def summary(ledger: Ledger) -> dict[str, object]:
    out: dict[str, object] = {}
    for effect in ledger.applied:
        if isinstance(effect, Count):
            out[effect.kind] = out.get(effect.kind, 0) + 1  # type: ignore[operator]
        elif isinstance(effect, Reward):
            out["reward"] = effect.reward
        elif isinstance(effect, Label):
            out[f"label:{effect.served.arm}"] = out.get(f"label:{effect.served.arm}", 0) + 1  # type: ignore[operator]
    return out


@st.composite
def deliveries(draw: st.DrawFn) -> list:
    """A request's events in any order: its prediction (maybe), shadow (maybe), 1-3 distinct
    outcomes, with some events delivered twice (same offset: a redelivery)."""
    events: list = []
    if draw(st.booleans()):
        events.append(primary(offset=10))
    if draw(st.booleans()):
        events.append(shadow(offset=20))
    rewards = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=3))
    events += [outcome(offset=30 + i, reward=r) for i, r in enumerate(rewards)]
    order = draw(st.permutations(events))
    redelivered = draw(st.lists(st.sampled_from(order), max_size=3))
    positions = draw(st.lists(st.integers(0, len(order) + len(redelivered)), min_size=len(redelivered),
                              max_size=len(redelivered)))
    out = list(order)
    for event, position in zip(redelivered, positions):
        out.insert(min(position, len(out)), event)
    return out


@given(deliveries())
@settings(max_examples=300, deadline=None)
def test_every_outcome_counts_once_in_any_order(events: list) -> None:
    ledger = Ledger()
    run(events, ledger)
    got = summary(ledger)
    has_primary = any(isinstance(e, PredictionIn) and not e.served.shadow for e in events)
    has_shadow = any(isinstance(e, PredictionIn) and e.served.shadow for e in events)
    outcomes_in_order = list(dict.fromkeys(e.outcome.offset for e in events if isinstance(e, OutcomeIn)))
    first = next(e for e in events if isinstance(e, OutcomeIn) and e.outcome.offset == outcomes_in_order[0])
    if has_primary:
        assert got.get("joined") == 1
        assert got.get("reward") == first.outcome.reward  # the first outcome to arrive wins
        assert got.get("duplicate", 0) == len(outcomes_in_order) - 1
        assert got.get("label:a") == 1
        assert got.get("label:s", 0) == (1 if has_shadow else 0)
    else:
        assert "joined" not in got and "reward" not in got


@given(deliveries(), st.data())
@settings(max_examples=300, deadline=None)
def test_a_crash_and_replay_changes_nothing(events: list, data: st.DataObject) -> None:
    """The worker applies effects to Redis for a prefix j of the events, persisted the entry for a
    prefix k <= j, committed offsets for a prefix c <= k, crashed, and replays from c against the
    entry of k: the applied effects and the final entry equal a clean run's."""
    clean = Ledger()
    clean_entry = run(events, clean)
    j = data.draw(st.integers(0, len(events)))
    k = data.draw(st.integers(0, j))
    c = data.draw(st.integers(0, k))
    crashed = Ledger()
    persisted = run(events[:k], crashed)
    run(events[k:j], crashed, persisted)  # applied to Redis, never persisted
    final = run(events[c:], crashed, persisted)
    assert summary(crashed) == summary(clean)
    assert final == clean_entry


@given(st.floats(0, 300), st.floats(0, 300), st.sampled_from([0.0, 1.0]))
@settings(max_examples=200, deadline=None)
def test_default_or_outcome_counts_exactly_once(outcome_at: float, tick_at: float, reward: float) -> None:
    """A sweep at `tick_at` and an outcome at `outcome_at`: whichever comes first decides the
    arm's reward; the other never adds a second one."""
    ledger = Ledger()
    entry = run([primary(route="d", ts=0.0)], ledger)
    for when, what in sorted([(outcome_at, "outcome"), (tick_at, "tick")]):
        if what == "tick":
            step = on_due(entry, when, RULES)
        else:
            step = on_outcome(entry, OutcomeIn("q", 0, Seen(reward, 1, when, 30)), when, RULES)
        ledger.apply(step.effects)
        if step.changed:
            entry = step.entry
    got = summary(ledger)
    defaulted = 100.0 <= tick_at < outcome_at  # on a tie the outcome is handled first (sorted order)
    assert got.get("joined", 0) + got.get("default", 0) == 1
    assert got["reward"] == (0.0 if defaulted else reward)
    assert got.get("late", 0) == (1 if defaulted else 0)


# ---------------------------------------------------------------------------------------------
# the timer index


def test_due_index_pops_each_key_once_when_its_bucket_ends() -> None:
    index = DueIndex(resolution_s=1.0)
    index.set("a", 5.2)
    index.set("b", 7.9)
    index.set("c", 5.9)
    index.set("c", 9.0)  # moved
    assert index.pop_due(5.9) == []
    assert sorted(index.pop_due(6.0)) == ["a"]
    assert index.pop_due(8.0) == ["b"]
    assert "c" in index and len(index) == 1
    index.discard("c")
    assert index.pop_due(100.0) == [] and len(index) == 0


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 50)), max_size=60), st.floats(0, 60),
       st.integers(1, 10))
def test_due_index_matches_a_plain_dict(schedule: list[tuple[int, float]], now: float, limit: int) -> None:
    index = DueIndex(resolution_s=1.0)
    latest: dict[int, float] = {}
    for key, due in schedule:
        index.set(key, due)
        latest[key] = due
    expected = {k for k, due in latest.items() if int(due // 1.0) <= int(now // 1.0) - 1}
    if expected:
        assert index.has_due(now)  # a sweep with something due must not skip it
    got: list[int] = []
    while batch := index.pop_due(now, limit):
        assert len(batch) <= limit
        got += batch
    assert sorted(got) == sorted(expected)
    assert len(index) == len(latest) - len(expected)
    assert not index.has_due(now)  # popped: nothing more (emptied buckets are gone too)


TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_entry_keeps_the_primary_predictions_trace_and_stores_it_only_when_there_is_one() -> None:
    event = primary()
    event.trace = TRACE
    traced = on_prediction(on_outcome(None, outcome(), 10.0, RULES).entry, event, RULES).entry
    assert traced is not None and traced.trace == TRACE
    assert decode_entry("q", encode_entry(traced)) == traced
    untraced = on_prediction(None, primary(), RULES).entry
    assert untraced is not None and untraced.trace is None
    assert len(orjson.loads(encode_entry(untraced))) == 11  # the version and the ten fields: no trace item
    assert len(orjson.loads(encode_entry(traced))) == 12
    # an outcome's step keeps it (the worker links the outcome's processing to it)
    later = on_outcome(on_prediction(None, event, RULES).entry, outcome(reward=5.0), 10.0, RULES)
    assert later.entry is not None and later.entry.trace == TRACE
    # a stored trace that is not a valid traceparent is dropped at decode, not an error (the rest stands)
    for bad in (7, "not-a-traceparent", TRACE.upper()):
        assert decode_entry("q", orjson.dumps([*orjson.loads(encode_entry(untraced)), bad])) == untraced
