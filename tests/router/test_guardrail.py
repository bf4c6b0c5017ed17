"""Guardrail: mSPRT against the best arm, valid under continuous monitoring."""

from __future__ import annotations

import numpy as np
import pytest

from banditgate.config import Guardrail
from banditgate.events import Alert
from router.arm_stats import ArmSnapshot, ArmStats
from router.guardrail import evaluate, msprt_log_ratio


def bernoulli_arm(outcomes: int, successes: int, **extra) -> ArmSnapshot:
    mean = successes / outcomes if outcomes else 0.0
    return ArmSnapshot(ArmStats(float(outcomes), mean, outcomes * mean * (1 - mean)), **extra)


def test_clearly_worse_arm_is_drained_and_becomes_an_alert() -> None:
    arms = {"good": bernoulli_arm(5000, 500), "bad": bernoulli_arm(5000, 250), "fine": bernoulli_arm(5000, 490)}
    findings = evaluate(arms, Guardrail())
    assert [(f.arm, f.metric, f.best_arm) for f in findings] == [("bad", "reward", "good")]
    alert = Alert(**findings[0].alert_fields("churn", ts=1.0, model_version=3))
    assert alert.kind == "guardrail" and alert.arm == "bad" and alert.value == pytest.approx(0.05)


def test_nothing_below_min_outcomes_or_within_margin_or_already_drained() -> None:
    assert evaluate({"a": bernoulli_arm(150, 30), "b": bernoulli_arm(150, 0)}, Guardrail()) == []
    assert evaluate({"a": bernoulli_arm(5000, 500), "b": bernoulli_arm(5000, 250)}, Guardrail(margin=0.06)) == []
    assert evaluate({"a": bernoulli_arm(5000, 500), "b": bernoulli_arm(5000, 250, state="drained")}, Guardrail()) == []
    assert evaluate({"a": bernoulli_arm(5000, 500), "b": bernoulli_arm(5000, 250)}, Guardrail(enabled=False)) == []


def test_error_rate_drains_only_above_the_tolerated_rate() -> None:
    healthy = {"a": ArmSnapshot(calls=10_000, errors=10), "b": ArmSnapshot(calls=10_000, errors=40)}
    assert evaluate(healthy, Guardrail(max_error_rate=0.05)) == []
    broken = {"a": ArmSnapshot(calls=10_000, errors=10), "b": ArmSnapshot(calls=10_000, errors=900)}
    findings = evaluate(broken, Guardrail(max_error_rate=0.05))
    assert [(f.arm, f.metric) for f in findings] == [("b", "error_rate")]
    assert findings[0].value == pytest.approx(0.09)


def test_equal_arms_are_never_drained_under_continuous_monitoring() -> None:
    """200 replicates of three equal arms (rate 0.05) looked at after every 500 outcomes up to
    50 000 each (100 looks). The mSPRT keeps the chance of any false drain per replicate <= 0.001;
    a fixed-level z-test at the same confidence would fire in several replicates."""
    rng = np.random.default_rng(2024)
    guardrail = Guardrail(confidence=0.999)
    false_drains = 0
    for _ in range(200):
        successes = np.zeros(3, dtype=np.int64)
        for look in range(1, 101):
            successes += rng.binomial(500, 0.05, size=3)
            arms = {f"arm{i}": bernoulli_arm(500 * look, int(successes[i])) for i in range(3)}
            if evaluate(arms, guardrail):
                false_drains += 1
                break
    assert false_drains <= 1  # expected <= 0.2 at alpha 0.001


def test_a_real_gap_is_found_quickly() -> None:
    """Rates 0.10 vs 0.07 (30% worse), looks every 500 outcomes: drained within 20 000 outcomes
    in every one of 20 replicates (typically ~6 000)."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        good = bad = 0
        for look in range(1, 41):
            good += rng.binomial(500, 0.10)
            bad += rng.binomial(500, 0.07)
            if evaluate({"good": bernoulli_arm(500 * look, good), "bad": bernoulli_arm(500 * look, bad)}, Guardrail()):
                break
        else:
            pytest.fail("a 30% worse arm was not drained within 20 000 outcomes")


def test_gaussian_rewards_use_their_own_variance() -> None:
    rng = np.random.default_rng(1)
    arms = {"high": ArmSnapshot(ArmStats.from_rewards(rng.normal(10, 2, 2000).tolist())),
            "low": ArmSnapshot(ArmStats.from_rewards(rng.normal(9, 2, 2000).tolist()))}
    assert [f.arm for f in evaluate(arms, Guardrail(), reward="gaussian")] == ["low"]


def test_msprt_ratio_grows_with_the_gap_and_rejects_bad_variances() -> None:
    assert msprt_log_ratio(0.02, 1e-5, 1e-4) > msprt_log_ratio(0.01, 1e-5, 1e-4)
    with pytest.raises(ValueError):
        msprt_log_ratio(0.01, 0.0, 1e-4)
    with pytest.raises(ValueError):
        evaluate({}, Guardrail(), reward="poisson")
