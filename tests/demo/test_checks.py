"""The demo's verdict logic (pure): drift timing, accounting, best-arm share; and the scenario."""

from __future__ import annotations

import numpy as np
import pytest

from demo.checks import OracleLabels, check_accounting, check_bandit, check_drift, check_processes
from demo.scenario import Scenario
from demo.telemetry import Sample, Telemetry

SCENARIO = Scenario(name="test", rate_rps=10, drift_at_s=10, degrade_at_s=20, end_s=30, outcome_delay_mean_s=1,
                    half_life=100, exploration_floor=0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def telemetry() -> tuple[Telemetry, Clock]:
    clock = Clock()
    tel = Telemetry(["a", "b"], ["s"], clock=clock)
    tel.start()
    return tel, clock


def prediction(request_id: str, arm: str, label: int, version: int = 1) -> dict[str, object]:
    return {"request_id": request_id, "arm": arm, "model": arm, "model_version": version, "propensity": 0.5,
            "outputs": {"label": label, "probabilities": [1.0 - label, float(label)]}, "latency_ms": 2.0}


def test_drift_alarm_before_the_shift_fails_and_after_passes() -> None:
    tel, _ = telemetry()
    assert tel.wall0 is not None
    alarm = {"kind": "drift", "model_version": 1, "value": 9.0, "threshold": 8.0,
             "details": {"model": "a", "feature": "mean_texture"}}
    tel.record_alert({**alarm, "ts": tel.wall0 + 12.0})
    passed = check_drift(tel, SCENARIO, gauges_seen=True)
    assert passed.passed and passed.details["after_shift"] == 1 and passed.details["on_shifted_features"] == 1
    tel.record_alert({**alarm, "ts": tel.wall0 + 3.0})
    failed = check_drift(tel, SCENARIO, gauges_seen=True)
    assert not failed.passed and "before the shift" in failed.summary


def test_drift_check_fails_without_any_alarm() -> None:
    tel, _ = telemetry()
    assert "no drift alerts and no banditgate_drift" in check_drift(tel, SCENARIO, gauges_seen=False).summary
    assert "no drift alarm after the shift" in check_drift(tel, SCENARIO, gauges_seen=True).summary


def _served(tel: Telemetry, clock: Clock, n: int, arm: str, label: int = 1) -> list[str]:
    ids = []
    for i in range(n):
        request_id = f"{arm}-{len(tel.requests)}"
        tel.record_sent(request_id, row=i % 4, shifted=False, label=label)
        assert tel.record_prediction(prediction(request_id, arm, label), shadow=False) is not None
        tel.record_outcome(request_id, arm, 1.0)
        ids.append(request_id)
        clock.now += 0.1
    return ids


def test_accounting_counts_every_request_and_outcome() -> None:
    tel, clock = telemetry()
    ids = _served(tel, clock, 5, "a") + _served(tel, clock, 3, "b")
    assert tel.record_prediction(prediction(ids[0], "a", 1), shadow=False) is None  # a redelivered prediction
    final = Sample(t_s=1.0, outcome_counter=8, ledger_counts={"joined": 8, "joined|a": 5, "joined|b": 3})
    check = check_accounting(tel, final)
    assert check.passed, check.summary
    assert check.details["prediction_duplicates"] == 1


@pytest.mark.parametrize("final, message", [
    (Sample(t_s=1.0, outcome_counter=7, ledger_counts={"joined": 8, "joined|a": 5, "joined|b": 3}),
     "arm statistics counted 7"),
    (Sample(t_s=1.0, outcome_counter=8, ledger_counts={"joined": 8, "joined|a": 6, "joined|b": 2}),
     "arm a: ledger joined 6"),
    (Sample(t_s=1.0, outcome_counter=8, ledger_counts={"joined": 8, "joined|a": 5, "joined|b": 3, "orphan": 1}),
     "1 orphan"),
    (None, "arm statistics counted None"),
])
def test_accounting_names_what_is_missing(final: Sample | None, message: str) -> None:
    tel, clock = telemetry()
    _served(tel, clock, 5, "a")
    _served(tel, clock, 3, "b")
    check = check_accounting(tel, final)
    assert not check.passed and message in check.summary


def test_accounting_fails_for_an_unanswered_request() -> None:
    tel, clock = telemetry()
    _served(tel, clock, 2, "a")
    tel.record_sent("lost", row=0, shifted=False, label=1)
    final = Sample(t_s=1.0, outcome_counter=2, ledger_counts={"joined": 2, "joined|a": 2})
    assert "1 request(s) without a prediction" in check_accounting(tel, final).summary


def test_bandit_check_wants_most_traffic_on_the_truly_best_arm() -> None:
    tel, clock = telemetry()
    # arm a is right on every pool row, b on none; before the release a serves 80%, after it b does
    right, wrong = OracleLabels(np.ones(4, int), np.ones(4, int)), OracleLabels(np.zeros(4, int), np.zeros(4, int))
    for second in range(30):
        clock.now = tel.t0 + second + 0.5  # type: ignore[operator]
        favourite, other = ("a", "b") if second < 20 else ("b", "a")
        for i in range(5):
            request_id = f"r{second}-{i}"
            tel.record_sent(request_id, row=i % 4, shifted=False, label=1)
            tel.record_prediction(prediction(request_id, favourite if i < 4 else other, 1), shadow=False)
    good = check_bandit(tel, SCENARIO, {"a": right, "b": wrong}, {"a": wrong, "b": right})
    assert good.passed, good.summary
    assert "best arm a" in good.summary and "best arm b" in good.summary
    bad = check_bandit(tel, SCENARIO, {"a": wrong, "b": right}, {"a": wrong, "b": right})
    assert not bad.passed


def test_processes_must_exit_zero() -> None:
    assert check_processes({"serve": 0, "feedback": 0}).passed
    assert not check_processes({"serve": 0, "feedback": 1}).passed
    assert not check_processes({"serve": None, "feedback": 0}).passed


def test_scenario_phases_and_shift() -> None:
    assert [SCENARIO.phase(t) for t in (0, 9.9, 10, 19.9, 20, 29)] == ["baseline"] * 2 + ["shift"] * 2 + ["broken"] * 2
    rows = np.ones((3, 3), dtype=np.float32)
    scenario = Scenario(**{**SCENARIO.__dict__, "drift_features": ("y",), "drift_factor": 2.0})
    shifted = scenario.shifted(rows, ["x", "y", "z"])
    assert shifted[:, 1].tolist() == [2.0] * 3 and shifted[:, [0, 2]].tolist() == [[1.0, 1.0]] * 3
    assert rows[0, 1] == 1.0  # a copy
    with pytest.raises(ValueError, match="scenario times"):
        Scenario(name="bad", rate_rps=1, drift_at_s=5, degrade_at_s=4, end_s=10, outcome_delay_mean_s=1,
                 half_life=1, exploration_floor=0)
