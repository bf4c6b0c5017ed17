"""`banditgate bench SCENARIO`: maps scenario names to their modules (imported on demand)."""

from __future__ import annotations

import importlib
from pathlib import Path

# scenario name -> module under loadtests/ exposing run(out: Path, quick: bool) -> int
SCENARIOS = {
    "kafka": "loadtests.bench_kafka",
    "bandit": "loadtests.bench_bandit",
    "drift": "loadtests.bench_drift",
    "drift-baselines": "loadtests.bench_drift_baselines",
    "feedback": "loadtests.bench_feedback",
    "http": "loadtests.bench_http",
    "faults": "loadtests.bench_faults",
    "lifecycle": "loadtests.bench_lifecycle",
    "interleave": "loadtests.bench_interleave",
    "export": "loadtests.bench_export",
    "scale": "loadtests.bench_scale",
    "client": "loadtests.bench_client",
    "gpu": "loadtests.bench_gpu",
}


class BenchError(Exception):
    """A benchmark could not run; one line saying why."""

    user_facing = True


def run_scenario(name: str, out: str, quick: bool = False) -> int:
    """Run one benchmark scenario, writing its JSON to `out`; return the exit code."""
    if name not in SCENARIOS:
        raise BenchError(f"unknown bench scenario {name!r}: choose one of {', '.join(SCENARIOS)}")
    try:
        module = importlib.import_module(SCENARIOS[name])
    except ModuleNotFoundError as exc:
        if exc.name == SCENARIOS[name]:
            raise BenchError(f"bench scenario {name!r}: its module {SCENARIOS[name]} is missing from this install") from None
        raise
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return int(module.run(out_path, quick=quick) or 0)
