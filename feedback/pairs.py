"""Interleaving in the feedback worker (pure): score an impression's clicks per pair of rankers,
the Redis fields that adds, and the verdicts read back from the summed fields.

An interleave route's prediction logs the shown list (`outputs.items`), the ranker ("team") that
contributed each position (`outputs.teams`) and every ranker's own top-k (`outputs.rankings`,
whose keys name all rankers, including one that got no position in this list). Its outcome
carries `clicks`: item ids in click order. The rule is router.interleave's: a click on a shown
item credits the team of its position, each item once; clicks on items that were not shown are
counted apart; for every pair of rankers the one whose team got more clicks wins the impression,
and equal clicks (no clicks included) are a tie. It is implemented here on Python values, not
numpy arrays, because it runs once per outcome inside the join (a handful of items); a property
test checks it against `credit_clicks` / `pairwise_outcome`.

Pairs are named in sorted order of arm names, ``a|b`` with a < b, so every worker writes the same
fields whatever order the rankers come in; ``a|b|win`` counts impressions a won against b.

>>> shown = Impression(items=("x", "y", "z"), teams=("a", "b", "a"), arms=("a", "b", "c"))
>>> score = score_impression(shown, ["z", "y", "x", "nope", "z"])
>>> dict(score.credits), score.unshown_clicks
({'a': 2, 'b': 1, 'c': 0}, 1)
>>> sorted(k for k in pair_fields(score) if k.count("|") == 2)
['a|b|win', 'a|c|win', 'b|c|win']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from banditgate.events import MAX_CLICKS, MAX_ID_CHARS, MAX_RANKERS, EventError, is_name
from banditgate.jsontypes import JSONValue
from router.interleave import clicked_positions
from router.preference import ArmVerdict, PreferenceTest

__all__ = [
    "Impression",
    "ImpressionScore",
    "PairCounts",
    "PairTable",
    "Pairs",
    "RouteVerdicts",
    "impression_from_outputs",
    "pair_fields",
    "pairs_effect",
    "parse_pairs",
    "route_verdicts",
    "score_impression",
]

RESULTS = ("win", "loss", "tie")
"""Per pair a|b, from a's side."""
_RESULT_OF = {1: "win", -1: "loss", 0: "tie"}


@dataclass(frozen=True, slots=True)
class Impression:
    """One interleaved list as shown: item ids, the arm that contributed each position, and
    every ranker of the route (sorted by name)."""

    items: tuple[str, ...]
    teams: tuple[str, ...]
    arms: tuple[str, ...]

    def to_row(self) -> list[list[str]]:
        return [list(self.items), list(self.teams), list(self.arms)]

    @classmethod
    def from_row(cls, row: Sequence[JSONValue]) -> Impression:
        """Inverse of `to_row`. Raises ValueError on a row it did not write."""
        if len(row) != 3:
            raise ValueError(f"an impression row has 3 parts, got {len(row)}")
        return cls(tuple(row[0]), tuple(row[1]), tuple(row[2]))


MAX_IMPRESSION_ITEMS = MAX_CLICKS
"""Most items one impression may list (a route's `k` is at most 1000 too)."""


def impression_from_outputs(outputs: Mapping[str, JSONValue]) -> Impression | None:
    """The impression an interleave prediction's `outputs` describe, or None when they do not
    describe one (not an interleave route, or malformed: then its clicks cannot be credited).

    Raises EventError for what a hostile predictions topic could use against the worker (both
    decoders call this, so the fast and the full path refuse alike): a ranker name that is not a
    name (``bad_id``: a '|' broke the pair fields' parsing), more than MAX_RANKERS rankers (each
    click adds a counter per two of them, in one Lua item), more than MAX_IMPRESSION_ITEMS items or
    an item id over MAX_ID_CHARS (``out_of_range``: the join entry keeps them all)."""
    items, teams, rankings = outputs.get("items"), outputs.get("teams"), outputs.get("rankings")
    if isinstance(rankings, Mapping):
        if len(rankings) > MAX_RANKERS:
            raise EventError("out_of_range", f"an interleave prediction names {len(rankings)} rankers; at most "
                                             f"{MAX_RANKERS}")
        for name in rankings:
            if not is_name(name):
                raise EventError("bad_id", f"an interleave prediction's ranker {str(name)[:64]!r} is not a name "
                                           "(letters, digits, '_', '.', '-'; at most 128 characters)")
    if type(items) is list:
        if len(items) > MAX_IMPRESSION_ITEMS:
            raise EventError("out_of_range", f"an interleave prediction lists {len(items)} items; at most "
                                             f"{MAX_IMPRESSION_ITEMS}")
        for item in items:
            if type(item) is str and len(item) > MAX_ID_CHARS:
                raise EventError("out_of_range", f"an interleave prediction's item id has {len(item)} characters; "
                                                 f"at most {MAX_ID_CHARS}")
    if type(items) is not list or type(teams) is not list or len(items) != len(teams):
        return None
    if not isinstance(rankings, Mapping):
        return None
    if not all(type(i) is str for i in items) or not all(type(t) is str for t in teams):
        return None
    arms = set(rankings)
    if not all(type(a) is str for a in arms) or not set(teams) <= arms or len(arms) < 2:
        return None
    return Impression(tuple(items), tuple(teams), tuple(sorted(arms)))


@dataclass(frozen=True, slots=True)
class ImpressionScore:
    """Clicks credited per arm (every ranker of the impression, zeros included) and the clicks
    that named items not shown."""

    credits: Mapping[str, int]
    unshown_clicks: int

    def outcome(self, a: str, b: str) -> int:
        """+1 when a's team got more clicks than b's, -1 when fewer, 0 for a tie."""
        difference = self.credits[a] - self.credits[b]
        return (difference > 0) - (difference < 0)


def score_impression(impression: Impression, clicks: Sequence[str]) -> ImpressionScore:
    """Credit each distinct clicked, shown item to its position's team (router.interleave's rule)."""
    credits = dict.fromkeys(impression.arms, 0)
    for position in clicked_positions(impression.items, clicks):
        credits[impression.teams[position]] += 1
    shown = set(impression.items)
    return ImpressionScore(credits, sum(1 for item in clicks if item not in shown))


def pair_fields(score: ImpressionScore) -> dict[str, float]:
    """What one scored impression adds to the route's pair hash: per pair ``a|b|win`` /
    ``a|b|loss`` / ``a|b|tie`` (a < b), ``<arm>|clicks`` (credited clicks, when any),
    ``impressions`` and ``clicks_unshown`` (when any)."""
    fields: dict[str, float] = {"impressions": 1.0}
    for a, b in combinations(sorted(score.credits), 2):
        fields[f"{a}|{b}|{_RESULT_OF[score.outcome(a, b)]}"] = 1.0
    for arm, clicks in score.credits.items():
        if clicks:
            fields[f"{arm}|clicks"] = float(clicks)
    if score.unshown_clicks:
        fields["clicks_unshown"] = float(score.unshown_clicks)
    return fields


@dataclass(frozen=True, slots=True)
class Pairs:
    """Join effect: add one impression's pair results to the route's pair counts, once per
    request (ledger token ``pairs``)."""

    route: str
    request_id: str
    fields: Mapping[str, float]
    ts: float
    token: str = "pairs"  # noqa: S105 - the kind of event, not a secret


def pairs_effect(route: str, request_id: str, impression: Impression, clicks: Sequence[str], ts: float) -> Pairs:
    """The effect of an outcome's clicks on its interleaved impression."""
    return Pairs(route, request_id, pair_fields(score_impression(impression, clicks)), ts)


# ---------------------------------------------------------------------------------------------
# reading the sums back


@dataclass(frozen=True, slots=True)
class PairCounts:
    """Impressions arm_a won, lost and tied against arm_b."""

    wins: int = 0
    losses: int = 0
    ties: int = 0


@dataclass(frozen=True)
class PairTable:
    """A route's summed pair hash."""

    pairs: Mapping[tuple[str, str], PairCounts] = field(default_factory=dict)
    clicks: Mapping[str, int] = field(default_factory=dict)
    impressions: int = 0
    clicks_unshown: int = 0

    def counts(self, a: str, b: str) -> PairCounts:
        """Counts from a's side, whichever order the hash keeps the pair in."""
        if (a, b) in self.pairs:
            return self.pairs[(a, b)]
        swapped = self.pairs.get((b, a), PairCounts())
        return PairCounts(wins=swapped.losses, losses=swapped.wins, ties=swapped.ties)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def parse_pairs(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> PairTable:
    """A pair hash (as HGETALL returns it, bytes or str) -> PairTable; unknown fields are ignored."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    clicks: dict[str, int] = {}
    impressions = unshown = 0
    for name, value in raw.items():
        parts = _text(name).split("|")
        amount = round(float(_text(value)))
        if len(parts) == 3 and parts[2] in RESULTS:
            counts.setdefault((parts[0], parts[1]), {})[parts[2]] = amount
        elif len(parts) == 2 and parts[1] == "clicks":
            clicks[parts[0]] = amount
        elif parts == ["impressions"]:
            impressions = amount
        elif parts == ["clicks_unshown"]:
            unshown = amount
    pairs = {pair: PairCounts(v.get("win", 0), v.get("loss", 0), v.get("tie", 0)) for pair, v in counts.items()}
    return PairTable(pairs, clicks, impressions, unshown)


@dataclass(frozen=True)
class RouteVerdicts:
    """The sequential test over a route's rankers.

    `pairs` maps (a, b), a < b, to (counts, ln M, decision: +1 a preferred, -1 b preferred, 0);
    `threshold` is the ln M each pair must reach (ln(n_pairs / alpha), Bonferroni over the pairs);
    `arms` maps each arm to promote / reject / undecided."""

    pairs: Mapping[tuple[str, str], tuple[PairCounts, float, int]]
    threshold: float
    arms: Mapping[str, ArmVerdict]


def route_verdicts(arms: Iterable[str], table: PairTable, test: PreferenceTest) -> RouteVerdicts:
    """Test every pair of `arms` (at least two) on the table's counts: each pair at alpha divided
    by the number of pairs, so all verdicts hold together at `test.confidence`
    (`PreferenceTest.arm_verdicts`). Raises ValueError with fewer than two arms."""
    names = sorted(set(arms))
    if len(names) < 2:
        raise ValueError(f"interleaving needs at least two arms, got {names}")
    index = {arm: i for i, arm in enumerate(names)}
    wins = np.zeros((len(names), len(names)), dtype=np.int64)
    pair_counts = {}
    for a, b in combinations(names, 2):
        counts = table.counts(a, b)
        wins[index[a], index[b]] = counts.wins
        wins[index[b], index[a]] = counts.losses
        pair_counts[(a, b)] = counts
    n_pairs = len(pair_counts)
    pair_test = PreferenceTest(confidence=1 - (1 - test.confidence) / n_pairs, prior_strength=test.prior_strength)
    pairs = {}
    for (a, b), counts in pair_counts.items():
        evidence = float(pair_test.log_evidence(counts.wins, counts.losses))
        pairs[(a, b)] = (counts, evidence, int(pair_test.decide(counts.wins, counts.losses)))
    verdicts = test.arm_verdicts(wins)
    return RouteVerdicts(pairs, pair_test.threshold, dict(zip(names, verdicts)))
