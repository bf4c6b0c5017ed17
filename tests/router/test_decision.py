"""RoutePolicy: batch decisions, propensities, floors/caps, sticky units, shadows, admin drains."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from banditgate.config import Route
from router.arm_stats import ArmSnapshot, ArmStats, RouteSnapshot
from router.decision import RoutePolicy, RoutingError


def make_route(policy: str = "thompson", arms: int = 3, **extra) -> Route:
    arm_list = extra.pop("arm_list", None) or [{"name": f"arm{i}", "model": "m", "version": 1} for i in range(arms)]
    return Route(name="r", policy=policy, arms=arm_list, **extra)


def snapshot(**arms: tuple[float, float]) -> RouteSnapshot:
    """Arm name -> (outcomes, mean reward), Bernoulli-like m2."""
    return RouteSnapshot("r", {name: ArmSnapshot(ArmStats(weight, mean, weight * mean * (1 - mean)))
                               for name, (weight, mean) in arms.items()})


@st.composite
def routes(draw):
    arms = draw(st.integers(1, 5))
    floor = draw(st.sampled_from([0.0, 0.01, 0.05] + ([1.0 / arms] if arms > 1 else [])))
    caps = draw(st.lists(st.one_of(st.none(), st.floats(max(floor, 0.05), 1.0)), min_size=arms, max_size=arms))
    assume(sum(1.0 if c is None else c for c in caps) >= 1.0)
    arm_list = [{"name": f"arm{i}", "model": "m", "version": 1, "weight": draw(st.floats(0.1, 5.0)),
                 **({} if cap is None else {"max_share": cap})} for i, cap in enumerate(caps)]
    policy = draw(st.sampled_from(["thompson", "fixed"]))
    stats = {f"arm{i}": (draw(st.floats(0, 5000)), draw(st.floats(0, 1))) for i in range(arms)}
    return make_route(policy, exploration_floor=floor, arm_list=arm_list), stats


@settings(max_examples=80, deadline=None)
@given(routes(), st.sampled_from(["matched", "posterior"]))
def test_propensities_are_shares_that_sum_to_one_within_floor_and_caps(case, draws: str) -> None:
    route, stats = case
    policy = RoutePolicy.from_route(route, np.random.default_rng(0), draws=draws)
    policy.apply_snapshot(snapshot(**stats))
    shares = policy.shares
    assert shares.sum() == pytest.approx(1.0, abs=1e-9)
    caps = np.array([1.0 if a.max_share is None else a.max_share for a in route.arms])
    assert np.all(shares >= route.exploration_floor - 1e-9)
    assert np.all(shares <= caps + 1e-9)
    decision = policy.decide(64)
    assert decision.arm_index.dtype == np.int64 and decision.arm_index.shape == (64,)
    assert np.array_equal(decision.propensity, shares[decision.arm_index])


@pytest.mark.parametrize("draws", ["matched", "posterior"])
def test_served_frequencies_match_logged_propensities(draws: str) -> None:
    """200 000 requests: binomial sd <= 0.0011 per arm, tolerance 0.005 is > 4.5 sd."""
    policy = RoutePolicy.from_route(make_route(exploration_floor=0.02, arm_list=[
        {"name": "a", "model": "m", "version": 1}, {"name": "b", "model": "m", "version": 1},
        {"name": "c", "model": "m", "version": 1, "max_share": 0.5}]), np.random.default_rng(1), draws=draws)
    policy.apply_snapshot(snapshot(a=(300, 0.05), b=(400, 0.06), c=(5000, 0.07)))
    arms = np.concatenate([policy.decide(256).arm_index for _ in range(800)])
    frequency = np.bincount(arms, minlength=3) / len(arms)
    assert np.abs(frequency - policy.shares).max() < 0.005
    assert policy.shares[2] == pytest.approx(0.5)


def test_fixed_weights_are_exact_propensities() -> None:
    route = make_route("fixed", arm_list=[{"name": "control", "model": "m", "version": 1, "weight": 9},
                                          {"name": "canary", "model": "m", "version": 2, "weight": 1}])
    decision = RoutePolicy.from_route(route, np.random.default_rng(2)).decide(1000)
    assert set(decision.propensity.tolist()) <= {0.9, 0.1}
    assert np.all(decision.propensity[decision.arm_index == 1] == pytest.approx(0.1))


def test_best_arm_share_rises_in_closed_loop() -> None:
    """Thompson on rates 0.02/0.05/0.10, refreshed every 500 requests: after 30 000 requests the
    best arm's share is above 0.8 (it is ~0.95+ in practice; 0.8 leaves room for a slow seed)."""
    rng = np.random.default_rng(42)
    rates = np.array([0.02, 0.05, 0.10])
    policy = RoutePolicy.from_route(make_route(), np.random.default_rng(43))
    stats = [ArmStats() for _ in rates]
    early = policy.shares[2]
    for _ in range(60):
        decision = policy.decide(500)
        rewards = rng.random(500) < rates[decision.arm_index]
        for arm in range(3):
            chosen = decision.arm_index == arm
            stats[arm] = stats[arm] + ArmStats.from_rewards(rewards[chosen].astype(float).tolist())
        policy.apply_snapshot(RouteSnapshot("r", {f"arm{i}": ArmSnapshot(s) for i, s in enumerate(stats)}))
    assert early == pytest.approx(1 / 3)
    assert policy.shares[2] > 0.8


def test_gaussian_rewards_prefer_the_higher_mean() -> None:
    policy = RoutePolicy.from_route(make_route(arms=2, reward="gaussian"), np.random.default_rng(0))
    rng = np.random.default_rng(1)
    policy.apply_snapshot(RouteSnapshot("r", {
        "arm0": ArmSnapshot(ArmStats.from_rewards(rng.normal(10.0, 5.0, 400).tolist())),
        "arm1": ArmSnapshot(ArmStats.from_rewards(rng.normal(12.0, 5.0, 400).tolist()))}))
    assert policy.shares[1] > 0.99


@settings(deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50, unique=True))
def test_sticky_units_keep_their_arm_across_calls_replicas_and_an_added_arm(units: list[str]) -> None:
    two = make_route("fixed", arms=2, sticky_key="unit_id")
    three = make_route("fixed", arms=3, sticky_key="unit_id")
    first = RoutePolicy.from_route(two, np.random.default_rng(1)).decide(len(units), units).arm_index
    again = RoutePolicy.from_route(two, np.random.default_rng(99)).decide(len(units), units).arm_index
    assert np.array_equal(first, again)
    grown = RoutePolicy.from_route(three, np.random.default_rng(5)).decide(len(units), units).arm_index
    # a unit either keeps its arm or moves to the new arm, never between old arms
    assert np.all((grown == first) | (grown == 2))


def test_sticky_assignment_follows_the_weights() -> None:
    """20 000 units at 70/30: binomial sd 0.0032, tolerance 0.015 is > 4.5 sd."""
    route = make_route("fixed", sticky_key="unit_id", arm_list=[{"name": "a", "model": "m", "version": 1, "weight": 7},
                                                                 {"name": "b", "model": "m", "version": 1, "weight": 3}])
    units = [f"user-{i}" for i in range(20_000)]
    decision = RoutePolicy.from_route(route).decide(len(units), units)
    assert np.mean(decision.arm_index == 0) == pytest.approx(0.7, abs=0.015)
    assert np.allclose(decision.propensity, np.where(decision.arm_index == 0, 0.7, 0.3))
    mixed = RoutePolicy.from_route(route).decide(3, ["user-1", None, "user-1"])
    assert mixed.arm_index[0] == mixed.arm_index[2]


def test_shadows_mirror_every_request_or_a_fraction() -> None:
    shadows = [{"name": "s1", "model": "m", "version": 9}, {"name": "s2", "model": "m", "version": 8}]
    full = RoutePolicy.from_route(make_route("shadow", shadows=shadows), np.random.default_rng(0))
    assert full.shadow_names == ("s1", "s2")
    assert full.decide(10).shadow_mask.all()
    part = RoutePolicy.from_route(make_route(shadows=shadows, shadow_fraction=0.25), np.random.default_rng(0))
    mask = part.decide(40_000).shadow_mask
    assert mask.shape == (40_000, 2)
    assert mask.mean() == pytest.approx(0.25, abs=0.01)  # sd 0.0015
    assert not set(part.arm_names) & set(part.shadow_names)
    assert RoutePolicy.from_route(make_route()).decide(5).shadow_mask.shape == (5, 0)


def test_drain_gives_exactly_the_floor_and_restore_undoes_it() -> None:
    policy = RoutePolicy.from_route(make_route(exploration_floor=0.05), np.random.default_rng(0))
    policy.apply_snapshot(snapshot(arm0=(5000, 0.10), arm1=(5000, 0.05), arm2=(5000, 0.05)))
    policy.drain("arm0")
    assert policy.shares[0] == pytest.approx(0.05)
    assert policy.drained == frozenset({"arm0"})
    policy.restore("arm0")
    assert policy.shares[0] == pytest.approx(0.9)  # best arm; the two others at the floor
    with pytest.raises(RoutingError):
        policy.drain("nope")


def test_drain_that_leaves_no_path_for_traffic_raises() -> None:
    route = make_route(arm_list=[{"name": "a", "model": "m", "version": 1, "max_share": 0.3},
                                 {"name": "b", "model": "m", "version": 1}])
    policy = RoutePolicy.from_route(route)
    with pytest.raises(RoutingError):
        policy.drain("b")
    policy.drain("a")
    with pytest.raises(RoutingError):
        policy.drain("b")


def test_store_states_win_at_the_next_snapshot() -> None:
    policy = RoutePolicy.from_route(make_route(exploration_floor=0.02))
    policy.drain("arm1")
    policy.apply_snapshot(RouteSnapshot("r", {"arm2": ArmSnapshot(state="drained")}))
    assert policy.drained == frozenset({"arm2"})
    assert policy.shares[2] == pytest.approx(0.02)


def test_bad_arguments_raise() -> None:
    policy = RoutePolicy.from_route(make_route())
    with pytest.raises(ValueError):
        policy.decide(-1)
    with pytest.raises(ValueError):
        policy.decide(2, ["only-one"])
    with pytest.raises(ValueError):
        RoutePolicy.from_route(make_route(), draws="sometimes")
