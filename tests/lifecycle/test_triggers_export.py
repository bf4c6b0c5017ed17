"""Retraining triggers (cooldown, windows) and the Parquet export (atomic, manifest, exact rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banditgate.config import Retrain
from banditgate.events import decode_alert, encode
from feedback.export import ExportError, join_rows, read_export, write_export
from feedback.triggers import TriggerState, due, evaluate, retrain_alert

pytest.importorskip("pyarrow")


def test_new_labels_fires_once_per_threshold_and_windows_tile() -> None:
    config = Retrain(new_labels=100, cooldown_s=0)
    state, fired, windows = TriggerState(), [], []
    for second in range(1, 1001):  # 7 outcomes per second, checked every second
        state = state.with_labels(7, now=float(second))
        decision = evaluate(state, config, now=float(second))
        state = decision.state
        if decision.fired:
            fired.append(decision.labels)
            windows.append(decision.window)
    # checked once per 7 outcomes: each window holds the first multiple of 7 >= 100, i.e. 105
    assert fired == [105] * (7000 // 105) and sum(fired) + state.labels_since == 7000
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # no gap, no overlap
    assert state.fired_total == len(fired) and state.seq == len(fired)


def test_cooldown_holds_every_trigger_and_counts_suppressed_alarms() -> None:
    config = Retrain(new_labels=10, quality=True, drift=True, cooldown_s=100)
    state = TriggerState().with_labels(10, now=0.0)
    first = evaluate(state, config, now=0.0)
    assert first.fired and first.reasons == ("new_labels",)
    held = evaluate(first.state.with_labels(50, now=5.0), config, now=5.0, alarms={"quality", "drift"})
    assert not held.fired and held.cooling_until == 100.0 and held.state.suppressed_total == 2
    later = evaluate(held.state, config, now=100.0, alarms={"drift"})
    assert later.fired and later.reasons == ("new_labels", "drift") and later.labels == 50 and later.window == (0.0, 100.0)


def test_schedule_and_disabled_alarms() -> None:
    config = Retrain(every_s=60, cooldown_s=0)
    state = TriggerState().with_labels(1, now=0.0)
    assert due(state, config, now=59.0, alarms={"quality"}) == ()  # quality not enabled
    decision = evaluate(state, config, now=60.0)
    assert decision.fired and decision.reason == "every"
    assert not evaluate(decision.state, config, now=119.0).fired
    assert evaluate(decision.state, config, now=120.0).fired
    assert TriggerState.from_dict(json.loads(json.dumps(decision.state.to_dict()))) == decision.state


def test_retrain_alert_round_trips_on_the_alerts_contract() -> None:
    config = Retrain(new_labels=5, cooldown_s=0)
    decision = evaluate(TriggerState().with_labels(5, now=1.0), config, now=2.0)
    alert = retrain_alert(decision, route="churn", model="churn-gbm", model_version=3, config=config,
                          export_manifest="/data/churn/x/manifest.json")
    back = decode_alert(encode(alert))
    assert back.kind == "retrain" and back.route == "churn" and back.model_version == 3
    assert back.details["window_start"] == 1.0 and back.details["window_end"] == 2.0
    assert back.details["reason"] == "new_labels" and back.details["model"] == "churn-gbm"
    with pytest.raises(ValueError):
        retrain_alert(evaluate(TriggerState(), config, 0.0), "churn", "m", 1, config)


def _events(n: int) -> tuple[list[dict], list[dict], list[dict]]:
    requests, predictions, outcomes = [], [], []
    for i in range(n):
        rid = f"r{i}"
        requests.append({"request_id": rid, "route": "churn", "inputs": {"x": [float(i), 1.0]}, "ts": 100.0 + i})
        predictions.append({"request_id": rid, "route": "churn", "arm": "a" if i % 3 else "b", "model": "m",
                            "model_version": 1 + i % 2, "policy": "thompson", "propensity": 0.5 + (i % 3) / 10,
                            "outputs": {"probability": [0.3]}, "ts_request": 100.0 + i, "ts_predicted": 100.5 + i,
                            "latency_ms": 2.0})
        if i % 4 == 0:
            predictions.append({**predictions[-1], "arm": "c", "model_version": 9, "shadow": True, "primary_arm": "a"})
        if i % 5:
            outcomes.append({"request_id": rid, "reward": float(i % 2), "label": i % 2, "ts": 200.0 + i})
    predictions.append({**predictions[0], "request_id": "other", "route": "fraud"})
    outcomes.append({"request_id": "other", "reward": 1.0, "ts": 210.0})
    return requests, predictions, outcomes


def test_export_rows_equal_the_joined_outcomes_of_the_window(tmp_path: Path) -> None:
    requests, predictions, outcomes = _events(400)
    rows = join_rows(requests, predictions, outcomes, route="churn", since=250.0, until=450.0)
    window_ids = {o["request_id"] for o in outcomes if 250.0 <= o["ts"] < 450.0 and o["request_id"] != "other"}
    assert {r["request_id"] for r in rows if not r["shadow"]} == window_ids
    assert sum(not r["shadow"] for r in rows) == len(window_ids)
    assert all(r["reward"] is None for r in rows if r["shadow"])
    manifest = write_export(rows, str(tmp_path / "exports"), "churn", 250.0, 450.0, reason="new_labels",
                            rows_per_file=64)
    folder = Path(manifest.path)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f["name"] for f in manifest.files] + ["manifest.json"])
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    stored, table = read_export(str(folder))
    assert stored["rows"] == len(rows) == table.num_rows == sum(f["rows"] for f in stored["files"])
    assert stored["ts_outcome_min"] == min(r["ts_outcome"] for r in rows)
    assert stored["ts_outcome_max"] == max(r["ts_outcome"] for r in rows) < 450.0
    assert table.column("request_id").to_pylist() == [r["request_id"] for r in rows]
    assert table.column("propensity").to_pylist() == [r["propensity"] for r in rows]
    assert table.column("inputs").to_pylist()[0] == rows[0]["inputs"]


def test_mixed_labels_go_to_json_and_a_missing_manifest_is_incomplete(tmp_path: Path) -> None:
    rows = [{"request_id": "1", "label": "cat", "ts_outcome": 1.0}, {"request_id": "2", "label": 3, "ts_outcome": 2.0}]
    manifest = write_export(rows, str(tmp_path), "r", 0.0, None)
    assert manifest.json_columns == ("label",)
    _, table = read_export(manifest.path)
    assert [json.loads(v) for v in table.column("label").to_pylist()] == ["cat", 3]
    (Path(manifest.path) / "manifest.json").unlink()
    with pytest.raises(ExportError, match="not a complete export"):
        read_export(manifest.path)
