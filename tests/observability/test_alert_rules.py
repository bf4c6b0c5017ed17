"""The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`), and
cover what operators are paged for."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.observability.support import ALERTS, ROOT, RULE_TESTS, alert_rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH (Debian: apt-get install prometheus)")


@needs_promtool
def test_promtool_check_rules() -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules() -> None:
    result = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_the_paging_cases() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    wanted = {
        "BanditgateDriftEpisode": "banditgate_drift_episodes_open",
        "BanditgateQualityDriftEpisode": "banditgate_quality_drift_alarm",
        "BanditgateQualityDrop": "banditgate_quality_accuracy_ratio",
        "BanditgateRewardDrop": "banditgate_quality_reward_mean",
        "BanditgateArmDrained": "banditgate_arm_drained",
        "BanditgateHighErrorRate": "banditgate_requests_total",
        "BanditgateHighLatencyP99": "banditgate_end_to_end_seconds_bucket",
        "BanditgateConsumerLagHigh": "banditgate_consumer_lag_messages",
        "BanditgateJoinBacklogHigh": "banditgate_feedback_join_entries",
        "BanditgateOrphanedOutcomes": 'result="orphan"',
        "BanditgateRedisUnavailable": "banditgate_redis_up",
        "BanditgateFeedbackRedisWritesFailing": 'sink="redis"',
    }
    for name, needle in wanted.items():
        assert name in rules, f"no alert {name}"
        assert needle in rules[name]["expr"], (name, rules[name]["expr"])
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]

