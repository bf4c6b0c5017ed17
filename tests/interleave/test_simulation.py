"""The benchmark's world: click model, exact click distributions, rankers, experiment bookkeeping."""

from __future__ import annotations

import numpy as np

from loadtests.interleave_experiments import (ab_rates, fixed_sample_impressions, interleaving_rates,
                                              pair_probabilities, run_ab, run_interleaving)
from loadtests.interleave_sim import (NAVIGATIONAL, CascadeClickModel, calibrate_noise_scale, draw_grades, ndcg,
                                      rank, top_k)
from router.preference import PreferenceTest

IMPATIENT = CascadeClickModel("impatient", NAVIGATIONAL.click_probability, NAVIGATIONAL.stop_probability, 0.8)


def test_exact_click_distribution_matches_simulated_clicks() -> None:
    # 3 lists x 40 000 simulated users: each probability's binomial sd is at most 0.0025; 0.012 ~ 5 sd
    generator = np.random.default_rng(3)
    grades = np.array([[4, 0, 2, 1, 0, 3, -1], [0, 0, 0, 1, 0, 0, 0], [3, 3, 3, 2, 2, 1, 0]])
    signs = np.array([[1, -1, 1, -1, 1, -1, 0], [1, 1, -1, -1, 1, 1, -1], [-1, 1, -1, 1, -1, 1, -1]])
    for model in (NAVIGATIONAL, IMPATIENT):
        counts = model.click_count_distribution(grades)
        signed = model.click_count_distribution(grades, signs)
        assert np.allclose(counts.sum(axis=1), 1) and np.allclose(signed.sum(axis=1), 1)
        clicks = model.simulate(np.repeat(grades, 40_000, axis=0), generator).reshape(3, 40_000, 7)
        for row in range(3):
            observed = np.bincount(clicks[row].sum(axis=1), minlength=8) / 40_000
            assert np.abs(observed - counts[row]).max() < 0.012
            difference = (clicks[row] * signs[row]).sum(axis=1) + 7
            assert np.abs(np.bincount(difference, minlength=15) / 40_000 - signed[row]).max() < 0.012
        assert not clicks[0, :, 6].any()  # padding is never clicked


def test_top_k_agrees_with_argsort_and_rankers_hit_their_ndcg() -> None:
    generator = np.random.default_rng(4)
    scores = generator.standard_normal((500, 3, 30)).astype(np.float32)
    assert (top_k(scores, 10) == np.argsort(-scores, axis=-1)[..., :10]).all()
    scale = calibrate_noise_scale(0.84, generator, n_queries=4000, iterations=20)
    grades = draw_grades(20_000, generator)
    measured = ndcg(grades, rank(grades, np.array([scale]), generator)[:, 0]).mean()
    assert abs(measured - 0.84) < 0.006  # 20 000 fresh queries: standard error ~0.0013


def test_experiments_report_decisions_censoring_and_direction() -> None:
    generator = np.random.default_rng(5)
    test = PreferenceTest(confidence=0.95)
    scales = np.array([0.2, 3.0])  # a near-perfect ranker against a poor one: decided quickly
    result = run_interleaving(scales, test, NAVIGATIONAL, n_seeds=8, cap=2000, rng=generator,
                              grid=np.array([10, 100, 1000]))
    assert np.isfinite(result.impressions).all() and not result.wrong.any()
    assert result.curve_confidence is not None and (np.diff(result.curve_confidence, axis=1) >= 0).all()
    censored = run_ab(0.0101, 0.01, test, n_seeds=8, cap=1000, rng=generator)
    assert censored.censored_fraction == 1.0 and censored.median() == float("inf")
    decided = run_ab(0.3, 0.1, test, n_seeds=50, cap=10_000, rng=generator)
    assert decided.censored_fraction == 0.0 and decided.error_rate == 0.0


def test_fixed_sample_estimates_point_the_right_way() -> None:
    generator = np.random.default_rng(6)
    scales = np.array([0.5, 1.5])
    win, loss = interleaving_rates(scales, NAVIGATIONAL, 3000, generator)
    assert win > loss
    rates = ab_rates(scales, IMPATIENT, 3000, generator)
    assert rates["ctr"][0] > rates["ctr"][1]
    assert np.isfinite(fixed_sample_impressions(*pair_probabilities(*rates["ctr"]), per_outcome=2))
    assert fixed_sample_impressions(0.1, 0.2) == float("inf")
