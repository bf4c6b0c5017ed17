"""`banditgate bench drift`: detection delay, calibration and speed of the drift monitors.

Synthetic, seeded streams. Each drift kind runs many independent replicates side by side (one
monitor column each): a 5 000-row reference sample builds the profile, then 10 000 live rows
with a change at row 5 000. Kinds (PSI of the change on the reference deciles in brackets):
  mean      N(0,1) -> N(0.5,1)                                    (PSI 0.24)
  variance  N(0,1) -> N(0,1.5^2)                                  (PSI 0.19)
  shape     N(0,1) -> 0.5 N(-0.8,0.6^2) + 0.5 N(0.8,0.6^2)  (PSI 0.045; same mean, variance)
  prior     one categorical among five features: a 12% category rises to 20% (PSI 0.048)
  error     joined error stream 0.10 -> 0.16 (Bernoulli CUSUM, p0 learned from the reference)
Then a stationary stream: 100 features (normal, log-normal, Poisson counts, categorical) x
100 000 rows against 5 000-row references, for the false-alarm rate per feature and the
update speed (batches of 10 000 rows, one core; values_per_s is per CPU-second of this process,
values_per_s_wall per elapsed second). Pre-change alarms are false alarms on any feature before
row 5 000; the stationary figure is the one compared with the target 10 000 / ARL0.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from banditgate.drift import BernoulliCusum, FeatureDriftMonitor, ReferenceProfile

ARL0 = 10_000
REFERENCE_ROWS = 5_000
CHANGE_AT = 5_000
LIVE_ROWS = 10_000
SEED = 20_240_601
CATEGORIES = np.array([0.35, 0.25, 0.20, 0.12, 0.08])


def _say(message: str) -> None:
    print(f"bench drift: {message}", file=sys.stderr, flush=True)


def _shifted_prior() -> np.ndarray:
    prior = CATEGORIES.copy()
    prior[3] = 0.20
    others = [0, 1, 2, 4]
    prior[others] *= (1.0 - 0.20) / prior[others].sum()
    return prior


def _numeric_kind(kind: str, rng: np.random.Generator, replicates: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    reference = rng.standard_normal((REFERENCE_ROWS, replicates))
    live = rng.standard_normal((LIVE_ROWS, replicates))
    after = live[CHANGE_AT:]
    if kind == "mean":
        after += 0.5
    elif kind == "variance":
        after *= 1.5
    else:  # shape: bimodal with the reference's mean and variance
        after *= 0.6
        after += rng.choice([-0.8, 0.8], size=after.shape)
    return reference, live, list(range(replicates))


def _prior_kind(rng: np.random.Generator, replicates: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    group = 5  # four stationary numeric features and one categorical that shifts
    reference = rng.standard_normal((REFERENCE_ROWS, replicates * group))
    live = rng.standard_normal((LIVE_ROWS, replicates * group))
    drifted = list(range(group - 1, replicates * group, group))
    for column in drifted:
        reference[:, column] = rng.choice(5, size=REFERENCE_ROWS, p=CATEGORIES)
        live[:CHANGE_AT, column] = rng.choice(5, size=CHANGE_AT, p=CATEGORIES)
        live[CHANGE_AT:, column] = rng.choice(5, size=LIVE_ROWS - CHANGE_AT, p=_shifted_prior())
    return reference, live, drifted


def _feature_kind(kind: str, rng: np.random.Generator, replicates: int) -> dict[str, Any]:
    if kind == "prior":
        reference, live, drifted = _prior_kind(rng, replicates)
    else:
        reference, live, drifted = _numeric_kind(kind, rng, replicates)
    names = [f"f{index}" for index in range(reference.shape[1])]
    categorical = [names[column] for column in drifted] if kind == "prior" else []
    profile = ReferenceProfile.build(reference, names, categorical=categorical)
    monitor = FeatureDriftMonitor(profile, arl0=ARL0)
    first_alarm = {column: None for column in drifted}
    pre_change = 0
    for start in range(0, LIVE_ROWS, 1000):
        for alarm in monitor.update(live[start:start + 1000]):
            column = names.index(alarm.feature)
            if alarm.index < CHANGE_AT:
                pre_change += 1
            elif column in first_alarm and first_alarm[column] is None:
                first_alarm[column] = alarm.index
    delays = np.array([np.inf if index is None else index - CHANGE_AT + 1 for index in first_alarm.values()])
    return {"delays": delays, "pre_change_alarms": pre_change, "pre_change_observations": CHANGE_AT * len(names)}


def _error_kind(rng: np.random.Generator, replicates: int) -> dict[str, Any]:
    delays, pre_change = [], 0
    for _ in range(replicates):
        detector = BernoulliCusum.from_reference(rng.random(REFERENCE_ROWS) < 0.10, arl0=ARL0)
        stream = np.concatenate([rng.random(CHANGE_AT) < 0.10, rng.random(LIVE_ROWS - CHANGE_AT) < 0.16])
        alarms = detector.update(stream)
        pre_change += sum(alarm.index < CHANGE_AT for alarm in alarms)
        after = [alarm.index for alarm in alarms if alarm.index >= CHANGE_AT]
        delays.append(after[0] - CHANGE_AT + 1 if after else np.inf)
    return {"delays": np.array(delays, dtype=float), "pre_change_alarms": pre_change,
            "pre_change_observations": CHANGE_AT * replicates}


def _stationary(rng: np.random.Generator, rows: int) -> dict[str, Any]:
    kinds = ["normal"] * 70 + ["lognormal"] * 10 + ["poisson"] * 10 + ["categorical"] * 10

    def draw(kind: str, size: int) -> np.ndarray:
        if kind == "normal":
            return rng.standard_normal(size)
        if kind == "lognormal":
            return rng.lognormal(0.0, 1.0, size)
        if kind == "poisson":
            return rng.poisson(3.0, size).astype(float)
        return rng.choice(5, size=size, p=CATEGORIES).astype(float)

    names = [f"{kind}{index}" for index, kind in enumerate(kinds)]
    reference = np.column_stack([draw(kind, REFERENCE_ROWS) for kind in kinds])
    profile = ReferenceProfile.build(reference, names,
                                     categorical=[n for n, k in zip(names, kinds) if k == "categorical"])
    started = time.perf_counter()
    monitor = FeatureDriftMonitor(profile, arl0=ARL0)
    construction_s = time.perf_counter() - started
    batch = 10_000
    alarms, cpu_s, wall_s = 0, 0.0, 0.0
    for start in range(0, rows, batch):
        live = np.column_stack([draw(kind, batch) for kind in kinds])
        began_cpu, began_wall = time.process_time(), time.perf_counter()
        alarms += len(monitor.update(live))
        cpu_s += time.process_time() - began_cpu
        wall_s += time.perf_counter() - began_wall
    values = rows * len(kinds)
    # per core = per CPU-second of this single-threaded process: on a shared machine, wall time
    # would also count the time other processes held the core
    return {"alarms": alarms, "values": values, "features": len(kinds), "rows": rows,
            "values_per_s": values / cpu_s, "values_per_s_wall": values / wall_s,
            "construction_s": construction_s,
            "bytes_per_feature": monitor.state_bytes_per_feature,
            "alarms_by_kind": {kind: int(monitor.alarms_total[[k == kind for k in kinds]].sum())
                               for kind in dict.fromkeys(kinds)}}


def _median(delays: np.ndarray) -> float | None:
    value = float(np.median(delays))
    return value if np.isfinite(value) else None


def run(out: Path, quick: bool = False) -> int:
    """Run the benchmark, write JSON to `out`, print a markdown table; returns 0."""
    rng = np.random.default_rng(SEED)
    replicates = 50 if quick else 200
    kinds: dict[str, dict[str, Any]] = {}
    for kind in ("mean", "variance", "shape", "prior"):
        began = time.perf_counter()
        kinds[kind] = _feature_kind(kind, rng, replicates)
        _say(f"{kind}: median delay {_median(kinds[kind]['delays'])} over {replicates} replicates "
             f"({time.perf_counter() - began:.1f} s)")
    began = time.perf_counter()
    kinds["error_rate"] = _error_kind(rng, replicates)
    _say(f"error_rate: median delay {_median(kinds['error_rate']['delays'])} ({time.perf_counter() - began:.1f} s)")
    rows = 20_000 if quick else 100_000
    _say(f"stationary: 100 features x {rows} rows ...")
    stationary = _stationary(rng, rows)
    per_10k = stationary["alarms"] / stationary["values"] * 10_000
    target = 10_000 / ARL0
    _say(f"stationary: {stationary['alarms']} alarms = {per_10k:.3f} per 10k per feature (target {target:.3f}), "
         f"{stationary['values_per_s']:.3g} values per CPU-second "
         f"({stationary['values_per_s_wall']:.3g} per wall second)")
    report = {
        "delays": {kind: _median(result["delays"]) for kind, result in kinds.items()},
        "false_alarms_per_10k": round(per_10k, 4),
        "target_false_alarms_per_10k": target,
        "values_per_s": round(stationary["values_per_s"]),
        "bytes_per_feature": round(stationary["bytes_per_feature"], 1),
        "arl0": ARL0,
        "detection": {kind: {"median_delay": _median(r["delays"]),
                             "p90_delay": float(np.percentile(r["delays"], 90)),
                             "detected_share": float(np.isfinite(r["delays"]).mean()),
                             "replicates": int(r["delays"].size),
                             "pre_change_alarms": r["pre_change_alarms"],
                             "pre_change_alarms_per_10k_per_feature":
                                 round(r["pre_change_alarms"] / r["pre_change_observations"] * 10_000, 4)}
                      for kind, r in kinds.items()},
        "stationary": {key: value for key, value in stationary.items() if key != "values_per_s"},
        "quick": quick,
    }
    out.write_text(json.dumps(report, indent=2))
    print("| drift kind | median delay (obs) | p90 delay | detected | pre-change alarms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, detail in report["detection"].items():
        print(f"| {kind} | {detail['median_delay']} | {detail['p90_delay']:.0f} | "
              f"{detail['detected_share']:.0%} | {detail['pre_change_alarms']} |")
    print()
    print("| stationary metric | measured | target |")
    print("| --- | ---: | ---: |")
    print(f"| false alarms per 10k obs per feature | {per_10k:.3f} | {target:.3f} ± 25% |")
    print(f"| feature-values per CPU-second (1 core, 100 features) | {stationary['values_per_s']:.3g} | ≥ 5e6 |")
    print(f"| feature-values per wall second (shared machine) | {stationary['values_per_s_wall']:.3g} | |")
    print(f"| bytes of state per feature | {stationary['bytes_per_feature']:.0f} | ≤ 2048 |")
    return 0
