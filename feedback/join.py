"""The join of predictions, shadow predictions and outcomes by request_id (pure: no I/O).

One :class:`Entry` per request_id holds what has arrived so far. Each arrival, and each timer
check, is a pure step ``(entry or None, input, now) -> Step(new entry or None, effects)``; the
feedback worker keeps entries in a faust table (changelog-backed) and applies the effects
(Redis arm statistics and ledger, dead letters). Either order works:

* prediction first: the entry waits for an outcome; at ``ts_predicted + reward_wait_s`` a route
  with a ``default_reward`` scores the arm with it (``default``), exactly once;
* outcome first: the entry waits for the prediction; when it comes the two join;
* both: the outcome's reward scores the serving arm (``joined``), its label scores every model
  that predicted the request (primary and shadows, shadows arriving later included);
* an outcome after the default is ``late``: its label still scores quality, its reward does not
  count (the request already counted once);
* a second outcome is a ``duplicate`` and changes nothing;
* interleave routes: when the outcome joins, its ``clicks`` on the prediction's shown list
  (``Served.impression``) become one :class:`~feedback.pairs.Pairs` effect: a win, loss or tie
  for every pair of rankers (token ``pairs``, so it counts once per request);
* an entry expires ``ttl_s`` after its anchor (the prediction's ``ts_predicted``, or the early
  outcome's ``ts``): an outcome that never met its prediction is an ``orphan`` (counted and
  dead-lettered); a prediction that never got an outcome is ``unanswered``. An outcome that
  arrives already older than the TTL with nothing to join is an orphan at once;
* an entry evicted because the table is over its budget (:func:`on_evict`, in the order of
  :func:`lane_of` and age) ends as its expiry would: an orphan, an unanswered prediction or the
  route's default reward, applied now, plus an ``evicted`` count; its late outcome then finds no
  prediction and ends as an orphan.

Replays: after a crash the worker re-reads events whose offsets were not committed, against a
table that may already hold their effect. Every entry remembers the source offset of what it
holds, so a replayed event is recognised (same offset) and is a no-op. Effects carry a
deterministic ``token`` per request (``decision``, ``reward``, ``label:<arm>``, ``dup:<offset>``...)
that the Redis side uses to apply each at most once, which covers the crash window between
applying effects and persisting the entry.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, final

import orjson

from banditgate.jsontypes import JSONObject, JSONValue
from banditgate.tracecontext import parse_traceparent
from feedback.outcome_metrics import PredictionView
from feedback.pairs import Impression, Pairs, pairs_effect
from feedback.reward import RewardError, RewardKind, checked_reward

NO_ROUTE = "_none"
"""Route name for counts about requests whose route never became known (orphans)."""

COUNT_KINDS = ("joined", "duplicate", "late", "orphan", "default", "unanswered", "prediction_duplicate", "invalid",
               "evicted")

EVICTION_REASONS = ("settled", "unanswered", "default", "orphan", "shadow")
"""What an evicted entry held: `settled` a joined or defaulted request (kept only to recognise
duplicates and late shadows), `unanswered` a prediction still waiting for its outcome on a route
without a default reward (counted unanswered), `default` one on a route with a default reward
(the default is applied now), `orphan` an outcome waiting for its prediction (dead-lettered as an
orphan), `shadow` shadow predictions waiting for their primary. The ``evicted`` Count's token is
``evicted:<reason>:<offset>``."""

RewardState = Literal["open", "joined", "defaulted"]


# ---------------------------------------------------------------------------------------------
# rules


@dataclass(frozen=True, slots=True)
class RouteRules:
    """What the join needs to know about a route."""

    reward: RewardKind = "bernoulli"
    reward_wait_s: float | None = None
    default_reward: float | None = None

    @property
    def has_default(self) -> bool:
        return self.reward_wait_s is not None and self.default_reward is not None


@dataclass(frozen=True, slots=True)
class JoinRules:
    """Join TTL and per-route rules."""

    ttl_s: float
    routes: Mapping[str, RouteRules] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s!r}")

    def route(self, name: str | None) -> RouteRules:
        return self.routes.get(name or "", _NO_RULES)


_NO_RULES = RouteRules()


# ---------------------------------------------------------------------------------------------
# state


@dataclass(frozen=True, slots=True)
class Served:
    """One model's prediction for a request (the serving arm's, or a shadow's)."""

    arm: str
    model: str
    model_version: int
    view: PredictionView
    offset: int
    """Source offset of the (shadow-)prediction event: identifies a replay."""
    shadow: bool = False
    impression: Impression | None = None
    """The interleaved list shown (interleave routes): clicks are credited against it."""

    @property
    def role(self) -> str:
        return "shadow" if self.shadow else "primary"


@dataclass(frozen=True, slots=True)
class Seen:
    """An outcome as the join keeps it."""

    reward: float | None
    label: JSONValue
    ts: float
    """Event time: the outcome's ``ts``, or the Kafka timestamp when it has none."""
    offset: int
    clicks: tuple[str, ...] | None = None
    """Clicked item ids in click order (interleave routes)."""

    def to_event(self, request_id: str) -> JSONObject:
        """The outcome as an event object (for a dead letter's payload)."""
        out: JSONObject = {"request_id": request_id, "ts": self.ts}
        if self.reward is not None:
            out["reward"] = self.reward
        if self.label is not None:
            out["label"] = self.label
        if self.clicks is not None:
            out["clicks"] = list(self.clicks)
        return out


@final  # `type(x) is Entry` tells a decoded entry from stored bytes (feedback.state)
@dataclass(frozen=True, slots=True)
class Entry:
    """Everything known about one request_id."""

    request_id: str
    partition: int
    route: str | None = None
    primary: Served | None = None
    ts_predicted: float | None = None
    shadows: tuple[Served, ...] = ()
    outcome: Seen | None = None
    reward_state: RewardState = "open"
    scored: frozenset[str] = frozenset()
    """Arms whose prediction has been scored against the label."""
    anchor_ts: float = 0.0
    """Expiry clock start (event time, epoch seconds)."""
    early_duplicates: tuple[int, ...] = ()
    """Offsets of duplicate outcomes that came before the prediction (counted when the route is known)."""
    trace: str | None = None
    """The primary prediction's W3C traceparent (banditgate.tracecontext), when its record had one:
    what the worker emits for this request, and an outcome's processing, link to that trace."""


_set = object.__setattr__


def _slot_setters(cls: type, names: tuple[str, ...]) -> list[Callable[[object, object], None]]:
    """The slots' descriptor setters of the frozen slotted dataclass `cls`, in field order; fails
    at import if the fields are not `names` (the hand-unrolled builders below list them)."""
    actual = tuple(f.name for f in fields(cls))
    if actual != names:
        raise RuntimeError(f"{cls.__name__} fields are {actual}, the fast builders expect {names}")
    return [cls.__dict__[name].__set__ for name in names]


# Positional builders and a copier that set the slots through their descriptors: about half the
# cost of the frozen ``__init__``, which goes through ``object.__setattr__`` per field (measured:
# 0.6 against 1.3 us to copy an Entry). Unrolled by hand (no generated code). For the hot path;
# elsewhere call the class.
_new = object.__new__
_sv = _slot_setters(Served, ("arm", "model", "model_version", "view", "offset", "shadow", "impression"))
_ss = _slot_setters(Seen, ("reward", "label", "ts", "offset", "clicks"))
_se = _slot_setters(Entry, ("request_id", "partition", "route", "primary", "ts_predicted", "shadows", "outcome",
                            "reward_state", "scored", "anchor_ts", "early_duplicates", "trace"))


def make_served(arm: str, model: str, model_version: int, view: PredictionView, offset: int, shadow: bool,
                impression: Impression | None) -> Served:
    """``Served(arm, model, model_version, view, offset, shadow, impression)``, faster (hot path)."""
    new = _new(Served)
    s = _sv
    s[0](new, arm); s[1](new, model); s[2](new, model_version); s[3](new, view)  # noqa: E702
    s[4](new, offset); s[5](new, shadow); s[6](new, impression)  # noqa: E702
    return new


def make_seen(reward: float | None, label: JSONValue, ts: float, offset: int, clicks: tuple[str, ...] | None) -> Seen:
    """``Seen(reward, label, ts, offset, clicks)``, faster (hot path)."""
    new = _new(Seen)
    s = _ss
    s[0](new, reward); s[1](new, label); s[2](new, ts); s[3](new, offset); s[4](new, clicks)  # noqa: E702
    return new


def _make_entry(request_id: str, partition: int, route: str | None, primary: Served | None,
                ts_predicted: float | None, shadows: tuple[Served, ...], outcome: Seen | None,
                reward_state: RewardState, scored: frozenset[str], anchor_ts: float,
                early_duplicates: tuple[int, ...], trace: str | None = None) -> Entry:
    new = _new(Entry)
    s = _se
    s[0](new, request_id); s[1](new, partition); s[2](new, route); s[3](new, primary)  # noqa: E702
    s[4](new, ts_predicted); s[5](new, shadows); s[6](new, outcome); s[7](new, reward_state)  # noqa: E702
    s[8](new, scored); s[9](new, anchor_ts); s[10](new, early_duplicates); s[11](new, trace)  # noqa: E702
    return new


def _copy(old: Entry) -> Entry:
    """A field-by-field copy that the calling step owns: it may set fields on it (with `_set`)
    until it returns it. Entries are never changed once a step has returned them."""
    new = _new(Entry)
    s = _se
    s[0](new, old.request_id); s[1](new, old.partition); s[2](new, old.route); s[3](new, old.primary)  # noqa: E702
    s[4](new, old.ts_predicted); s[5](new, old.shadows); s[6](new, old.outcome)  # noqa: E702
    s[7](new, old.reward_state); s[8](new, old.scored); s[9](new, old.anchor_ts)  # noqa: E702
    s[10](new, old.early_duplicates); s[11](new, old.trace)  # noqa: E702
    return new


_NOTHING_SCORED: frozenset[str] = frozenset()


def _evolve(entry: Entry, **changes: object) -> Entry:
    """dataclasses.replace for Entry without its per-call introspection (this is the hot path)."""
    new = _copy(entry)
    for name, value in changes.items():
        _set(new, name, value)
    return new


@dataclass(slots=True)
class PredictionIn:
    """A decoded (shadow-)prediction event."""

    request_id: str
    partition: int
    route: str
    served: Served
    ts_predicted: float
    trace: str | None = None
    """The event record's valid traceparent, if any."""


@dataclass(slots=True)
class OutcomeIn:
    """A decoded outcome event."""

    request_id: str
    partition: int
    outcome: Seen
    trace: str | None = None
    """The outcome record's valid traceparent, read at decode only when the worker traces."""


# ---------------------------------------------------------------------------------------------
# effects
#
# The decoded events, the effects and Step are made several times per event and live for one
# batch: they are plain slotted dataclasses, treated as immutable but not frozen, because a
# frozen dataclass's __init__ (object.__setattr__ per field) costs about five times as much
# (measured: 1.2 vs 0.24 us for five fields). What the table keeps (Entry, Served, Seen) stays frozen.


@dataclass(slots=True)
class Count:
    """Count one event of `kind` (one of COUNT_KINDS) for a request, once per `token`."""

    route: str
    request_id: str
    kind: str
    token: str
    arm: str | None = None


@dataclass(slots=True)
class Reward:
    """Score the serving arm with `reward` (its statistics in Redis and its reward quality)."""

    route: str
    request_id: str
    served: Served
    reward: float
    default: bool
    ts: float
    token: str = "reward"  # noqa: S105 - the kind of event, not a secret


@dataclass(slots=True)
class Label:
    """Score one model's prediction against the request's label; a shadow is also compared
    with the primary (agreement and the paired losses of the promote/reject test)."""

    route: str
    request_id: str
    served: Served
    label: JSONValue
    ts: float
    primary: Served | None

    @property
    def token(self) -> str:
        return f"label:{self.served.arm}"


@dataclass(slots=True)
class DropOutcome:
    """Dead-letter an outcome (`reason` is a reason code, `error` one human line)."""

    request_id: str
    partition: int
    outcome: Seen
    reason: str
    error: str
    trace: str | None = None
    """The request's prediction's traceparent (its dead letter carries it)."""


Effect = Count | Reward | Label | DropOutcome | Pairs


@dataclass(slots=True)
class Step:
    """The result of one step: the new entry (None: delete it), whether to write it, effects."""

    entry: Entry | None
    changed: bool
    effects: tuple[Effect, ...] = ()


# ---------------------------------------------------------------------------------------------
# steps


def _anchor(entry: Entry) -> float:
    if entry.primary is not None and entry.ts_predicted is not None:
        return entry.ts_predicted
    if entry.outcome is not None:
        return entry.outcome.ts
    return entry.anchor_ts


def _settle(entry: Entry, rules: JoinRules) -> tuple[Entry, list[Effect]]:
    """Effects of an entry that has its primary prediction and an outcome. `entry` is a copy the
    calling step owns (see `_copy`): its fields are updated in place."""
    effects: list[Effect] = []
    primary, outcome = entry.primary, entry.outcome
    if primary is None or outcome is None:
        return entry, effects
    route = entry.route or NO_ROUTE
    request_id = entry.request_id
    if entry.early_duplicates:
        effects.extend(Count(route, request_id, "duplicate", f"dup:{offset}", primary.arm)
                       for offset in entry.early_duplicates)
        _set(entry, "early_duplicates", ())
    if entry.reward_state == "open":
        reward = outcome.reward
        if reward is not None:
            try:
                reward = checked_reward(reward, rules.route(entry.route).reward)
            except RewardError as exc:
                effects.append(DropOutcome(request_id, entry.partition, outcome, exc.reason,
                                           f"outcome for {request_id!r} on route {route!r}: {exc}", entry.trace))
                effects.append(Count(route, request_id, "invalid", f"invalid:{outcome.offset}", primary.arm))
                _set(entry, "outcome", None)
                return entry, effects
        _set(entry, "reward_state", "joined")
        effects.append(Count(route, request_id, "joined", "decision", primary.arm))
        if reward is not None:
            effects.append(Reward(route, request_id, primary, reward, False, outcome.ts))
        if outcome.clicks is not None and primary.impression is not None:
            effects.append(pairs_effect(route, request_id, primary.impression, outcome.clicks, outcome.ts))
    label = outcome.label
    if label is not None:
        scored = entry.scored
        added: list[str] = []
        for served in (primary, *entry.shadows) if entry.shadows else (primary,):
            arm = served.arm
            if arm not in scored and arm not in added:
                added.append(arm)
                effects.append(Label(route, request_id, served, label, outcome.ts,
                                     None if served is primary else primary))
        if added:
            _set(entry, "scored", scored.union(added))
    return entry, effects


def on_prediction(entry: Entry | None, event: PredictionIn, rules: JoinRules) -> Step:
    """A primary or shadow prediction arrives."""
    served = event.served
    if entry is None:
        new = _make_entry(event.request_id, event.partition, None, None, None, (), None, "open", _NOTHING_SCORED,
                          event.ts_predicted, ())
        entry = new
    else:
        new = None
    if not served.shadow:
        if entry.primary is not None:
            if entry.primary.offset == served.offset:
                return Step(entry, False)
            return Step(entry, False, (Count(entry.route or event.route, entry.request_id, "prediction_duplicate",
                                             f"pdup:{served.offset}", served.arm),))
        if new is None:
            new = _copy(entry)
        _set(new, "route", entry.route or event.route)
        _set(new, "primary", served)
        _set(new, "ts_predicted", event.ts_predicted)
        if event.trace is not None:
            _set(new, "trace", event.trace)
    else:
        for known in entry.shadows:
            if known.arm == served.arm:
                if known.offset == served.offset:
                    return Step(entry, False)
                return Step(entry, False, (Count(entry.route or event.route, entry.request_id, "prediction_duplicate",
                                                 f"pdup:{served.offset}", served.arm),))
        if new is None:
            new = _copy(entry)
        _set(new, "route", entry.route or event.route)
        _set(new, "shadows", entry.shadows + (served,))
    _set(new, "anchor_ts", _anchor(new))
    new, effects = _settle(new, rules)
    return Step(new, True, tuple(effects))


def on_outcome(entry: Entry | None, event: OutcomeIn, now: float, rules: JoinRules) -> Step:
    """An outcome arrives at wall-clock time `now` (epoch seconds)."""
    outcome = event.outcome
    if entry is None:
        if outcome.ts + rules.ttl_s <= now:
            return Step(None, False, _orphaned(Entry(event.request_id, event.partition, outcome=outcome), rules,
                                               "arrived after the join TTL with no prediction to join"))
        return Step(_make_entry(event.request_id, event.partition, None, None, None, (), outcome, "open",
                                _NOTHING_SCORED, outcome.ts, ()), True)
    if entry.outcome is not None:
        if entry.outcome.offset == outcome.offset or outcome.offset in entry.early_duplicates:
            return Step(entry, False)
        if entry.primary is None:
            return Step(_evolve(entry, early_duplicates=entry.early_duplicates + (outcome.offset,)), True)
        return Step(entry, False, (Count(entry.route or NO_ROUTE, entry.request_id, "duplicate",
                                         f"dup:{outcome.offset}", entry.primary.arm),))
    new = _copy(entry)
    _set(new, "outcome", outcome)
    if new.primary is None:
        _set(new, "anchor_ts", _anchor(new))
        return Step(new, True)
    if new.reward_state == "defaulted":
        late: list[Effect] = [Count(new.route or NO_ROUTE, new.request_id, "late", "late", new.primary.arm)]
        new, effects = _settle(new, rules)
        return Step(new, True, tuple(late + effects))
    new, effects = _settle(new, rules)
    return Step(new, True, tuple(effects))


def _orphaned(entry: Entry, rules: JoinRules, why: str) -> tuple[Effect, ...]:
    outcome = entry.outcome
    assert outcome is not None  # noqa: S101 - callers only pass entries holding an outcome
    route = entry.route or NO_ROUTE
    effects: list[Effect] = [
        # per outcome offset: an outcome that comes after its request's first orphan (e.g. after an
        # eviction) is another outcome and counts too
        Count(route, entry.request_id, "orphan", f"orphan:{outcome.offset}"),
        DropOutcome(entry.request_id, entry.partition, outcome, "orphan",
                    f"orphan outcome for request {entry.request_id!r}: {why} (join TTL {rules.ttl_s:g} s)"),
    ]
    effects.extend(Count(route, entry.request_id, "duplicate", f"dup:{offset}") for offset in entry.early_duplicates)
    return tuple(effects)


def reward_deadline(entry: Entry, rules: JoinRules) -> float | None:
    """When the route's default reward applies to this entry, or None if it never will."""
    if entry.outcome is not None or entry.primary is None or entry.ts_predicted is None or entry.reward_state != "open":
        return None  # checked before the route lookup: most entries written have an outcome
    wait_s = rules.route(entry.route).reward_wait_s
    return None if wait_s is None else entry.ts_predicted + wait_s


def due_at(entry: Entry, rules: JoinRules) -> float:
    """Next wall-clock time (epoch seconds) at which :func:`on_due` may change the entry."""
    expiry = entry.anchor_ts + rules.ttl_s
    deadline = reward_deadline(entry, rules)
    return expiry if deadline is None else min(expiry, deadline)


LANE_SETTLED = 0
"""Eviction lanes, evicted in this order (oldest first within each): entries that only recognise
duplicates and late shadows (joined, defaulted) ..."""
LANE_WAITING = 1
"""... then entries waiting for their partner with nothing else to come: a prediction on a route
without a default reward, an outcome before its prediction, shadows before their primary ..."""
LANE_DEADLINE = 2
"""... then predictions whose route's default reward is still to come (earliest deadline first)."""
LANES = 3


def lane_of(entry: Entry, rules: JoinRules) -> int:
    """The eviction lane of an entry (see LANE_SETTLED)."""
    return schedule_of(entry, rules)[1]


def schedule_of(entry: Entry, rules: JoinRules) -> tuple[float, int]:
    """(:func:`due_at`, :func:`lane_of`) of an entry in one step (the table schedules every
    entry it writes: :func:`reward_deadline` is inlined). In a lane every entry's due time is its
    age plus a constant (the TTL, or the route's wait): due order is age order in the first two
    lanes and deadline order in the third."""
    expiry = entry.anchor_ts + rules.ttl_s
    if entry.primary is None:
        return expiry, LANE_WAITING
    if entry.outcome is not None or entry.reward_state != "open":
        return expiry, LANE_SETTLED
    wait_s = rules.route(entry.route).reward_wait_s
    if wait_s is None or entry.ts_predicted is None:
        return expiry, LANE_WAITING
    return min(expiry, entry.ts_predicted + wait_s), LANE_DEADLINE


def on_evict(entry: Entry, now: float, rules: JoinRules) -> Step:
    """Delete `entry` now because the table is over its budget: what its expiry would count, now
    (an orphan outcome, an unanswered prediction, or the route's default reward for a prediction
    still waiting for it), plus one ``evicted`` Count (token ``evicted:<reason>:<offset>``). The entry's
    late outcome, if one comes, finds no prediction and ends as an orphan (counted,
    dead-lettered): nothing is dropped silently."""
    route = entry.route or NO_ROUTE
    request_id = entry.request_id
    primary = entry.primary
    outcome = entry.outcome
    effects: list[Effect] = []
    if primary is None:
        if outcome is not None:
            reason = "orphan"
            effects.extend(_orphaned(entry, rules, "evicted before its prediction came: the join table was over "
                                                   "its budget (feedback.join_max_bytes / join_max_entries)"))
        else:
            reason = "shadow"
    elif entry.outcome is None and entry.reward_state == "open":
        route_rules = rules.route(entry.route)
        if route_rules.default_reward is not None and route_rules.reward_wait_s is not None:
            reason = "default"
            effects.append(Count(route, request_id, "default", "decision", primary.arm))
            effects.append(Reward(route, request_id, primary, float(route_rules.default_reward), True, now))
        else:
            reason = "unanswered"
            effects.append(Count(route, request_id, "unanswered", "unanswered", primary.arm))
    else:
        reason = "settled"
    # the token names the event the entry began with, so a request evicted twice (its outcome
    # came after its prediction was evicted) counts twice, and a replay of one eviction once
    offset = (primary.offset if primary is not None else outcome.offset if outcome is not None
              else entry.shadows[0].offset if entry.shadows else 0)
    effects.append(Count(route, request_id, "evicted", f"evicted:{reason}:{offset}",
                         None if primary is None else primary.arm))
    return Step(None, True, tuple(effects))


def on_due(entry: Entry, now: float, rules: JoinRules) -> Step:
    """Timer check at wall-clock `now`: apply a due default reward, expire an old entry."""
    effects: list[Effect] = []
    changed = False
    deadline = reward_deadline(entry, rules)
    route = rules.route(entry.route)
    if deadline is not None and now >= deadline and entry.primary is not None and route.default_reward is not None:
        name = entry.route or NO_ROUTE
        effects.append(Count(name, entry.request_id, "default", "decision", entry.primary.arm))
        effects.append(Reward(name, entry.request_id, entry.primary, float(route.default_reward), True, deadline))
        entry = _evolve(entry, reward_state="defaulted")
        changed = True
    if now >= entry.anchor_ts + rules.ttl_s:
        if entry.primary is None and entry.outcome is not None:
            effects.extend(_orphaned(entry, rules, "no prediction arrived in time"))
        elif entry.primary is not None and entry.outcome is None and entry.reward_state == "open":
            effects.append(Count(entry.route or NO_ROUTE, entry.request_id, "unanswered", "unanswered",
                                 entry.primary.arm))
        return Step(None, True, tuple(effects))
    return Step(entry, changed, tuple(effects))


# ---------------------------------------------------------------------------------------------
# storage encoding (compact JSON lists: the table holds one per request for up to ttl_s)

_STATES: tuple[RewardState, ...] = ("open", "joined", "defaulted")


def _served_row(served: Served) -> list[JSONValue]:
    view = served.view
    row: list[JSONValue] = [served.arm, served.model, served.model_version, view.score, view.predicted, view.predicted_name,
           served.offset]
    if served.impression is not None:
        row.append(served.impression.to_row())
    return row


def _served(row: list[JSONValue], shadow: bool) -> Served:
    return Served(arm=row[0], model=row[1], model_version=row[2],
                  view=PredictionView(score=row[3], predicted=row[4], predicted_name=row[5]),
                  offset=row[6], shadow=shadow, impression=Impression.from_row(row[7]) if len(row) > 7 else None)


def _seen_row(outcome: Seen) -> list[JSONValue]:
    row: list[JSONValue] = [outcome.reward, outcome.label, outcome.ts, outcome.offset]
    if outcome.clicks is not None:
        row.append(list(outcome.clicks))
    return row


def _seen(row: list[JSONValue]) -> Seen:
    return Seen(row[0], row[1], row[2], row[3], tuple(row[4]) if len(row) > 4 else None)


_STATE_NUMBERS = {state: number for number, state in enumerate(_STATES)}
_dumps = orjson.dumps


ENTRY_FORMAT = 2
"""Version of the stored entry layout, the first element of every record `encode_entry` writes
(as ``"v2"``). Format 1, written before records carried a version, is the same list without it
(its first element is the partition, a number): `decode_entry` reads both, so the changelog and
the RocksDB store of a worker upgraded in place still recover. A change of the layout bumps the
version and keeps a decoder for the one before (docs/feedback.md, "Changelog entry format")."""
_ENTRY_TAG = f"v{ENTRY_FORMAT}"


def encode_entry(entry: Entry) -> bytes:
    """Serialize an entry for the table (the request_id is the table key, not repeated):
    ``["v2", partition, route, primary, ts_predicted, shadows, outcome, reward state, scored,
    anchor_ts, early duplicates]``, and the primary prediction's traceparent last when it had one."""
    outcome = entry.outcome
    primary = entry.primary
    shadows = entry.shadows
    scored = entry.scored
    # tuples and lists serialize alike (JSON arrays); the trace is a last item only when there is one
    row: tuple[JSONValue, ...] = (
        _ENTRY_TAG, entry.partition, entry.route,
        None if primary is None else _served_row(primary), entry.ts_predicted,
        [_served_row(s) for s in shadows] if shadows else (),
        None if outcome is None else _seen_row(outcome),
        _STATE_NUMBERS[entry.reward_state], sorted(scored) if scored else (), entry.anchor_ts,
        entry.early_duplicates,
    )
    if entry.trace is not None:
        row += (entry.trace,)
    return _dumps(row)


def decode_entry(request_id: str, raw: bytes) -> Entry:
    """Inverse of encode_entry, for this format and format 1 (no version: the same fields).
    Raises ValueError on bytes it did not write, or written in a format it does not know."""
    try:
        record = orjson.loads(raw)
        version = record[0] if record.__class__ is list and record else None
        trace = None
        if version == _ENTRY_TAG:
            if len(record) == 12:  # the primary prediction's traceparent, when it had one
                # validated here, as every trace context is where it is read: an invalid one (a
                # record written by something else, a corrupted store) is dropped, not an error,
                # so it never reaches the worker's dead letters' headers or the tracing SDK
                trace = parse_traceparent(record.pop())
            (_, partition, route, primary, ts_predicted, shadows, outcome, state, scored, anchor_ts,
             early) = record
        elif version.__class__ is str:
            raise ValueError(f"format {version!r} is not one this worker reads (it reads {_ENTRY_TAG!r} and 1): "
                             f"was it written by a newer version?")
        else:  # format 1, before records carried a version
            (partition, route, primary, ts_predicted, shadows, outcome, state, scored, anchor_ts, early) = record
        return Entry(request_id=request_id, partition=partition, route=route,
                     primary=None if primary is None else _served(primary, False), ts_predicted=ts_predicted,
                     shadows=tuple(_served(s, True) for s in shadows),
                     outcome=None if outcome is None else _seen(outcome),
                     reward_state=_STATES[state], scored=frozenset(scored), anchor_ts=anchor_ts,
                     early_duplicates=tuple(early), trace=trace)
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"join entry for {request_id!r} is not in the expected format: {exc}") from None


def entry_partition_and_due(raw: bytes, rules: JoinRules, request_id: str = "") -> tuple[int, float]:
    """Partition and due time of a stored entry (used to rebuild the timer index after recovery)."""
    entry = decode_entry(request_id, raw)
    return entry.partition, due_at(entry, rules)


# ---------------------------------------------------------------------------------------------
# timer index


class DueIndex:
    """Which keys (request ids) fall due when, in buckets of `resolution_s`, in `lanes` eviction lanes, with a
    size per key: adding, moving and popping a key is O(1) (plus a heap of bucket numbers per
    lane), so a sweep costs what falls due, not the table size, and so does an eviction. Each key
    is in exactly one bucket of one lane; `bytes` is the sum of the keys' sizes."""

    def __init__(self, resolution_s: float = 1.0, lanes: int = 1) -> None:
        if not resolution_s > 0:
            raise ValueError(f"resolution_s must be > 0, got {resolution_s!r}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes!r}")
        self._resolution_s = resolution_s
        self._lanes = lanes
        self._slot_of: dict[str, int] = {}
        """key -> slot (bucket number * lanes + lane)"""
        self._slots: dict[int, dict[str, int]] = {}
        """slot -> {key: size}"""
        self._heaps: list[list[int]] = [[] for _ in range(lanes)]  # slots per lane; may hold emptied ones
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def set(self, key: str, due: float, lane: int = 0, size: int = 0) -> None:
        """Schedule `key` at `due` in `lane` with `size` (replacing any earlier schedule)."""
        slot = int(due // self._resolution_s) * self._lanes + lane
        slot_of = self._slot_of
        old = slot_of.get(key)
        if old is not None:
            if old == slot:
                members = self._slots[slot]
                self.bytes += size - members[key]
                members[key] = size
                return
            self._discard_from(old, key)
        slot_of[key] = slot
        members = self._slots.get(slot)  # type: ignore[assignment]
        if members is None:
            members = self._slots[slot] = {}
            heapq.heappush(self._heaps[lane], slot)
        members[key] = size
        self.bytes += size

    def discard(self, key: str) -> None:
        """Forget `key` (no error if unknown)."""
        old = self._slot_of.pop(key, None)
        if old is not None:
            self._discard_from(old, key)

    def _discard_from(self, slot: int, key: str) -> None:
        members = self._slots.get(slot)
        if members is not None:
            self.bytes -= members.pop(key, 0)
            if not members:
                del self._slots[slot]

    def has_due(self, now: float) -> bool:
        """Whether :meth:`pop_due` at `now` may return keys (O(lanes); True may also mean a bucket
        emptied since, which the next pop_due discards)."""
        newest = (int(now // self._resolution_s) - 1) * self._lanes
        return any(heap and heap[0] - lane <= newest for lane, heap in enumerate(self._heaps))

    def pop_due(self, now: float, limit: int | None = None) -> list[str]:
        """Remove and return keys whose bucket ended at or before `now`, oldest bucket first,
        at most `limit` of them."""
        newest = (int(now // self._resolution_s) - 1) * self._lanes
        out: list[tuple[str, int]] = []
        heaps = self._heaps
        while limit is None or len(out) < limit:
            best = -1
            for lane, heap in enumerate(heaps):
                if heap and heap[0] - lane <= newest and (best < 0 or heap[0] - lane < heaps[best][0] - best):
                    best = lane
            if best < 0:
                break
            self._pop_slot(heaps[best], out, None if limit is None else limit - len(out))
        return [key for key, _size in out]

    def pop_evict(self, max_entries: int | None, max_bytes: int | None, limit: int) -> list[tuple[str, int]]:
        """Remove and return (key, size) in eviction order — lane 0 oldest bucket first, then
        lane 1, ... — until at most `max_entries` keys and `max_bytes` bytes are left (None: no
        cap), at most `limit` of them."""
        out: list[tuple[str, int]] = []
        for heap in self._heaps:
            while heap and len(out) < limit and self.over(max_entries, max_bytes):
                self._pop_slot(heap, out, 1)
        return out

    def over(self, max_entries: int | None, max_bytes: int | None) -> bool:
        """Whether the keys exceed `max_entries` or their sizes `max_bytes` (None: no cap)."""
        return ((max_entries is not None and len(self._slot_of) > max_entries)
                or (max_bytes is not None and self.bytes > max_bytes))

    def _pop_slot(self, heap: list[int], out: list[tuple[str, int]], limit: int | None) -> None:
        """Move up to `limit` keys of the heap's first slot to `out` (dropping it when emptied)."""
        slot = heap[0]
        members = self._slots.get(slot)
        slot_of = self._slot_of
        taken = 0
        while members and (limit is None or taken < limit):
            key, size = members.popitem()
            del slot_of[key]
            self.bytes -= size
            out.append((key, size))
            taken += 1
        if not members:
            self._slots.pop(slot, None)
            heapq.heappop(heap)

    def pop_all(self) -> list[str]:
        """Remove and return every key."""
        keys = list(self._slot_of)
        self.clear()
        return keys

    def clear(self) -> None:
        self._slot_of.clear()
        self._slots.clear()
        for heap in self._heaps:
            heap.clear()
        self.bytes = 0
