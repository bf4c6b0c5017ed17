"""Arm statistics: Welford/Chan arithmetic, merging, and lazy decay equal to per-outcome decay."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.arm_stats import ArmSnapshot, ArmStats, RouteSnapshot, decay_factor

rewards = st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=0, max_size=40)


@settings(deadline=None)
@given(rewards)
def test_updates_match_numpy_moments(values: list[float]) -> None:
    stats = ArmStats.from_rewards(values)
    assert stats.weight == len(values)
    if values:
        assert stats.mean == pytest.approx(np.mean(values), abs=1e-9, rel=1e-9)
        assert stats.m2 == pytest.approx(np.var(values) * len(values), abs=1e-6, rel=1e-7)


@settings(deadline=None)
@given(rewards, rewards)
def test_merge_equals_one_pass(first: list[float], second: list[float]) -> None:
    merged = ArmStats.from_rewards(first) + ArmStats.from_rewards(second)
    whole = ArmStats.from_rewards(first + second)
    assert merged.weight == whole.weight
    assert merged.mean == pytest.approx(whole.mean, abs=1e-9, rel=1e-9)
    assert merged.m2 == pytest.approx(whole.m2, abs=1e-6, rel=1e-7)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 1.0])), min_size=1, max_size=60),
       st.floats(min_value=1.0, max_value=50.0))
def test_lazy_decay_equals_decaying_every_arm_per_outcome(outcomes: list[tuple[int, float]], half_life: float) -> None:
    """What the Redis script does (decay only the touched arm, by outcomes since it was last
    touched; readers decay by the rest) equals multiplying every arm by the factor per outcome."""
    eager = [ArmStats() for _ in range(3)]
    lazy = [ArmStats() for _ in range(3)]
    last = [0, 0, 0]
    factor = decay_factor(1, half_life)
    for counter, (arm, reward) in enumerate(outcomes):
        eager = [stats.decayed(factor) for stats in eager]
        eager[arm] = eager[arm].updated(reward)
        lazy[arm] = lazy[arm].decayed(decay_factor(counter + 1 - last[arm], half_life)).updated(reward)
        last[arm] = counter + 1
    read = [stats.decayed(decay_factor(len(outcomes) - last[arm], half_life)) for arm, stats in enumerate(lazy)]
    for expected, got in zip(eager, read):
        assert got.weight == pytest.approx(expected.weight, rel=1e-9, abs=1e-12)
        assert got.mean == pytest.approx(expected.mean, rel=1e-9, abs=1e-12)


def test_decay_halves_weight_per_half_life_and_keeps_mean() -> None:
    stats = ArmStats.from_rewards([1.0, 0.0, 1.0, 1.0])
    decayed = stats.decayed(decay_factor(200, half_life=100))
    assert decayed.weight == pytest.approx(1.0)
    assert decayed.mean == stats.mean
    assert decayed.variance == pytest.approx(stats.variance)
    assert decay_factor(10**9, None) == 1.0


@pytest.mark.parametrize("call", [lambda: ArmStats().updated(float("nan")), lambda: ArmStats().updated(1.0, -1.0),
                                  lambda: ArmStats().decayed(1.5), lambda: decay_factor(-1, 10.0),
                                  lambda: decay_factor(1, 0.0)])
def test_bad_arguments_raise(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_snapshot_unknown_arm_is_fresh_and_active() -> None:
    snapshot = RouteSnapshot("r", {"a": ArmSnapshot(state="drained")})
    assert snapshot.arm("zzz") == ArmSnapshot()
    assert snapshot.drained == frozenset({"a"})
