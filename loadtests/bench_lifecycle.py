"""`banditgate bench lifecycle`: progressive rollout of new versions on delayed labels.

Four scenarios (:mod:`loadtests.lifecycle_sim`, real state machine, shadow test, router and
guardrail), each over many seeds; the incumbent's reward rate is 0.30, outcomes arrive after an
exponential delay (mean 1 500 requests), snapshots refresh every 250 requests, time is counted in
requests (the rollout's seconds are requests here):

* ``better``      - the new version earns 0.36: it should go shadow -> canary -> full;
* ``worse``       - it earns 0.24: it should be rejected at the shadow stage;
* ``bad_canary``  - it looks better on labels (accuracy 0.36) but earns 0.22 when it serves:
                    it passes the shadow test and must be rolled back at the canary stage;
* ``slow_canary`` - better on labels and reward, but its p99 latency (~480 ms) breaks the 250 ms
                    limit: rolled back at the canary stage.

Reports ``outcomes_to_promote`` (median route outcomes from a better version's arrival until it
is a full arm), ``bad_exposure_rate`` (share of seeds of the three unwanted versions in which the
policy ever gave the candidate more than the canary cap; goal 0), ``outcomes_to_rollback``
(median route outcomes from a bad canary's start to its rollback) and ``rollout_regret`` (mean
expected reward lost per rollout, over all four scenarios, against an oracle that switches to the
better acceptable version the moment it arrives). Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from banditgate.config import Guardrail, Rollout
from loadtests.lifecycle_sim import Run, Scenario, Version, simulate

SEED = 20_250_611
SEEDS = 128
QUICK_SEEDS = 6

CONFIG = Rollout(shadow={"min_outcomes": 200, "confidence": 0.95, "margin": 0.0},
                 canary={"max_share": 0.1, "min_outcomes": 300, "confidence": 0.95, "margin": 0.01,
                         "max_error_rate": 0.02, "max_p99_latency_ms": 250.0, "min_calls": 200},
                 grace_s=1_000)
GUARDRAIL = Guardrail()
INCUMBENT = Version(reward_rate=0.30)
SCENARIOS = (
    Scenario("better", INCUMBENT, Version(reward_rate=0.36)),
    Scenario("worse", INCUMBENT, Version(reward_rate=0.24)),
    Scenario("bad_canary", INCUMBENT, Version(reward_rate=0.22, label_accuracy=0.36)),
    Scenario("slow_canary", INCUMBENT, Version(reward_rate=0.36, median_latency_ms=150.0)),
)
UNWANTED = ("worse", "bad_canary", "slow_canary")


def _say(message: str) -> None:
    print(f"bench lifecycle: {message}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarise(runs: dict[str, list[Run]], seconds: float) -> dict[str, Any]:
    cap = CONFIG.canary.max_share
    per: dict[str, Any] = {}
    for scenario in SCENARIOS:
        results = runs[scenario.name]
        finals = [r.final_stage for r in results]
        promote = [r.outcomes_at["full"] for r in results if "full" in r.outcomes_at]
        canary_start = [r.outcomes_at["canary"] for r in results if "canary" in r.outcomes_at]
        rollback = [r.outcomes_at["rolled_back"] - r.outcomes_at["canary"] for r in results
                    if "rolled_back" in r.outcomes_at and "canary" in r.outcomes_at]
        rejected = [r.outcomes_at["rejected"] for r in results if "rejected" in r.outcomes_at]
        per[scenario.name] = {
            "seeds": len(results),
            "final_stages": {stage: finals.count(stage) for stage in sorted(set(finals))},
            "outcomes_to_canary_median": _median(canary_start),
            "outcomes_to_full_median": _median(promote),
            "outcomes_to_full_quartiles": [float(q) for q in np.percentile(promote, [25, 75])] if promote else None,
            "outcomes_to_reject_median": _median(rejected),
            "canary_outcomes_to_rollback_median": _median(rollback),
            "requests_to_full_median": _median([r.stage_at["full"] - r.stage_at["shadow"] for r in results
                                                if "full" in r.stage_at]),
            "max_candidate_share": max(r.max_candidate_share for r in results),
            "seeds_over_cap": sum(r.max_candidate_share > cap + 1e-9 for r in results),
            "served_by_candidate_mean": float(np.mean([r.served_by_candidate for r in results])),
            "regret_mean": float(np.mean([r.regret for r in results])),
            "regret_standard_error": float(np.std([r.regret for r in results], ddof=1) / np.sqrt(len(results)))
            if len(results) > 1 else 0.0,
            "oracle_rate": scenario.oracle_rate(CONFIG),
            "candidate": {"reward_rate": scenario.candidate.reward_rate, "label_accuracy": scenario.candidate.accuracy,
                          "p99_latency_ms": round(scenario.candidate.p99_latency_ms, 1)},
            "example_transitions": results[0].transitions,
        }
    unwanted = [r for name in UNWANTED for r in runs[name]]
    better = per["better"]
    return {
        "outcomes_to_promote": better["outcomes_to_full_median"] or 0.0,
        "bad_exposure_rate": sum(r.max_candidate_share > cap + 1e-9 for r in unwanted) / len(unwanted),
        "outcomes_to_rollback": per["bad_canary"]["canary_outcomes_to_rollback_median"] or 0.0,
        "rollout_regret": float(np.mean([per[s.name]["regret_mean"] for s in SCENARIOS])),
        # context
        "promoted_fraction": better["final_stages"].get("full", 0) / better["seeds"]
        + better["final_stages"].get("done", 0) / better["seeds"],
        "outcomes_to_rollback_latency": per["slow_canary"]["canary_outcomes_to_rollback_median"] or 0.0,
        "canary_cap": cap,
        "incumbent_rate": INCUMBENT.reward_rate,
        "horizon_requests": SCENARIOS[0].horizon,
        "arrival_request": SCENARIOS[0].arrival,
        "delay_mean_requests": SCENARIOS[0].delay_mean,
        "refresh_every_requests": SCENARIOS[0].block,
        "rollout_config": CONFIG.model_dump(mode="json"),
        "scenarios": per,
        "seconds": round(seconds, 1),
    }


def table(summary: dict[str, Any]) -> str:
    lines = ["| scenario | candidate reward | final stages (seeds) | outcomes to full | outcomes canary to rollback "
             "| max share | regret / rollout |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary["scenarios"].items():
        finals = ", ".join(f"{k} {v}" for k, v in row["final_stages"].items())
        lines.append(f"| {name} | {row['candidate']['reward_rate']} | {finals} | {row['outcomes_to_full_median']} "
                     f"| {row['canary_outcomes_to_rollback_median']} | {row['max_candidate_share']:.3f} "
                     f"| {row['regret_mean']:.1f} +- {row['regret_standard_error']:.1f} |")
    lines.append("")
    lines.append(f"outcomes_to_promote {summary['outcomes_to_promote']}, bad_exposure_rate {summary['bad_exposure_rate']} "
                 f"(goal 0), outcomes_to_rollback {summary['outcomes_to_rollback']}, rollout_regret "
                 f"{summary['rollout_regret']:.1f}")
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    """Simulate every scenario over its seeds, write JSON to `out`, print a table; exit code 0."""
    seeds = QUICK_SEEDS if quick else SEEDS
    started = time.perf_counter()
    runs: dict[str, list[Run]] = {}
    for index, scenario in enumerate(SCENARIOS):
        began = time.perf_counter()
        runs[scenario.name] = [simulate(scenario, CONFIG, GUARDRAIL, SEED + 1000 * index + seed) for seed in range(seeds)]
        finals = [r.final_stage for r in runs[scenario.name]]
        _say(f"{scenario.name}: {seeds} seeds in {time.perf_counter() - began:.1f} s; final stages "
             + ", ".join(f"{s} {finals.count(s)}" for s in sorted(set(finals))))
    summary = summarise(runs, time.perf_counter() - started)
    summary["quick"] = quick
    out.write_text(json.dumps(summary, indent=2))
    print(table(summary))
    _say(f"wrote {out}")
    return 0
