"""The rollout state machine: allowed edges, caps before `full`, criteria, manual overrides, audit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.config import ConfigError, Rollout, parse_config
from router.arm_stats import ArmStats
from router.rollout import (EDGES, FINAL_STAGES, Evidence, RolloutError, RolloutState, assess, manual, may_start,
                            operational_breach, reward_test, routing_plan, start, status, step)

CONFIG = Rollout(canary={"max_share": 0.1, "min_outcomes": 50, "min_calls": 20, "max_p99_latency_ms": 250},
                 shadow={"min_outcomes": 30}, grace_s=100)


def _stats(rewards: np.ndarray) -> ArmStats:
    n = float(len(rewards))
    mean = float(rewards.mean()) if n else 0.0
    return ArmStats(n, mean, float(((rewards - mean) ** 2).sum()) if n else 0.0)


def test_happy_path_shadow_canary_full_done() -> None:
    state = start("r", "m", 2, replaces="a", now=0.0)
    assert step(state, Evidence(shadow_decision="promote", shadow_pairs=10), CONFIG, 1.0) is None  # too few pairs
    t = step(state, Evidence(shadow_decision="promote", shadow_pairs=40), CONFIG, 1.0)
    assert t is not None and t.state.stage == "canary" and t.audit.alert_kind == "promote"
    assert t.audit.before["shadows"] == ["m-v2"] and t.audit.after["caps"] == {"m-v2": 0.1}
    canary = t.state
    good = Evidence(candidate=ArmStats(2000, 0.40, 2000 * 0.24), baseline=ArmStats(18000, 0.30, 18000 * 0.21),
                    calls=2000, errors=1, p99_latency_ms=100)
    t = step(canary, good, CONFIG, 50.0)
    assert t is not None and t.state.stage == "full" and t.audit.actor == "rule:canary-criteria"
    assert t.audit.after["drained"] == ["a"] and t.state.seq == 2
    assert step(t.state, good, CONFIG, 100.0) is None  # grace period not over
    t = step(t.state, good, CONFIG, 151.0)
    assert t is not None and t.state.stage == "done" and t.audit.after["unloaded"] == ["a"]
    assert step(t.state, good, CONFIG, 1e9) is None


def test_reject_at_shadow_and_rollback_on_breaches() -> None:
    state = start("r", "m", 2, replaces="a", now=0.0)
    t = step(state, Evidence(shadow_decision="reject", shadow_pairs=5), CONFIG, 1.0)
    assert t is not None and t.state.stage == "rejected" and t.audit.alert_kind == "reject"
    assert t.audit.after["unloaded"] == ["m-v2"]
    canary = manual(state, "promote", "ops", 2.0, CONFIG).state
    slow = Evidence(candidate=ArmStats(2000, 0.40, 480), baseline=ArmStats(2000, 0.30, 420), calls=500,
                    p99_latency_ms=400)
    t = step(canary, slow, CONFIG, 3.0)
    assert t is not None and t.state.stage == "rolled_back" and t.audit.actor == "rule:latency-error"
    failing = Evidence(calls=100, errors=10)
    assert step(canary, failing, CONFIG, 3.0).state.stage == "rolled_back"
    assert step(canary, Evidence(guardrail_breach="reward"), CONFIG, 3.0).audit.actor == "rule:guardrail"
    worse = Evidence(candidate=ArmStats(3000, 0.20, 480), baseline=ArmStats(30000, 0.30, 6300), calls=3000)
    t = step(canary, worse, CONFIG, 3.0)
    assert t is not None and t.state.stage == "rolled_back" and t.audit.actor == "rule:reward-test"


def test_pause_holds_promotion_not_rollback_and_manual_override() -> None:
    state = start("r", "m", 2, replaces="a", now=0.0)
    paused = manual(state, "pause", "ops", 1.0, CONFIG)
    assert paused.state.paused and paused.state.stage == "shadow" and paused.audit.alert_kind is None
    assert step(paused.state, Evidence(shadow_decision="promote", shadow_pairs=100), CONFIG, 2.0) is None
    assert step(paused.state, Evidence(shadow_decision="reject"), CONFIG, 2.0).state.stage == "rejected"
    resumed = manual(paused.state, "resume", "ops", 3.0, CONFIG).state
    assert not resumed.paused and resumed.seq == 2
    rolled = manual(resumed, "rollback", "alice", 4.0, CONFIG, reason="pager")
    assert rolled.state.stage == "rolled_back" and rolled.audit.actor == "admin:alice" and rolled.audit.reason == "pager"
    with pytest.raises(RolloutError):
        manual(rolled.state, "promote", "alice", 5.0, CONFIG)
    with pytest.raises(RolloutError):
        manual(resumed, "explode", "alice", 5.0, CONFIG)  # type: ignore[arg-type]


def test_status_names_what_is_awaited() -> None:
    state = start("r", "m", 2, replaces="a", now=0.0)
    shown = status(state, Evidence(shadow_pairs=3), CONFIG, 10.0)
    assert shown["stage"] == "shadow" and shown["next"] == "wait"
    assert any("promote verdict" in a for a in shown["awaiting"]) and any("27 more" in a for a in shown["awaiting"])
    canary = manual(state, "promote", "ops", 1.0, CONFIG).state
    shown = status(canary, Evidence(candidate=ArmStats(10, 0.3, 2), baseline=ArmStats(100, 0.3, 21)), CONFIG, 2.0)
    assert any("40 more canary outcomes" in a for a in shown["awaiting"])


def test_state_round_trips_and_rejects_garbage() -> None:
    state = manual(start("r", "m", 7, replaces="a", now=5.0), "pause", "ops", 6.0, CONFIG).state
    assert RolloutState.from_dict(state.to_dict()) == state
    with pytest.raises(RolloutError):
        RolloutState.from_dict({**state.to_dict(), "stage": "limbo"})
    with pytest.raises(RolloutError):
        RolloutState.from_dict({"route": "r"})


def test_may_start_never_retries_a_rejected_version() -> None:
    done = RolloutState("r", "m", 3, "m-v3", "a", "rejected", 0.0, 0.0, seq=1)
    assert not may_start("m", 3, done, {"m": 3})
    assert may_start("m", 4, done, {"m": 3})
    assert not may_start("m", 5, start("r", "m", 4, "a", 0.0), {})  # one active rollout per route


def test_operational_breach_waits_for_min_calls() -> None:
    assert operational_breach(Evidence(calls=19, errors=19), CONFIG.canary) is None
    assert "error rate" in operational_breach(Evidence(calls=20, errors=1), CONFIG.canary)
    assert operational_breach(Evidence(calls=20, errors=0, p99_latency_ms=250), CONFIG.canary) is None


def test_reward_test_error_rates_under_continuous_monitoring() -> None:
    """Fixed seeds: a canary worse by 0.05 is never called not_worse (alpha 0.05; 200 paths, checked
    every 180 outcomes, we allow 5% + 3 sd of binomial noise = 0.096), a better one is called
    not_worse on nearly every path and never worse."""
    rng = np.random.default_rng(7)
    paths, n, look = 200, 18000, 180
    for candidate_rate, expect in ((0.25, "worse"), (0.35, "not_worse")):
        cand = rng.random((paths, n // 9)) < candidate_rate
        base = rng.random((paths, n)) < 0.30
        first: list[str] = []
        for p in range(paths):
            verdict = "undecided"
            for k in range(look, n + 1, look):
                kc = k // 9
                test = reward_test(_stats(cand[p, :kc].astype(float)), _stats(base[p, :k].astype(float)), CONFIG.canary)
                if test.verdict != "undecided":
                    verdict = test.verdict
                    break
            first.append(verdict)
        wrong = sum(v not in (expect, "undecided") for v in first) / paths
        assert wrong <= 0.096, (candidate_rate, wrong)
        if expect == "not_worse":
            assert first.count("not_worse") / paths >= 0.8


def test_rollout_config_validation() -> None:
    base = {"name": "r", "arms": [{"name": "a", "model": "m", "version": 1}, {"name": "b", "model": "m", "version": 2}]}
    with pytest.raises(ConfigError, match="rollout.replaces is needed"):
        parse_config({"routes": [{**base, "rollout": {}}]})
    with pytest.raises(ConfigError, match="names no arm"):
        parse_config({"routes": [{**base, "rollout": {"replaces": "x"}}]})
    with pytest.raises(ConfigError, match="interleave"):
        parse_config({"routes": [{**base, "policy": "interleave", "rollout": {"replaces": "a"}}]})
    with pytest.raises(ConfigError, match="below exploration_floor"):
        parse_config({"routes": [{**base, "exploration_floor": 0.2, "rollout": {"replaces": "a", "canary": {"max_share": 0.1}}}]})
    with pytest.raises(ConfigError, match="at least one trigger"):
        parse_config({"routes": [{**base, "retrain": {"cooldown_s": 5}}]})
    route = parse_config({"routes": [{**base, "rollout": {"replaces": "b"}, "retrain": {"new_labels": 10}}]}).routes[0]
    assert route.rollout_model() == "m" and route.rollout_replaces() == "b" and route.retrain.new_labels == 10


_evidence = st.builds(
    Evidence,
    shadow_decision=st.sampled_from([None, "promote", "reject"]),
    shadow_pairs=st.floats(0, 1000),
    candidate=st.builds(ArmStats, st.floats(0, 5000), st.floats(0, 1), st.floats(0, 1000)),
    baseline=st.builds(ArmStats, st.floats(1, 50000), st.floats(0, 1), st.floats(0, 10000)),
    calls=st.integers(0, 5000), errors=st.integers(0, 50),
    p99_latency_ms=st.one_of(st.none(), st.floats(1, 1000)),
    guardrail_breach=st.sampled_from([None, None, None, "reward"]),
)
_event = st.one_of(_evidence, st.sampled_from(["promote", "rollback", "pause", "resume"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_event, st.floats(0, 500)), max_size=30))
def test_any_run_takes_only_allowed_edges_and_caps_the_candidate(events: list) -> None:
    state = start("r", "m", 2, replaces="a", now=0.0)
    now = 0.0
    for event, dt in events:
        now += dt
        if isinstance(event, str):
            if not state.active:
                with pytest.raises(RolloutError):
                    manual(state, event, "ops", now, CONFIG)
                continue
            transition = manual(state, event, "ops", now, CONFIG)
        else:
            transition = step(state, event, CONFIG, now)
            if transition is None:
                assert assess(state, event, CONFIG, now).action == "wait" or state.paused or not state.active
                continue
        old, new = state, transition.state
        assert new.seq == old.seq + 1 and transition.audit.from_seq == old.seq
        assert old.stage == new.stage or (old.stage, new.stage) in EDGES
        assert old.stage not in FINAL_STAGES
        plan = routing_plan(new, CONFIG)
        if new.stage in ("shadow", "canary", "rejected", "rolled_back"):
            assert plan.caps.get(new.candidate_arm, 0.0) <= CONFIG.canary.max_share
        if new.stage in ("rejected", "rolled_back"):
            assert new.candidate_arm in plan.unloaded and "a" not in plan.drained
        state = new
