"""Posteriors and the probability-of-best quadrature (the Thompson propensity)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.arm_stats import ArmSnapshot, ArmStats, RouteSnapshot
from router.decision import RoutePolicy
from router.thompson import BetaPosterior, NormalInverseGammaPrior, StudentTPosterior, probability_best
from tests.router.quadrature_reference import reference_probability_best

counts = st.floats(min_value=0.0, max_value=2e5, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(counts, st.floats(0.0, 1.0)), min_size=2, max_size=6))
def test_beta_probability_best_is_a_distribution_and_matches_the_per_arm_reference(
        arms: list[tuple[float, float]]) -> None:
    weight = np.array([w for w, _ in arms])
    posterior = BetaPosterior.from_counts(weight, weight * np.array([rate for _, rate in arms]))
    shared = probability_best(posterior)
    assert shared.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(shared >= 0)
    # the documented promise is +-0.01; over 250 random posteriors the largest gap was 1.3e-4
    assert np.abs(shared - reference_probability_best(posterior)).max() < 1e-3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0.01, 10), st.floats(1.0, 500.0)), min_size=2, max_size=5))
def test_student_t_probability_best_matches_the_per_arm_reference(arms: list[tuple[float, float, float]]) -> None:
    posterior = StudentTPosterior(*(np.array(column) for column in zip(*arms)))
    shared = probability_best(posterior)
    assert shared.sum() == pytest.approx(1.0, abs=1e-12)
    # span 16 (sinh(16) ~ 4e6 scales): the default span 7 cuts ~1e-3 of a Cauchy's (dof 1) tail
    # mass, which made the reference, not the shared grid, wrong (see the exact case below)
    assert np.abs(shared - reference_probability_best(posterior, span=16.0)).max() < 1e-3, arms


def test_cauchy_pair_matches_the_closed_form() -> None:
    """Two Cauchy posteriors (dof 1, scale s, locations 0 and 1): their difference is Cauchy with
    scale 2s, so P(arm 1 is best) = 1/2 + arctan(1 / 2s) / pi exactly."""
    posterior = StudentTPosterior(np.array([0.0, 1.0]), np.array([0.0625, 0.0625]), np.array([1.0, 1.0]))
    assert probability_best(posterior)[1] == pytest.approx(0.5 + np.arctan(8.0) / np.pi, abs=1e-4)


@pytest.mark.parametrize("family", ["beta", "student-t"])
def test_many_arms_match_the_per_arm_reference(family: str) -> None:
    """40 arms of mixed widths (0 to 10^5 outcomes): the shared grid against per-arm grids."""
    rng = np.random.default_rng(17)
    weight = np.where(rng.random(40) < 0.2, rng.uniform(0, 30, 40), 10 ** rng.uniform(1, 5, 40))
    mean = rng.uniform(0.03, 0.07, 40)
    if family == "beta":
        posterior: BetaPosterior | StudentTPosterior = BetaPosterior.from_counts(weight, weight * mean)
    else:
        posterior = StudentTPosterior.from_moments(weight, mean, weight * 0.05)
    shared = probability_best(posterior)
    assert np.count_nonzero(shared) > 5  # a hard case: many arms can still be best
    assert np.abs(shared - reference_probability_best(posterior, nodes_per_arm=801)).max() < 1e-3


def test_arms_that_cannot_be_best_get_zero_and_the_rest_is_unchanged() -> None:
    """An arm far below the others is cut (its exact probability is below 1e-10)."""
    posterior = BetaPosterior.from_counts(np.array([1e4, 1e4, 1e4]), np.array([100.0, 600.0, 610.0]))
    best = probability_best(posterior)
    assert best[0] == 0.0
    two = probability_best(BetaPosterior.from_counts(np.array([1e4, 1e4]), np.array([600.0, 610.0])))
    assert best[1:] == pytest.approx(two, abs=1e-12)


def test_logged_propensities_are_calibrated_with_100_arms() -> None:
    """10^6 textbook Thompson decisions (posterior draws, thinned to a floor) at one fixed state
    of 100 arms: each arm's selection frequency is within 0.002 of the propensity logged for it.

    Monte Carlo alone: a share p has standard error sqrt(p (1 - p) / 10^6) <= 3.3e-4 here (largest
    share ~0.12), so 0.002 is 6 standard errors; a quadrature error of more than ~1e-3 would show.
    """
    rng = np.random.default_rng(2024)
    names = [f"arm{i}" for i in range(100)]
    weight = 10 ** rng.uniform(2, 4.5, 100)
    mean = rng.uniform(0.04, 0.06, 100)
    snapshot = RouteSnapshot("many", {name: ArmSnapshot(ArmStats(w, m, w * m * (1 - m)))
                                      for name, w, m in zip(names, weight, mean)})
    policy = RoutePolicy("many", names, exploration_floor=0.002, draws="posterior", rng=np.random.default_rng(99))
    policy.apply_snapshot(snapshot)
    assert np.count_nonzero(policy.preferred > 1e-3) >= 10
    counts = np.zeros(100)
    logged = np.zeros(100)
    for _ in range(100):
        decision = policy.decide(10_000)
        counts += np.bincount(decision.arm_index, minlength=100)
        np.add.at(logged, decision.arm_index, decision.propensity)
    chosen = counts > 0
    # every request of an arm logs the same share, so logged / counts is that arm's propensity
    assert np.allclose(logged[chosen] / counts[chosen], policy.shares[chosen])
    assert np.abs(counts / 1e6 - policy.shares).max() <= 0.002


@pytest.mark.parametrize("alpha,beta", [([1, 1, 1], [1, 1, 1]), ([3, 5, 1], [40, 60, 1]),
                                        ([1, 1.5, 50], [1000, 3000, 1e5]), ([401, 5001, 60001], [9601, 95001, 940001])])
def test_quadrature_agrees_with_monte_carlo(alpha: list[float], beta: list[float]) -> None:
    """400 000 Thompson draws: Monte Carlo standard error <= 0.0008, so 0.004 is 5 sigma."""
    posterior = BetaPosterior(np.array(alpha, float), np.array(beta, float))
    draws = posterior.sample(np.random.default_rng(7), 400_000).argmax(axis=1)
    frequency = np.bincount(draws, minlength=3) / 400_000
    assert np.abs(probability_best(posterior) - frequency).max() < 0.004


def test_symmetric_arms_split_evenly_and_batches_are_independent() -> None:
    alpha = np.array([[5.0, 5.0, 5.0], [2.0, 2.0, 900.0]])
    beta = np.array([[50.0, 50.0, 50.0], [30.0, 30.0, 100.0]])
    best = probability_best(BetaPosterior(alpha, beta))
    assert best[0] == pytest.approx(np.full(3, 1 / 3), abs=1e-9)
    assert best[1, 2] == pytest.approx(1.0, abs=1e-9)
    assert best[1, 0] == pytest.approx(best[1, 1], abs=1e-12)


def test_beta_posterior_mean_converges_to_true_rates() -> None:
    """20 000 outcomes per arm: posterior sd ~ 0.0017, tolerance 0.006 is > 3.5 sd."""
    rng = np.random.default_rng(11)
    rates = np.array([0.04, 0.05, 0.3])
    successes = rng.binomial(20_000, rates)
    posterior = BetaPosterior.from_counts(np.full(3, 20_000.0), successes)
    assert np.abs(posterior.mean() - rates).max() < 0.006


def test_nig_posterior_matches_the_closed_form_and_converges() -> None:
    rng = np.random.default_rng(3)
    rewards = rng.normal(2.5, 3.0, size=5_000)
    stats = ArmStats.from_rewards(rewards.tolist())
    prior = NormalInverseGammaPrior(mean=0.0, weight=1.0, shape=2.0, scale=3.0)
    posterior = StudentTPosterior.from_stats([stats], prior)
    n, mean = len(rewards), rewards.mean()
    kappa = 1.0 + n
    shape = 2.0 + n / 2
    scale = 3.0 + 0.5 * ((rewards - mean) ** 2).sum() + n * mean**2 / (2 * kappa)
    assert posterior.loc[0] == pytest.approx(n * mean / kappa)
    assert posterior.scale[0] == pytest.approx(np.sqrt(scale / (shape * kappa)))
    assert posterior.dof[0] == pytest.approx(2 * shape)
    # standard error 3/sqrt(5000) = 0.042; 0.2 is almost 5 of them
    assert abs(posterior.loc[0] - 2.5) < 0.2


def test_posterior_samples_have_the_requested_shapes() -> None:
    rng = np.random.default_rng(0)
    beta = BetaPosterior(np.ones((4, 3)), np.ones((4, 3)))
    assert beta.sample(rng, 10).shape == (4, 10, 3)
    assert beta.sample(rng).shape == (4, 3)
    t = StudentTPosterior(np.zeros(3), np.ones(3), np.full(3, 4.0))
    assert t.sample(rng, 7).shape == (7, 3)


def test_invalid_parameters_raise() -> None:
    with pytest.raises(ValueError):
        BetaPosterior(np.array([0.5]), np.array([1.0]))
    with pytest.raises(ValueError):
        StudentTPosterior(np.zeros(2), np.array([1.0, 0.0]), np.ones(2))
