"""The benchmark's simulator: bookkeeping, the Lai-Robbins value, the switch metric (small runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadtests import bandit_policy_run
from loadtests.bandit_sim import Result, RewardTapes, Scenario, lai_robbins, requests_to_share, simulate
from loadtests.bench_bandit import summarise


def test_lai_robbins_value_for_the_issue_arms() -> None:
    assert lai_robbins((0.04, 0.05, 0.06), 1_000_000) == pytest.approx(216.7, abs=0.1)


def test_immediate_and_delayed_runs_keep_their_books() -> None:
    rates = (0.02, 0.05, 0.10)
    immediate = simulate(Scenario("i", rates, 20_000, 4, block=10, seed=1))
    delayed = simulate(Scenario("d", rates, 20_000, 4, block=250, replicas=4, delay_mean=2_000.0, seed=1))
    for result in (immediate, delayed):
        assert result.window_counts.sum() == 20_000 * 4
        assert result.regret == pytest.approx(result.window_regret.sum(axis=0))
        gaps = np.array([0.08, 0.05, 0.0])
        assert result.regret == pytest.approx(result.window_counts.sum(axis=0) @ gaps)
        # Thompson learns: the last quarter gives the 0.10 arm most of the traffic
        late = result.window_counts[15:].sum(axis=(0, 1))
        assert late[2] / late.sum() > 0.7


def test_switch_run_logs_propensities_and_tracks_the_new_best_arm() -> None:
    scenario = Scenario("s", (0.02, 0.05, 0.10), 60_000, 4, block=250, replicas=4, half_life=5_000.0, floor=0.02,
                        switch_at=30_000, switch_rates=(0.20, 0.05, 0.10), draws="matched", log_until=30_000, seed=2)
    result = simulate(scenario)
    shares = result.window_counts / result.window_counts.sum(axis=2, keepdims=True)
    assert shares.min() > 0.0  # the floor keeps every arm alive
    after = requests_to_share(result, arm=0, share=0.9)
    assert np.all(after <= 30_000) and np.all(after >= 1_000)
    terms = result.ipw_terms.sum(axis=0)
    assert terms[2] == 30_000 * 4
    # uniform policy's value before the switch is 0.0567; 120 000 logged requests, IPW sd ~ 0.004
    assert terms[0] / terms[2] == pytest.approx(np.mean([0.02, 0.05, 0.10]), abs=0.015)


def test_requests_to_share_counts_to_the_end_of_the_first_window_and_caps_at_the_horizon() -> None:
    scenario = Scenario("s", (0.1, 0.2), 10_000, 2, block=1000, switch_at=5_000, switch_rates=(0.3, 0.2))
    counts = np.zeros((10, 2, 2), dtype=np.int32)
    counts[:, :, 1] = 1000
    counts[7:, 0, :] = [950, 50]  # seed 0 reaches 95% in the third window after the switch
    result = Result(scenario=scenario, regret=np.zeros(2), window_counts=counts)
    assert requests_to_share(result, arm=0, share=0.9).tolist() == [3000.0, 5000.0]


def test_summary_has_exactly_the_keys_the_check_reads(tmp_path) -> None:
    rates = (0.04, 0.05, 0.06)
    results = {
        "immediate": simulate(Scenario("immediate", rates, 10_000, 2, block=10, seed=3)),
        "delayed": simulate(Scenario("delayed", rates, 10_000, 2, block=250, replicas=4, delay_mean=1_000.0, seed=3)),
        "switch": simulate(Scenario("switch", rates, 10_000, 2, block=250, replicas=4, half_life=5_000.0, floor=0.02,
                                    switch_at=5_000, switch_rates=(0.07, 0.05, 0.06), draws="matched",
                                    log_until=5_000, seed=3)),
    }
    summary = summarise(results, speed=1.0, speed_posterior=1.0)
    json.dumps(summary)
    for key in ("regret_immediate", "regret_delayed", "lai_robbins", "ratio_delayed_vs_immediate",
                "ratio_delayed_vs_bound", "switch_requests_to_90pct", "ipw_estimate", "snips_estimate",
                "true_value", "decisions_per_s"):
        assert isinstance(summary[key], float), key


def test_tapes_of_one_seed_are_that_row_of_the_vectorised_tapes() -> None:
    rng = np.random.default_rng(4)
    onehot = rng.integers(0, 3, size=(5, 40))[..., None] == np.arange(3)
    rates = np.array([0.3, 0.5, 0.7])
    together = RewardTapes(5, 3, seed=77).draw(onehot, rates)
    for index in range(5):
        alone = RewardTapes.for_seed(index, 3, seed=77).draw(onehot[index:index + 1], rates)
        assert np.array_equal(alone[0], together[index])


def test_policy_run_keeps_its_books_learns_and_logs_the_policy_propensities() -> None:
    """Through RoutePolicy + MemoryArmStatsStore (one worker): delayed and switch scenarios."""
    rates = (0.02, 0.05, 0.10)
    delayed = bandit_policy_run.run(Scenario("d", rates, 20_000, 2, block=250, replicas=4, delay_mean=2_000.0,
                                             seed=1), workers=1)
    assert delayed.window_counts.sum() == 20_000 * 2
    assert delayed.regret == pytest.approx(delayed.window_counts.sum(axis=0) @ np.array([0.08, 0.05, 0.0]))
    late = delayed.window_counts[15:].sum(axis=(0, 1))
    assert late[2] / late.sum() > 0.7
    switch = bandit_policy_run.run(Scenario("s", rates, 40_000, 2, block=250, replicas=4, half_life=5_000.0,
                                            floor=0.02, switch_at=20_000, switch_rates=(0.20, 0.05, 0.10),
                                            draws="matched", log_until=20_000, seed=2), workers=1)
    assert switch.window_counts.min() > 0  # the floor keeps every arm alive
    assert np.all(requests_to_share(switch, arm=0, share=0.9) <= 20_000)
    terms = switch.ipw_terms.sum(axis=0)
    assert terms[2] == 20_000 * 2
    # uniform policy's value before the switch is 0.0567; 40 000 logged requests, IPW sd ~ 0.006
    assert terms[0] / terms[2] == pytest.approx(np.mean(rates), abs=0.02)


def test_policy_run_does_not_depend_on_how_seeds_are_spread_over_workers() -> None:
    scenario = Scenario("d", (0.1, 0.2), 5_000, 3, block=250, replicas=2, delay_mean=500.0, seed=9)
    alone = bandit_policy_run.run_seed(scenario, 2)
    together = bandit_policy_run.run(scenario, workers=2)
    assert together.regret[2] == alone.regret
    assert np.array_equal(together.window_counts[:, 2], alone.window_counts)
