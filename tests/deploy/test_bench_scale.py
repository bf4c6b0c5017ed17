"""`banditgate bench scale`: the window arithmetic, the Redis deltas and the JSON keys the deploy
check reads (pure, no stack), and the quick run end to end as a real subprocess (stack, slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.bench_scale import Sample, commandstats_delta, markdown, redis_per_unit, summary, window
from loadtests.registry import SCENARIOS

REPO = Path(__file__).resolve().parents[2]
KEYS = ("one_replica_rps", "two_replicas_rps", "scaling_ratio", "one_worker_ops", "two_workers_ops",
        "workers_scaling_ratio", "cores")


def _samples(points: list[tuple[float, int, float]]) -> list[Sample]:
    return [Sample(t, done, cpu) for t, done, cpu in points]


def test_window_opens_at_t0_and_ends_at_ninety_percent() -> None:
    # 1 000 done before the window (outside it), then 1 000/s on 0.5 cores, 90% of 10 000 at t = 9
    samples = _samples([(0.0, 0, 0.0), (1.0, 1000, 0.5)] + [(1.0 + k, 1000 + 1000 * k, 0.5 + 0.5 * k) for k in range(1, 10)])
    got = window(samples, t0=1.0, total=10_000)
    assert got["rate"] == 1000.0
    assert got["per_cpu_s"] == 2000.0
    assert got["cpu_cores"] == 0.5
    assert got["window_s"] == 8.0
    assert got["counted"] == 8000
    assert got["done_at_start"] == 1000
    assert got["reached"] is True


def test_window_ends_at_the_cap_when_the_goal_is_not_reached() -> None:
    got = window(_samples([(0.0, 0, 0.0), (2.0, 500, 1.0)]), t0=0.0, total=10_000)
    assert (got["rate"], got["reached"]) == (250.0, False)


@pytest.mark.parametrize("samples", [
    [(0.0, 10_000, 0.0), (1.0, 10_000, 0.1)],  # the backlog was done before the window opened
    [(5.0, 100, 0.0)],  # one sample only
])
def test_an_empty_window_is_an_error_not_a_rate(samples: list[tuple[float, int, float]]) -> None:
    with pytest.raises(ValueError, match="window"):
        window(_samples(samples), t0=0.0, total=10_000)


def test_commandstats_delta_leaves_out_the_benchs_own_commands() -> None:
    before = {"cmdstat_hget": {"calls": 5}}
    after = {"cmdstat_hget": {"calls": 20}, "cmdstat_info": {"calls": 9}, "cmdstat_config|resetstat": {"calls": 1},
             "cmdstat_evalsha": {"calls": 3}, "cmdstat_hsetnx": {"calls": 300}}
    assert commandstats_delta(before, after, own={"hget": 10}) == {"hsetnx": 300, "evalsha": 3, "hget": 5}


def test_redis_per_unit() -> None:
    got = redis_per_unit({"hsetnx": 300, "evalsha": 3, "set": 100}, cpu_s=0.004, units=100, footprint=(200, 40_000))
    assert got["commands"] == 4.03
    assert got["scripts"] == 0.03
    assert got["cpu_us"] == 40.0
    assert (got["keys"], got["memory_bytes"]) == (2.0, 400.0)
    assert list(got["by_command"]) == ["hsetnx", "evalsha", "set"]


def _phase(rate: float, per_cpu: float) -> dict:
    return {"rate": rate, "per_cpu_s": per_cpu, "cpu_cores": 0.8, "window_s": 10.0, "counted": int(rate * 10),
            "n": 100_000, "crashes": 0, "redis": {"units": 100, "commands": 5.0, "scripts": 0.01, "cpu_us": 30.0,
                                                  "keys": 2.0, "memory_bytes": 150.0, "by_command": {"set": 1.0}}}


def test_summary_has_the_keys_the_deploy_check_reads_and_the_table_says_the_cores() -> None:
    phases = {"gateway_x1": _phase(10_000, 14_000), "gateway_x2": _phase(15_000, 13_000),
              "worker_x1": _phase(4_000, 5_000), "worker_x2": {"error": "RuntimeError: gone", "n": 100}}
    doc = summary(phases, cores=2, load_average=[1.0, 1.0, 1.0], quick=True)
    assert [k for k in KEYS if k not in doc] == []
    assert doc["scaling_ratio"] == 1.5
    assert doc["two_workers_ops"] is None and doc["workers_scaling_ratio"] is None
    assert (doc["gateway_rps_per_core"], doc["worker_ops_per_core"]) == (14_000, 5_000)
    json.dumps(doc)  # serialisable as it is
    table = markdown(doc)
    assert "This machine has 2 cores" in table
    assert "| feedback worker | 2 | error: RuntimeError: gone |" in table
    assert "| gateway (`serve`) | 2 | 15,000 | requests/s | 13,000 |" in table


def test_the_cli_and_readme_name_the_scenario() -> None:
    assert SCENARIOS["scale"] == "loadtests.bench_scale"
    from banditgate.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    help_text = next(a.help for a in bench._actions if a.dest == "scenario")
    assert "scale" in (help_text or "")
    assert "`scale`" in (REPO / "README.md").read_text()


@pytest.mark.stack
@pytest.mark.slow
def test_quick_run_measures_one_and_two_of_each(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    env = {k: v for k, v in os.environ.items() if k not in ("BANDITGATE_KAFKA", "BANDITGATE_REDIS")}
    proc = subprocess.run([sys.executable, "-m", "banditgate.cli", "bench", "scale", "--quick", "--out", str(out)],  # noqa: S603
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    errors = {name: p["error"] for name, p in doc["phases"].items() if "error" in p}
    assert errors == {}, proc.stderr[-3000:]
    assert {name: p["crashes"] for name, p in doc["phases"].items() if p["crashes"]} == {}
    assert [k for k in KEYS if doc.get(k) is None] == []
    assert min(doc[k] for k in KEYS) > 0
    # the worker's ledger ran: outcomes cost Redis commands (script calls among them)
    assert doc["redis_per_outcome"]["scripts"] > 0
    assert out.with_suffix(".md").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
