"""The fault suite's quick run, `banditgate bench faults --quick`, as a real subprocess: every
scenario of the reliability issue runs against a Kafka and a Redis the suite starts for itself,
with the gateway and the feedback worker as real processes, and every target holds.

The numbers are read back from the output topics and Redis by the suite (never from the
processes' own counters); this test checks them against the targets, one assertion per target,
so a failure names the scenario and the key that missed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.bench_faults import zero_keys

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("gateway_kill_alo", "gateway_kill_eos", "feedback_kill", "broker_restart", "redis_outage", "overload",
             "malformed", "rebalance", "graceful_shutdown", "poison_model", "poison_values", "redis_readonly", "redis_oom",
             "hung_model", "oversize_output", "eos_broker_restart", "eos_txn_abort",
             "join_memory")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("faults") / "faults.json"
    env = {k: v for k, v in os.environ.items() if k not in ("BANDITGATE_KAFKA", "BANDITGATE_REDIS")}
    proc = subprocess.run([sys.executable, "-m", "banditgate.cli", "bench", "faults", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if not out.exists():
        pytest.fail(f"bench faults wrote no results (exit {proc.returncode}): {proc.stderr[-3000:]}", pytrace=False)
    return json.loads(out.read_text()), proc


def test_every_scenario_ran(quick_run) -> None:  # type: ignore[no-untyped-def]
    doc, proc = quick_run
    scenarios = doc["scenarios"]
    assert sorted(set(SCENARIOS) - set(scenarios)) == []
    errors = {name: r["error"] for name, r in scenarios.items() if "error" in r}
    assert errors == {}, proc.stderr[-3000:]


@pytest.mark.parametrize("name", SCENARIOS)
def test_nothing_lost_doubled_or_crashed(quick_run, name: str) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"][name]
    keys = zero_keys(name)
    assert [key for key in keys if key not in result] == []  # a count a scenario stopped reporting fails
    assert {key: result[key] for key in keys if result[key] != 0} == {}


def test_exactly_once_has_no_duplicates_and_at_least_once_reports_them(quick_run) -> None:  # type: ignore[no-untyped-def]
    scenarios = quick_run[0]["scenarios"]
    assert scenarios["gateway_kill_eos"]["duplicates"] == 0
    assert scenarios["gateway_kill_eos"]["answered"] == scenarios["gateway_kill_eos"]["sent"]
    assert isinstance(scenarios["gateway_kill_alo"]["duplicates"], int)  # reported, whatever it is
    assert scenarios["gateway_kill_alo"]["answered"] == scenarios["gateway_kill_alo"]["sent"]


def test_feedback_counts_exactly_across_kills(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["feedback_kill"]
    assert result["exact"], result["mismatches"]
    assert result["applied"] == result["expected_applied"]
    assert result["sigterm_exit_code"] == 0


def test_outages_recover_within_ten_seconds(quick_run) -> None:  # type: ignore[no-untyped-def]
    scenarios = quick_run[0]["scenarios"]
    for name in ("broker_restart", "redis_outage"):
        assert scenarios[name]["recovered_s"] is not None and scenarios[name]["recovered_s"] <= 10, name
    outage = scenarios["redis_outage"]
    assert outage["exact_arm_statistics"], outage["mismatches"]
    assert outage["answered_during_outage"] > 0  # routing went on on the last snapshot
    assert outage["gateway_outage_log_lines"] == 1  # one line for the outage, not one per request
    assert scenarios["broker_restart"]["unready_during_outage"]  # readiness said the broker was away
    assert scenarios["broker_restart"]["ready_after"]


def test_poison_is_refused_and_redis_refusing_writes_is_an_outage(quick_run) -> None:  # type: ignore[no-untyped-def]
    scenarios = quick_run[0]["scenarios"]
    poison = scenarios["poison_values"]
    assert poison["exact"] and poison["non_finite_values"] == 0, poison["mismatches"]
    assert poison["poison_accepted"] == 0 and poison["rejected_http"] == poison["poison_http"] > 0
    assert poison["dead_lettered"] == poison["poison_kafka"] + poison["bad_name_predictions"]
    for name in ("redis_readonly", "redis_oom"):
        result = scenarios[name]
        assert result["exact_arm_statistics"], result["mismatches"]
        assert result["recovered_s"] is not None and result["recovered_s"] <= 10, name
        assert result["feedback_outage_log_lines"] >= 1 and result["feedback_fatal_log_lines"] == 0, name


def test_overload_memory_stays_bounded_and_http_is_told_to_retry(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["overload"]
    assert result["max_rss_mb"] <= 1.5 * result["steady_rss_mb"]
    assert result["rejected_http"] > 0
    assert result["retry_after_missing"] == 0


def test_garbage_is_dead_lettered_and_good_input_answered(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["malformed"]
    assert result["dead_lettered"] == result["bad_sent"]
    assert result["good_answered"] == result["good_sent"]
    assert result["http_garbage"]["5xx"] == 0 and result["http_garbage"]["no_answer"] == 0


def test_a_crashing_model_is_drained_to_the_floor_with_one_alert(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["poison_model"]
    assert result["drained"]
    assert result["guardrail_alerts"] == 1
    assert result["answered"] + result["failed_on_broken_arm"] == result["sent"]  # every request accounted for
    # after the drain only the exploration floor's share reaches the broken arm (binomial noise allowed)
    assert result["broken_share_after_drain"] <= 2 * result["exploration_floor"]


def test_a_hung_model_is_isolated_and_drained(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["hung_model"]
    assert result["other_route_p99_ratio"] <= 2  # the other route's p99 under the hang / its own baseline
    assert result["drained"]
    assert result["hung_arm_dead_lettered"] > 0 and result["wrong_reason"] == 0  # failed fast, model_unavailable
    assert result["healthy_model_timeouts"] == 0


def test_refused_outputs_are_dead_lettered_and_exactly_once_survives_broker_and_transaction_faults(quick_run) -> None:  # type: ignore[no-untyped-def]
    scenarios = quick_run[0]["scenarios"]
    oversize = scenarios["oversize_output"]
    assert oversize["oversize_sent"] > 0 and oversize["oversize_dead_lettered"] == oversize["oversize_sent"]
    assert oversize["duplicates"] == 0  # no endless rewind republishing the batch's other predictions
    for name in ("eos_broker_restart", "eos_txn_abort"):
        assert scenarios[name]["duplicates"] == 0 and scenarios[name]["lost"] == 0, name
    assert scenarios["eos_broker_restart"]["recovered_s"] is not None and scenarios["eos_broker_restart"]["recovered_s"] <= 10
    assert scenarios["eos_txn_abort"]["intrusions"] > 0 and not scenarios["eos_txn_abort"]["stalled"]


def test_sigterm_exits_zero_within_the_grace_period(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["graceful_shutdown"]
    assert result["exit_code"] == 0
    assert result["exit_s"] <= result["grace_s"]
    assert result["duplicates"] == 0  # a graceful stop commits what it answered


def test_the_suite_exits_zero(quick_run) -> None:  # type: ignore[no-untyped-def]
    doc, proc = quick_run
    assert doc["failed_targets"] == []
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_join_state_stays_within_its_budget(quick_run) -> None:  # type: ignore[no-untyped-def]
    result = quick_run[0]["scenarios"]["join_memory"]
    assert (result["lost"], result["crashes"]) == (0, 0)
    assert result["max_rss_mb"] <= 1.5 * result["budget_mb"] + 200
    assert result["evicted"] + result["held"] == result["sent"]  # every prediction evicted (counted) or held
