"""`banditgate demo --quick` end to end: real stack, real subprocesses, exit 0 and a full report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHECKS = ("bandit", "drift", "accounting", "processes")


def test_demo_quick_passes_and_writes_the_report(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "banditgate.cli", "demo", "--quick", "--report-dir", str(report)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("demo PASS") and str(report / "summary.md") in last, last

    for name in ("summary.md", "traffic_share.png", "cumulative_reward.png", "drift.png", "counts.json",
                 "alerts.jsonl", "banditgate.yaml", "logs/serve.log", "logs/feedback.log"):
        assert (report / name).is_file(), f"{name} missing from the report"
    for name in ("traffic_share.png", "cumulative_reward.png", "drift.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    summary = (report / "summary.md").read_text()
    assert summary.startswith("# banditgate demo (quick): PASS")
    for check in CHECKS:
        assert f"| {check} | pass |" in summary, f"the summary does not state that check {check} passed"

    # start-up measured and stated (how fast is a benchmark, not asserted here)
    assert re.search(r"gateway ready after [0-9.]+ s", summary) and re.search(r"feedback worker ready after [0-9.]+ s",
                                                                             summary)
    assert "### Where the end-to-end time goes" in summary
    # one `firing` alert per drift / quality episode key; the drift table lists the episodes
    firing: Counter[tuple[object, ...]] = Counter()
    for line in (report / "alerts.jsonl").read_text().splitlines():
        alert = json.loads(line)
        if alert["kind"] in ("drift", "quality") and alert.get("state") != "resolved":
            assert alert["state"] == "firing" and "model" in alert["details"] and "feature" in alert["details"]
            details = alert["details"]
            firing[(alert["route"], alert["arm"], details["model"], alert["model_version"], alert["metric"],
                    details["feature"])] += 1
    assert firing and max(firing.values()) == 1, firing
    assert "alarm episode(s)" in summary and "| opened t (s) |" in summary

    counts = json.loads((report / "counts.json").read_text())
    assert counts["requests_sent"] == counts["predictions_unique"] == counts["outcomes_sent"]
    assert counts["redis_arm_statistics_outcome_counter"] == counts["outcomes_sent"]
    assert counts["alerts_by_kind"].get("drift", 0) >= 1
    # the feedback worker ran in the report's own work folder, which the demo removes at the end
    assert not list(tmp_path.glob("*-data")) and not (report / ".work").exists()
