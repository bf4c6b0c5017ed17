"""The demo's verdict (pure): did the loop do what banditgate is for?

1. **bandit**: in the second half of the run before the broken release, and in the second half
   after it, the arm with the best true accuracy on the traffic of that part (known here: every
   model's label for every pool row, clean and shifted, was computed with ONNX Runtime on the
   very files the gateway serves) received most (> 50%) of the requests.
2. **drift**: the gateway opened at least one drift episode (a `firing` alert) after the
   covariate shift and none before it (warm-up included).
3. **accounting**: every request got exactly one prediction (duplicates of the at-least-once
   gateway counted apart), nothing was dead-lettered, every prediction got its outcome, and the
   feedback worker's exact counters in Redis account for every outcome sent: the arm statistics'
   outcome counter (one per applied outcome, deduplicated by request_id, undiscounted) and the
   ledger's joined count, in total and per arm; no orphan or invalid outcome.
4. **processes**: `banditgate serve` and `banditgate feedback` stopped on SIGTERM with exit 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from demo.models import RETRAIN_MODEL
from demo.scenario import Scenario
from demo.telemetry import Sample, Telemetry


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    summary: str
    """One line: what was required and what happened."""
    details: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class OracleLabels:
    """What one model version predicts for every pool row, clean and shifted."""

    clean: np.ndarray
    shifted: np.ndarray


def oracle_accuracy(telemetry: Telemetry, labels: OracleLabels, start_s: float, end_s: float) -> float | None:
    """Accuracy the version would have had on the scenario requests sent in [start_s, end_s)."""
    correct = n = 0
    for request in telemetry.requests.values():
        if request.warmup or not start_s <= request.sent_s < end_s:
            continue
        predicted = (labels.shifted if request.shifted else labels.clean)[request.row]
        correct += int(predicted == request.label)
        n += 1
    return correct / n if n else None


def check_bandit(telemetry: Telemetry, scenario: Scenario, oracle_before: Mapping[str, OracleLabels],
                 oracle_after: Mapping[str, OracleLabels]) -> Check:
    """`oracle_before` / `oracle_after`: arm -> the labels of the version it serves before / after
    the broken release."""
    parts = []
    passed = True
    details: dict[str, object] = {}
    for label, (start, end), oracle in (("before the broken release", (0.0, scenario.degrade_at_s), oracle_before),
                                        ("after it", (scenario.degrade_at_s, scenario.end_s), oracle_after)):
        accuracy = {arm: oracle_accuracy(telemetry, labels, start, end) for arm, labels in oracle.items()}
        known = {arm: value for arm, value in accuracy.items() if value is not None}
        if not known:
            return Check("bandit", False, f"no scenario requests {label}", details)
        best = max(known, key=lambda arm: known[arm])
        window = ((start + end) / 2, end)
        shares = telemetry.shares_between(*window)
        share = shares.get(best, 0.0)
        ok = share > 0.5
        passed = passed and ok
        details[label] = {"true_accuracy": known, "best_arm": best, "window_s": window, "shares": shares}
        parts.append(f"{label}: best arm {best} (true accuracy {known[best]:.3f}) got {share:.0%} of requests "
                     f"in t={window[0]:.0f}-{window[1]:.0f}s")
    return Check("bandit", passed, "; ".join(parts), details)


def check_drift(telemetry: Telemetry, scenario: Scenario, gauges_seen: bool) -> Check:
    alarms = telemetry.drift_alerts
    before = [a for a in alarms if a["t_s"] < scenario.drift_at_s]
    after = [a for a in alarms if a["t_s"] >= scenario.drift_at_s]
    details: dict[str, object] = {"alarms": len(alarms), "before_shift": len(before), "after_shift": len(after)}
    if not alarms and not gauges_seen:
        return Check("drift", False, "the gateway published no drift alerts and no banditgate_drift_* gauges "
                                     "(are its drift monitors wired, and did the models' reference.json load?)", details)
    if before:
        first = before[0]
        return Check("drift", False, f"{len(before)} drift alarm(s) before the shift at t={scenario.drift_at_s:.0f}s, "
                                     f"first at t={first['t_s']:.1f}s ({_where(first)})", details)
    if not after:
        return Check("drift", False, f"no drift alarm after the shift at t={scenario.drift_at_s:.0f}s "
                                     f"(run ended at t={scenario.end_s:.0f}s)", details)
    first = after[0]
    on_shifted = [a for a in after if (a.get("details") or {}).get("feature") in scenario.drift_features]
    details.update(first_after_s=first["t_s"], delay_s=first["t_s"] - scenario.drift_at_s,
                   on_shifted_features=len(on_shifted))
    return Check("drift", True, f"none before the shift at t={scenario.drift_at_s:.0f}s; first "
                                f"{first['t_s'] - scenario.drift_at_s:.1f}s after it ({_where(first)}); "
                                f"{len(after)} after, {len(on_shifted)} of them on the shifted features", details)


def _where(alert: Mapping[str, object]) -> str:
    details = alert.get("details") or {}
    assert isinstance(details, Mapping)  # noqa: S101 - built by the gateway as an object
    feature = details.get("feature")  # None for a whole-model signal: the prediction score
    return f"{details.get('model', '?')} v{alert.get('model_version', '?')}, {feature if feature is not None else 'score'}"


def check_accounting(telemetry: Telemetry, final: Sample | None) -> Check:
    problems = []
    sent, answered = telemetry.sent, len(telemetry.predictions)
    if answered != sent:
        problems.append(f"{sent - answered} request(s) without a prediction")
    if telemetry.unknown_predictions:
        problems.append(f"{telemetry.unknown_predictions} prediction(s) for requests never sent")
    if telemetry.deadletters:
        problems.append(f"{telemetry.deadletters} dead letter(s): {dict(telemetry.deadletter_reasons)}")
    if telemetry.outcomes_sent != answered:
        problems.append(f"{answered - telemetry.outcomes_sent} prediction(s) without an outcome sent")
    applied = final.outcome_counter if final is not None else None
    ledger = final.ledger_counts if final is not None else {}
    if applied != telemetry.outcomes_sent:
        problems.append(f"arm statistics counted {applied} outcome(s), {telemetry.outcomes_sent} were sent")
    joined = ledger.get("joined")
    if joined is None or int(joined) != telemetry.outcomes_sent:
        problems.append(f"feedback ledger joined {joined}, {telemetry.outcomes_sent} outcomes were sent")
    for arm in telemetry.arms:
        ledger_arm = int(ledger.get(f"joined|{arm}", 0))
        if ledger_arm != telemetry.outcomes_by_arm[arm]:
            problems.append(f"arm {arm}: ledger joined {ledger_arm}, {telemetry.outcomes_by_arm[arm]} sent")
    for kind in ("orphan", "invalid"):
        if ledger.get(kind):
            problems.append(f"{int(ledger[kind])} {kind} outcome(s)")
    details = {"requests_sent": sent, "predictions": answered, "prediction_duplicates": telemetry.prediction_duplicates,
               "outcomes_sent": telemetry.outcomes_sent, "arm_statistics_outcomes": applied,
               "ledger_joined": joined, "deadletters": telemetry.deadletters}
    if problems:
        return Check("accounting", False, "; ".join(problems), details)
    return Check("accounting", True, f"{sent} requests -> {answered} predictions "
                                     f"(+{telemetry.prediction_duplicates} duplicates ignored) -> "
                                     f"{telemetry.outcomes_sent} outcomes -> {applied} counted in the arm statistics "
                                     f"and {int(joined or 0)} joined in the ledger; 0 dead letters", details)


def check_lifecycle(telemetry: Telemetry, rollout: Mapping[str, Any] | None, released_s: float | None) -> Check:
    """The retrained version (classes swapped) must be rejected as a shadow and never serve."""
    arm = str(rollout["arm"]) if rollout and "arm" in rollout else f"{RETRAIN_MODEL}-v2"
    served = sum(1 for record in telemetry.predictions.values() if record.arm == arm)
    details: dict[str, object] = {"rollout": dict(rollout) if rollout else None, "served_as_primary": served,
                                  "released_s": released_s}
    if released_s is None:
        return Check("lifecycle", False, "the retrained version was never published (the run ended before)", details)
    if rollout is None or "error" in rollout:
        why = rollout["error"] if rollout else "no rollout record in Redis"
        return Check("lifecycle", False, f"no rollout of the retrained version ({why})", details)
    shadowed = sum(1 for (_, shadow) in telemetry.shadow_predictions if shadow == arm)
    details["shadow_predictions"] = shadowed
    verdict = (f"retrained {rollout['arm']} published at t={released_s:.1f}s, a shadow from "
               f"t={rollout['started_s']:.1f}s ({shadowed} shadow predictions), {rollout['stage']} at "
               f"t={rollout['decided_s']:.1f}s: {rollout['reason']}; served {served} requests")
    passed = rollout["stage"] == "rejected" and served == 0
    return Check("lifecycle", passed, verdict, details)


def check_processes(exit_codes: Mapping[str, int | None]) -> Check:
    bad = {name: code for name, code in exit_codes.items() if code != 0}
    text = ", ".join(f"{name} exit {code}" for name, code in exit_codes.items())
    return Check("processes", not bad, f"stopped with SIGTERM: {text}", dict(exit_codes))
