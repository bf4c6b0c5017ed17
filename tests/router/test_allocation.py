"""Floors, caps and drains on traffic shares, and thinning Thompson draws to those shares."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from router.allocation import apply_thinning, constrain_shares, drain_is_feasible, thinning_plan


@st.composite
def constrained_routes(draw):
    arms = draw(st.integers(2, 6))
    preferred = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=arms, max_size=arms)))
    preferred = preferred / preferred.sum() if preferred.sum() > 0 else np.full(arms, 1 / arms)
    floor = draw(st.floats(0.0, 1.0 / arms))
    caps = np.array(draw(st.lists(st.floats(floor, 1.0), min_size=arms, max_size=arms)))
    drained = np.array(draw(st.lists(st.booleans(), min_size=arms, max_size=arms)))
    assume(caps.sum() >= 1.0)  # what the config validator demands
    return preferred, floor, caps, drained


@settings(max_examples=300, deadline=None)
@given(constrained_routes())
def test_shares_sum_to_one_and_respect_floor_caps_and_drains(route) -> None:
    preferred, floor, caps, drained = route
    shares = constrain_shares(preferred, floor, caps, drained)
    assert shares.sum() == pytest.approx(1.0, abs=1e-12)
    if drain_is_feasible(floor, caps, drained):
        assert np.all(shares >= floor - 1e-9)
        assert np.all(shares <= caps + 1e-9)
        assert np.allclose(shares[drained], floor, atol=1e-9)
    else:  # drains the caps cannot absorb: the drained arms take the rest, active arms stay capped
        assert np.all(shares[~drained] <= caps[~drained] + 1e-9)


@settings(max_examples=200, deadline=None)
@given(constrained_routes())
def test_unconstrained_arms_keep_their_relative_preference(route) -> None:
    preferred, floor, caps, drained = route
    assume(drain_is_feasible(floor, caps, drained))
    shares = constrain_shares(preferred, floor, caps, drained)
    free = (~drained) & (shares > floor + 1e-9) & (shares < caps - 1e-9) & (preferred > 1e-6)
    if free.sum() >= 2:
        ratio = shares[free] / preferred[free]
        assert ratio.max() == pytest.approx(ratio.min(), rel=1e-6)


def test_no_constraints_leave_preferences_unchanged() -> None:
    preferred = np.array([0.1, 0.2, 0.7])
    assert constrain_shares(preferred, 0.0, np.ones(3), np.zeros(3, bool)) == pytest.approx(preferred)


def test_floor_and_cap_examples() -> None:
    none = np.zeros(3, bool)
    assert constrain_shares(np.array([0.001, 0.01, 0.989]), 0.02, np.ones(3), none) == pytest.approx([0.02, 0.02, 0.96])
    assert constrain_shares(np.array([0.7, 0.2, 0.1]), 0.0, np.array([0.2, 1, 1]), none) == pytest.approx([0.2, 0.8 * 2 / 3, 0.8 / 3])
    # a capped arm the policy loves, and an arm the policy gives nothing: the latter takes the rest
    assert constrain_shares(np.array([1.0, 0.0]), 0.0, np.array([0.2, 1.0]), np.zeros(2, bool)) == pytest.approx([0.2, 0.8])
    assert constrain_shares(np.array([0.5, 0.5]), 0.05, np.ones(2), np.array([True, False])) == pytest.approx([0.05, 0.95])


@settings(max_examples=300, deadline=None)
@given(constrained_routes())
def test_thinning_turns_the_policy_distribution_into_the_shares_exactly(route) -> None:
    preferred, floor, caps, drained = route
    shares = constrain_shares(preferred, floor, caps, drained)
    plan = thinning_plan(preferred, shares)
    replacement = np.diff(np.concatenate([[0.0], plan.replacement_cdf]))
    rejected = np.sum(preferred * (1 - plan.keep))
    final = preferred * plan.keep + rejected * replacement
    assert final == pytest.approx(shares, abs=1e-9)


def test_thinning_empirically_serves_the_shares() -> None:
    """10^6 requests: binomial sd <= 0.0005, tolerance 0.0025 is 5 sd."""
    rng = np.random.default_rng(5)
    preferred = np.array([0.001, 0.01, 0.989])
    shares = constrain_shares(preferred, 0.02, np.ones(3), np.zeros(3, bool))
    drawn = rng.choice(3, size=1_000_000, p=preferred)
    final = apply_thinning(drawn, thinning_plan(preferred, shares), rng.random((2, 1_000_000)))
    assert np.abs(np.bincount(final, minlength=3) / 1e6 - shares).max() < 0.0025


def test_bad_floor_or_caps_raise() -> None:
    with pytest.raises(ValueError):
        constrain_shares(np.array([0.5, 0.5]), 0.6, np.ones(2), np.zeros(2, bool))
    with pytest.raises(ValueError):
        constrain_shares(np.array([0.5, 0.5]), 0.3, np.array([0.2, 1.0]), np.zeros(2, bool))
