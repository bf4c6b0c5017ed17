"""The compose traffic generator's pure parts: rows file checks, rewards, the bounded pending map."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.compose_traffic import Pending, TrafficError, load_rows, main, outcome_for, served_label


def test_rows_file_is_checked_at_the_edge(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,b,label\n1.5,2,1\n0.1,3e2,0\n")
    rows = load_rows(path)
    assert rows.feature_names == ["a", "b"] and rows.labels == [1, 0]
    assert rows.values[1] == [pytest.approx(0.1), 300.0]
    for text, message in [("a,b\n1,2\n", "ending in `label`"), ("a,label\n1,2,3\n", ":2: 3 columns"),
                          ("a,label\nx,1\n", ":2: not a number"), ("a,label\nnan,1\n", "not finite")]:
        path.write_text(text)
        with pytest.raises(TrafficError, match=message):
            load_rows(path)
    with pytest.raises(TrafficError, match="cannot read the rows file"):
        load_rows(tmp_path / "missing.csv")


def test_reward_is_one_when_the_served_label_is_the_truth() -> None:
    assert served_label({"outputs": {"label": [1]}}) == 1
    assert served_label({"outputs": {"label": 0}}) == 0
    assert served_label({"outputs": {"label": [0, 1]}}) is None
    assert served_label({"outputs": {"label": True}}) is None
    assert served_label({}) is None
    right = outcome_for("r1", {"outputs": {"label": [1]}}, truth=1, now=5.0)
    wrong = outcome_for("r2", {"outputs": {}}, truth=0, now=5.0)
    assert (right.reward, right.label, right.ts) == (1.0, 1, 5.0)
    assert (wrong.reward, wrong.label) == (0.0, 0)


def test_pending_forgets_the_oldest_past_its_limit() -> None:
    pending = Pending(limit=2)
    for i in range(3):
        pending.add(f"r{i}", i % 2)
    assert len(pending) == 2 and pending.forgotten == 1
    assert pending.pop("r0") is None and pending.pop("r2") == 0 and pending.pop("r2") is None


def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(tmp_path / "none.yaml"), "--rows", "x.csv", "--rate", "0"]) == 1
    assert capsys.readouterr().err.strip() == ("traffic: error: --rate must be in (0, 10000], --duration-s in "
                                               "(0, 604800], --outcome-delay-s >= 0")
