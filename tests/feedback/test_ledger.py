"""The feedback ledger without Redis (feedback/ledger.py): the wire constants are the script's,
and the planner's chunks, read the way the Lua script reads them (a small Python model of its
step 3 for items seen for the first time), add exactly the sums each effect stands for, where
the key naming says, with one item per effect in order and one route per chunk."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import orjson
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback import ledger
from feedback.join import Count, DropOutcome, Effect, Label, Reward, Seen, Served
from feedback.ledger import ARM_UPDATE, FIRST_GROUP, LEDGER_LUA, FeedbackKeys, LedgerChunk, LedgerPlanner
from feedback.outcome_metrics import PredictionView, bucket_seconds, labelled_fields, rewarded_fields, shadow_fields
from feedback.pairs import Pairs
from router.stats_store import ArmStatsStore

WINDOW_S = 600.0
KEYS = FeedbackKeys("p")
STORE = ArmStatsStore(aredis.Redis(), prefix="p")  # never connected: planning is pure CPU


def test_the_script_defines_each_wire_constant_with_the_python_value() -> None:
    for name in ("ARM_UPDATE", "FIRST_GROUP", "MAX_INCREMENT"):
        found = re.search(rf"^local {name} = (\S+)$", LEDGER_LUA, re.MULTILINE)
        assert found is not None, name
        assert float(found.group(1)) == float(getattr(ledger, name)), name
    assert re.search(rf"^local APPLIED, NOT_APPLIED = '{ledger.APPLIED}', '{ledger.NOT_APPLIED}'$", LEDGER_LUA, re.MULTILINE)
    # the script reads the positions through the names, not as numbers of its own
    assert "n == ARM_UPDATE" in LEDGER_LUA and "group[1] == ARM_UPDATE" in LEDGER_LUA
    assert LEDGER_LUA.count("for g = FIRST_GROUP, #item do") == 2


def _read(chunk: LedgerChunk) -> tuple[list[tuple[str, str, dict[tuple[str, str], float], tuple[str, str, float] | None]],
                                       dict[str, int], list[Any]]:
    """`chunk` as the script reads it: per item (seen key, token, sums by (key, field), arm
    update as (arm seen key, arm, reward)), the expiries by key, and the arm spec."""
    names, rows, expires, arm_spec = orjson.loads(chunk.payload())
    keys = [k.decode() if isinstance(k, bytes) else k for k in chunk.keys]
    items = []
    for row in rows:
        sums: dict[tuple[str, str], float] = defaultdict(float)
        arm = None
        for group in row[FIRST_GROUP - 1:]:
            if group[0] == ARM_UPDATE:
                assert arm is None and len(group) == 4
                arm = (keys[group[1] - 1], group[2], group[3])
                continue
            n = group[0]
            assert n >= 1 and (len(group) - 1 - n) % 2 == 0
            targets = [keys[t - 1] for t in group[1:n + 1]]
            for j in range(n + 1, len(group), 2):
                for target in targets:
                    sums[(target, names[group[j] - 1])] += group[j + 1]
        items.append((keys[row[0] - 1], row[1], dict(sums), arm))
    return items, {keys[k - 1]: ttl for k, ttl in expires}, arm_spec


def _expected(effect: Effect) -> tuple[str, dict[tuple[str, str], float], tuple[str, str, float] | None]:
    """What one effect adds, written out from the key naming and the quality sums."""
    assert not isinstance(effect, DropOutcome)
    route = effect.route
    if isinstance(effect, Count):
        sums = {(KEYS.counts(route), effect.kind): 1.0}
        if effect.arm is not None:
            sums[(KEYS.counts(route), f"{effect.kind}|{effect.arm}")] = 1.0
        return effect.token, sums, None
    if isinstance(effect, Pairs):
        return effect.token, {(KEYS.pairs(route), name): amount for name, amount in effect.fields.items()}, None
    served = effect.served
    if isinstance(effect, Reward):
        fields = rewarded_fields(effect.reward)
        arm = (STORE.seen_key(route, effect.request_id), served.arm, effect.reward)
    else:
        fields = labelled_fields(served.view, effect.label)
        if served.shadow:
            fields.update(shadow_fields(served.view, None if effect.primary is None else effect.primary.view,
                                        effect.label))
        arm = None
    prefix = f"{served.role}|{served.arm}|{served.model}|{served.model_version}"
    bucket = KEYS.quality_bucket(route, int(effect.ts // bucket_seconds(WINDOW_S)))
    sums = {}
    for name, value in fields.items():
        sums[(KEYS.quality(route), f"{prefix}|{name}")] = value
        sums[(bucket, f"{prefix}|{name}")] = value
    return effect.token, sums, arm


names = st.sampled_from(["a", "b", "c"])
routes = st.sampled_from(["churn", "fraud"])
request_ids = st.sampled_from([f"r{i}" for i in range(6)])
views = st.builds(PredictionView, st.sampled_from([None, 0.1, 0.7, 1.0]), st.sampled_from([None, 0, 1]))
served = st.builds(Served, names, st.sampled_from(["m", "n"]), st.integers(1, 3), views, offset=st.integers(0, 9),
                   shadow=st.booleans())
times = st.floats(1_700_000_000.0, 1_700_003_000.0)
effects = st.one_of(
    st.builds(Count, routes, request_ids, st.sampled_from(["joined", "late", "default"]), st.sampled_from(["decision", "dup:3"]),
              st.one_of(st.none(), names)),
    st.builds(Reward, routes, request_ids, served, st.floats(-1e6, 1e6), st.booleans(), times),
    st.builds(Label, routes, request_ids, served, st.sampled_from([0, 1, 2.5]), times, st.one_of(st.none(), served)),
    st.builds(Pairs, routes, request_ids, st.dictionaries(st.sampled_from(["a|b|win", "a|b|loss", "a|clicks", "impressions"]),
                                                          st.floats(0, 5), min_size=1), times),
    st.builds(DropOutcome, request_ids, st.integers(0, 3), st.builds(Seen, st.just(1.0), st.just(0.0)),
              st.just("bad_id"), st.just("x")),
)


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(effects, max_size=40), chunk_items=st.integers(1, 7), with_arms=st.booleans())
def test_the_chunks_add_exactly_what_each_effect_stands_for(batch: list[Effect], chunk_items: int,
                                                            with_arms: bool) -> None:
    planner = LedgerPlanner(KEYS, WINDOW_S, chunk_items=chunk_items)
    chunks = planner.plan(batch, STORE if with_arms else None, [])
    for route in ("churn", "fraud"):  # each route's effects in order, dead letters left out
        kept = [e for e in batch if not isinstance(e, DropOutcome) and e.route == route]
        assert [m for chunk in chunks if chunk.route == route for m in chunk.members] == kept
    for chunk in chunks:
        assert 1 <= len(chunk.rows) <= chunk_items and len(chunk.rows) == len(chunk.members)
        assert all(not isinstance(m, DropOutcome) and m.route == chunk.route for m in chunk.members)
        items, expires, arm_spec = _read(chunk)
        for member, (seen, token, sums, arm) in zip(chunk.members, items):
            want_token, want_sums, want_arm = _expected(member)
            assert seen == KEYS.seen(chunk.route, member.request_id)
            assert token == want_token
            assert sums == want_sums
            assert arm == (want_arm if with_arms else None)
        for key in expires:
            assert key.startswith(KEYS.quality(chunk.route) + ":")  # only time buckets expire
        has_arm = any(arm is not None for *_, arm in items)
        assert bool(arm_spec) == has_arm
        if has_arm:
            assert arm_spec[1:] == [STORE.half_life(chunk.route), STORE.dedup_ttl_s]
            assert chunk.keys[arm_spec[0] - 1] == STORE.stats_key(chunk.route)


def test_a_count_group_is_shared_by_the_items_of_a_chunk() -> None:
    planner = LedgerPlanner(KEYS, WINDOW_S)
    [chunk] = planner.plan([Count("churn", "r1", "joined", "decision", "a"), Count("churn", "r2", "joined", "decision", "a")])
    assert chunk.rows[0][FIRST_GROUP - 1] is chunk.rows[1][FIRST_GROUP - 1]
    assert chunk.names == ["joined", "joined|a"]
