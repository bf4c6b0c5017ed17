"""Micro-benchmark of the feedback worker's hot path in the ledger planner: `LedgerPlanner.plan`
over N effects shaped like a joined batch (per outcome: a `joined` count, the serving arm's
reward, the primary's label and a shadow's label; every 50th outcome an interleave `Pairs`), with
the arm statistics in the same chunks. Pure CPU, no Redis (the client is never connected).

    python -m loadtests.bench_ledger_plan [--effects 4000] [--repeats 30] [--out FILE.json]

Prints (and writes) the median and best microseconds per effect over `repeats` plans of the
same batch, wall clock and process CPU time (on a shared machine the CPU time and the best are
the steadier; the garbage collector is off while a plan is timed); every loop is bounded by `repeats`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

from feedback.join import Count, Effect, Label, Reward, Served
from feedback.ledger import FeedbackKeys, LedgerPlanner
from feedback.outcome_metrics import PredictionView
from feedback.pairs import Pairs
from router.stats_store import ArmStatsStore


def batch(n_effects: int) -> list[Effect]:
    """About `n_effects` effects of joined outcomes on two routes (fixed: no randomness)."""
    effects: list[Effect] = []
    arms = ["a", "b", "c"]
    outcome = 0
    while len(effects) < n_effects:
        route = "churn" if outcome % 3 else "fraud"
        request_id = f"req-{outcome:08d}"
        arm = arms[outcome % 3]
        served = Served(arm, f"m-{arm}", 3, PredictionView(0.25 + (outcome % 7) / 10, outcome % 2), offset=outcome)
        shadow = Served("s", "m-s", 4, PredictionView(0.6, 1), offset=outcome, shadow=True)
        ts = 1_700_000_000.0 + outcome * 0.01
        label = outcome % 2
        effects.append(Count(route, request_id, "joined", "decision", arm))
        effects.append(Reward(route, request_id, served, float(label), False, ts))
        effects.append(Label(route, request_id, served, label, ts, None))
        effects.append(Label(route, request_id, shadow, label, ts, served))
        if outcome % 50 == 0:
            effects.append(Pairs(route, request_id, {"a|b|win": 1.0, "a|clicks": 1.0, "impressions": 1.0}, ts))
        outcome += 1
    return effects


def measure(n_effects: int, repeats: int) -> dict[str, Any]:
    effects = batch(n_effects)
    store = ArmStatsStore(aredis.Redis(), prefix="bench")
    planner = LedgerPlanner(FeedbackKeys("bench"), 600.0)
    planner.plan(effects, store, [])  # warm the planner's name caches, as a running worker has them
    wall, cpu = [], []
    for _ in range(repeats):
        gc.collect()  # each plan starts from the same heap; the collector stays off while timed
        gc.disable()
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            chunks = planner.plan(effects, store, [])
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start)
        finally:
            gc.enable()
    assert sum(len(c.rows) for c in chunks) == len(effects)
    scale = 1e6 / len(effects)
    return {"effects": len(effects), "repeats": repeats,
            "median_us_per_effect": round(statistics.median(wall) * scale, 4),
            "best_us_per_effect": round(min(wall) * scale, 4),
            "median_cpu_us_per_effect": round(statistics.median(cpu) * scale, 4),
            "best_cpu_us_per_effect": round(min(cpu) * scale, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--effects", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(max(1, args.effects), max(1, min(args.repeats, 10_000)))
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
