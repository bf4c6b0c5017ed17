"""Guardrail: which arms are significantly worse than the best one and should be drained (pure).

The check runs on every snapshot, i.e. continuously, so a fixed-level z-test would be wrong: with
enough looks it eventually fires on equal arms. We use the mixture sequential probability ratio
test (mSPRT; Robbins 1970, Johari et al. 2017 "always valid p-values") for the difference of two
means under a normal approximation. With d = observed gap beyond the margin, V its variance and a
N(0, tau^2) mixture over the true gap,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

is a nonnegative martingale under "gap <= margin", so by Ville's inequality
P(Lambda ever >= 1/alpha) <= alpha, however often it is looked at. We reject only for d > 0
(one-sided) and split alpha = 1 - confidence over the K (K - 1) ordered pairs of arms, because the
comparison arm (the best) is itself picked from the data: the chance that *any* arm is ever
drained while within `margin` of every other arm is at most 1 - confidence.

Two metrics, each compared with the best active arm on it:

* reward (higher is better): drain when the best arm's mean exceeds the arm's by more than `margin`;
* error rate (gateway call counters): drain when the arm's error rate exceeds the lowest one by
  more than `margin` and is itself above `max_error_rate` (so small differences between healthy
  arms never drain anything).

With discounting the weights are effective counts (sum of decayed weights); the normal
approximation then uses them as sample sizes, which is approximate but errs towards caution
(decay lowers the counts, widening V).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from banditgate.config import Guardrail
from banditgate.jsontypes import JSONObject
from router.arm_stats import ArmSnapshot


@dataclass(frozen=True, slots=True)
class GuardrailFinding:
    """One arm to drain and the evidence; :meth:`alert_fields` gives an Alert's fields."""

    arm: str
    metric: str
    """``reward`` or ``error_rate``."""
    value: float
    """The arm's estimate of the metric."""
    best_arm: str
    best_value: float
    margin: float
    log_likelihood_ratio: float
    """log Lambda of the mSPRT; the arm is drained when it reaches `log_threshold`."""
    log_threshold: float

    def alert_fields(self, route: str, ts: float, model_version: int | None = None) -> JSONObject:
        """Keyword arguments for ``banditgate.events.Alert`` (kind ``guardrail``)."""
        return {"kind": "guardrail", "route": route, "arm": self.arm, "model_version": model_version,
                "metric": self.metric, "value": self.value, "threshold": self.best_value, "ts": ts,
                "details": {"best_arm": self.best_arm, "margin": self.margin, "action": "drained",
                            "test": "mSPRT", "log_likelihood_ratio": self.log_likelihood_ratio,
                            "log_threshold": self.log_threshold}}


def msprt_log_ratio(gap: float, variance: float, mixing_variance: float) -> float:
    """log Lambda of the normal-mixture SPRT for an observed gap (beyond the null) with `variance`.

    Raises ValueError for non-positive variances.
    """
    if variance <= 0 or mixing_variance <= 0:
        raise ValueError("variances must be > 0")
    total = variance + mixing_variance
    return 0.5 * math.log(variance / total) + mixing_variance * gap * gap / (2.0 * variance * total)


def _arm_moments(arm: ArmSnapshot, reward: str, pooled_variance: float) -> tuple[float, float, float]:
    """(count, mean, variance) with a pseudo-observation so a streak of equal rewards is not certainty."""
    stats = arm.stats
    if reward == "bernoulli":
        smoothed = (stats.reward_sum + 0.5) / (stats.weight + 1.0)
        return stats.weight, stats.mean, smoothed * (1.0 - smoothed)
    return stats.weight, stats.mean, (stats.m2 + pooled_variance) / (stats.weight + 1.0)


def evaluate(arms: Mapping[str, ArmSnapshot], guardrail: Guardrail, reward: str = "bernoulli",
             mixing_sd: float | None = None) -> list[GuardrailFinding]:
    """Arms to drain now (already drained arms and the best arm are never listed).

    `mixing_sd` is the mSPRT's tau: the size of gap the test is most sensitive to (default
    ``max(margin, 0.1 x pooled standard deviation)``); any value keeps the error guarantee.
    Raises ValueError for an unknown reward kind.
    """
    if reward not in ("bernoulli", "gaussian"):
        raise ValueError(f"reward must be bernoulli or gaussian, got {reward!r}")
    if not guardrail.enabled or len(arms) < 2:
        return []
    active = {name: arm for name, arm in arms.items() if arm.state != "drained"}
    alpha = (1.0 - guardrail.confidence) / (len(arms) * (len(arms) - 1))
    log_threshold = math.log(1.0 / alpha)
    findings: list[GuardrailFinding] = []
    findings += _reward_findings(active, guardrail, reward, mixing_sd, log_threshold)
    findings += _error_findings(active, guardrail, mixing_sd, log_threshold,
                                skip={f.arm for f in findings})
    return findings


def _reward_findings(active: Mapping[str, ArmSnapshot], guardrail: Guardrail, reward: str,
                     mixing_sd: float | None, log_threshold: float) -> list[GuardrailFinding]:
    eligible = {name: arm for name, arm in active.items() if arm.stats.weight >= guardrail.min_outcomes}
    if len(eligible) < 2:
        return []
    total_weight = sum(arm.stats.weight for arm in eligible.values())
    pooled_variance = sum(arm.stats.m2 for arm in eligible.values()) / total_weight
    moments = {name: _arm_moments(arm, reward, pooled_variance) for name, arm in eligible.items()}
    best = max(moments, key=lambda name: moments[name][1])
    best_count, best_mean, best_variance = moments[best]
    tau = mixing_sd if mixing_sd is not None else max(guardrail.margin, 0.1 * math.sqrt(max(pooled_variance, 1e-12)))
    findings = []
    for name, (count, mean, variance) in moments.items():
        gap = best_mean - mean - guardrail.margin
        if name == best or gap <= 0:
            continue
        log_ratio = msprt_log_ratio(gap, best_variance / best_count + variance / count, tau * tau)
        if log_ratio >= log_threshold:
            findings.append(GuardrailFinding(name, "reward", mean, best, best_mean, guardrail.margin,
                                             log_ratio, log_threshold))
    return findings


def _error_findings(active: Mapping[str, ArmSnapshot], guardrail: Guardrail, mixing_sd: float | None,
                    log_threshold: float, skip: set[str]) -> list[GuardrailFinding]:
    eligible = {name: arm for name, arm in active.items() if arm.calls >= guardrail.min_outcomes}
    if len(eligible) < 2:
        return []
    rates = {name: (arm.errors + 0.5) / (arm.calls + 1.0) for name, arm in eligible.items()}
    best = min(eligible, key=lambda name: eligible[name].errors / eligible[name].calls)
    best_arm = eligible[best]
    best_rate = best_arm.errors / best_arm.calls
    pooled = sum(a.errors for a in eligible.values()) / sum(a.calls for a in eligible.values())
    tau = mixing_sd if mixing_sd is not None else max(guardrail.margin, 0.1 * math.sqrt(max(pooled * (1 - pooled), 1e-12)))
    findings = []
    for name, arm in eligible.items():
        rate = arm.errors / arm.calls
        gap = rate - best_rate - guardrail.margin
        if name == best or name in skip or gap <= 0 or rate <= guardrail.max_error_rate:
            continue
        variance = rates[name] * (1 - rates[name]) / arm.calls + rates[best] * (1 - rates[best]) / best_arm.calls
        log_ratio = msprt_log_ratio(gap, variance, tau * tau)
        if log_ratio >= log_threshold:
            findings.append(GuardrailFinding(name, "error_rate", rate, best, best_rate, guardrail.margin,
                                             log_ratio, log_threshold))
    return findings
