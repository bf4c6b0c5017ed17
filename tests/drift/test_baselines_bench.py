"""`banditgate bench drift-baselines`: river's detectors on the drift benchmark's streams. river is
not a dependency: without it the command says so in one line; with it, the quick run reports
every kind and detector."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def test_drift_baselines_runs_or_says_river_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "baselines.json"
    proc = subprocess.run([sys.executable, "-m", "banditgate.cli", "bench", "drift-baselines", "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=300, check=False)
    if importlib.util.find_spec("river") is None:
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert "needs river" in last and "pip install river" in last and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["kinds"]) == {"mean", "variance", "shape", "prior", "error_rate"}
    for by_detector in report["kinds"].values():
        assert set(by_detector) == {"adwin", "page_hinkley"}
        assert all(0.0 <= row["detected"] <= 1.0 for row in by_detector.values())
    assert set(report["stationary_false_alarms_per_10k"]) == {"normal", "lognormal", "poisson", "categorical"}
