"""Static security lint: bandit (from PyPI, runs offline) over gateway/, router/ and feedback/ finds no
medium- or high-severity issue that is not waived in place, and every waiver names the check and
says why (``# nosec B603: fixed argv, no shell``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "router", "feedback")
WAIVER = re.compile(r"#\s*nosec\b(?P<rest>.*)$")
WAIVER_WITH_REASON = re.compile(r"^\s*(B\d{3}(\s*,\s*B\d{3})*)\s*[:\-–]\s*\S.{4,}")


def _bandit(*targets: str | Path) -> list[dict]:
    result = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "bandit", "-q", "-r", *map(str, targets), "-ll", "-f", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.stdout.strip(), f"bandit did not run (exit {result.returncode}): {result.stderr[-2000:]}"
    return list(json.loads(result.stdout)["results"])


def test_security_bandit_finds_no_unwaived_medium_or_high_issue() -> None:
    findings = _bandit(*PACKAGES)
    assert findings == [], "\n".join(f"{f['filename']}:{f['line_number']} {f['test_id']} {f['issue_severity']}: "
                                     f"{f['issue_text']}" for f in findings)


def test_security_waivers_name_the_check_and_the_reason() -> None:
    bare = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = WAIVER.search(line)
                if match and not WAIVER_WITH_REASON.match(match.group("rest")):
                    bare.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert bare == [], "waive a bandit finding as `# nosec B###: why it is safe here`:\n" + "\n".join(bare)


def test_security_lint_catches_a_planted_issue_and_honours_a_reasoned_waiver(tmp_path: Path) -> None:
    """The lint is not vacuous: the same run flags a medium (yaml.load) and a high (shell=True)
    finding, and a waiver in place silences only its own line."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import subprocess\nimport yaml\n\n\n"
        "def unsafe(text, command):\n"
        "    yaml.load(text, Loader=yaml.Loader)\n"
        "    subprocess.call(command, shell=True)\n"
        "    return yaml.load(text, Loader=yaml.Loader)  # nosec B506: the text is our own fixture\n")
    findings = _bandit(planted)
    assert sorted((f["test_id"], f["line_number"]) for f in findings) == [("B506", 6), ("B602", 7)]
    assert {f["issue_severity"] for f in findings} == {"MEDIUM", "HIGH"}
