"""Posteriors and the probability-of-best quadrature (the Thompson propensity)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.arm_stats import ArmStats
from router.thompson import (BetaPosterior, NormalInverseGammaPrior, StudentTPosterior, probability_best)

counts = st.floats(min_value=0.0, max_value=2e5, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(counts, st.floats(0.0, 1.0)), min_size=2, max_size=6))
def test_beta_probability_best_is_a_distribution_and_matches_a_fine_grid(arms: list[tuple[float, float]]) -> None:
    weight = np.array([w for w, _ in arms])
    posterior = BetaPosterior.from_counts(weight, weight * np.array([rate for _, rate in arms]))
    coarse = probability_best(posterior)
    fine = probability_best(posterior, nodes_per_arm=2001)
    assert coarse.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(coarse >= 0)
    # the documented promise is +-0.01; the quadrature does much better
    assert np.abs(coarse - fine).max() < 2e-3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0.01, 10), st.floats(1.0, 500.0)), min_size=2, max_size=5))
def test_student_t_probability_best_matches_a_fine_grid(arms: list[tuple[float, float, float]]) -> None:
    posterior = StudentTPosterior(*(np.array(column) for column in zip(*arms)))
    coarse = probability_best(posterior)
    assert coarse.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(coarse - probability_best(posterior, nodes_per_arm=2001)).max() < 2e-3


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
