"""`banditgate bench drift-baselines`: river's ADWIN and Page-Hinkley on the streams of `bench drift`.

The comparison the issue names, measured rather than quoted: the same seeded streams as
`loadtests/bench_drift.py` (a change at row 5 000 after a 5 000-row reference; mean, variance,
shape, one category's prior, error rate 0.10 -> 0.16), each replicate fed one value at a time to
a fresh detector at river's defaults (`ADWIN()`, `PageHinkley()`); and a stationary stream per
feature kind for the false alarms per 10 000 observations. The detectors are warmed on the
5 000 reference rows first (alarms there are not counted), as our monitors learn from the
reference. A detector's first alarm at or after the change is its detection; alarms before it
are false alarms. For the prior shift the categorical codes are fed as numbers (these detectors
watch a mean; there is nothing else to give them).

river is not a dependency of banditgate: install it in the environment that runs this
(`pip install river`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench_drift import (
    CATEGORIES,
    CHANGE_AT,
    LIVE_ROWS,
    REFERENCE_ROWS,
    SEED,
    _numeric_kind,
    _shifted_prior,
)
from loadtests.registry import BenchError

STATIONARY_ROWS = 100_000


def _say(message: str) -> None:
    print(f"bench drift-baselines: {message}", file=sys.stderr, flush=True)


def _detectors() -> dict[str, Any]:
    try:
        from river import drift
    except ImportError as exc:
        raise BenchError(f"bench drift-baselines needs river ({exc}); install it with `pip install river` "
                         "in the environment that runs banditgate") from None
    return {"adwin": drift.ADWIN, "page_hinkley": drift.PageHinkley}


def _run(factory: Any, reference: np.ndarray, live: np.ndarray) -> list[int]:
    """Indices (0-based, in `live`) of the detector's alarms after warming on `reference`."""
    detector = factory()
    for value in reference.tolist():
        detector.update(value)
    alarms = []
    for index, value in enumerate(live.tolist()):
        detector.update(value)
        if detector.drift_detected:
            alarms.append(index)
    return alarms


def _kind_streams(kind: str, rng: np.random.Generator, replicates: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if kind in ("mean", "variance", "shape"):
        reference, live, _ = _numeric_kind(kind, rng, replicates)
        return [(reference[:, column], live[:, column]) for column in range(replicates)]
    if kind == "prior":
        streams = []
        for _ in range(replicates):
            reference = rng.choice(5, size=REFERENCE_ROWS, p=CATEGORIES).astype(float)
            live = np.concatenate([rng.choice(5, size=CHANGE_AT, p=CATEGORIES),
                                   rng.choice(5, size=LIVE_ROWS - CHANGE_AT, p=_shifted_prior())]).astype(float)
            streams.append((reference, live))
        return streams
    # error rate 0.10 -> 0.16
    return [((rng.random(REFERENCE_ROWS) < 0.10).astype(float),
             np.concatenate([rng.random(CHANGE_AT) < 0.10, rng.random(LIVE_ROWS - CHANGE_AT) < 0.16]).astype(float))
            for _ in range(replicates)]


def _stationary_streams(rng: np.random.Generator, features: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    rows = REFERENCE_ROWS + STATIONARY_ROWS
    draws = {
        "normal": lambda: rng.standard_normal(rows),
        "lognormal": lambda: rng.lognormal(0.0, 1.0, rows),
        "poisson": lambda: rng.poisson(3.0, rows).astype(float),
        "categorical": lambda: rng.choice(5, size=rows, p=CATEGORIES).astype(float),
    }
    out = {}
    for kind, draw in draws.items():
        out[kind] = [(values[:REFERENCE_ROWS], values[REFERENCE_ROWS:]) for values in (draw() for _ in range(features))]
    return out


def run(out: Path, quick: bool = False) -> int:
    detectors = _detectors()
    replicates = 20 if quick else 100
    features = 2 if quick else 10
    rng = np.random.default_rng(SEED)
    began = time.perf_counter()
    kinds: dict[str, dict[str, Any]] = {}
    for kind in ("mean", "variance", "shape", "prior", "error_rate"):
        streams = _kind_streams(kind, rng, replicates)
        kinds[kind] = {}
        for name, factory in detectors.items():
            delays, pre_change = [], 0
            for reference, live in streams:
                alarms = _run(factory, reference, live)
                pre_change += sum(index < CHANGE_AT for index in alarms)
                after = [index for index in alarms if index >= CHANGE_AT]
                delays.append(after[0] - CHANGE_AT + 1 if after else None)
            found = [d for d in delays if d is not None]
            kinds[kind][name] = {
                "median_delay": float(np.median(found)) if len(found) * 2 > len(delays) else None,
                "detected": len(found) / len(delays),
                "pre_change_alarms_per_10k": round(1e4 * pre_change / (CHANGE_AT * len(streams)), 3),
            }
            _say(f"{kind} {name}: detected {len(found)}/{len(delays)}, median delay "
                 f"{kinds[kind][name]['median_delay']} ({time.perf_counter() - began:.0f} s)")
    stationary: dict[str, dict[str, float]] = {}
    for kind, streams in _stationary_streams(rng, features).items():
        stationary[kind] = {}
        for name, factory in detectors.items():
            alarms = sum(len(_run(factory, reference, live)) for reference, live in streams)
            stationary[kind][name] = round(1e4 * alarms / (STATIONARY_ROWS * len(streams)), 3)
        _say(f"stationary {kind}: {stationary[kind]} false alarms per 10k ({time.perf_counter() - began:.0f} s)")
    import river

    report = {
        "scenario": "drift-baselines",
        "detectors": {"adwin": "river.drift.ADWIN() defaults", "page_hinkley": "river.drift.PageHinkley() defaults"},
        "river": river.__version__,
        "kinds": kinds,
        "stationary_false_alarms_per_10k": stationary,
        "meta": {"seed": SEED, "replicates": replicates, "stationary_rows": STATIONARY_ROWS,
                 "stationary_features_per_kind": features, "reference_rows": REFERENCE_ROWS,
                 "change_at": CHANGE_AT, "live_rows": LIVE_ROWS, "seconds": round(time.perf_counter() - began, 1)},
    }
    out.write_text(json.dumps(report, indent=2))
    print("| drift kind | detector | detected | median delay (obs) | pre-change alarms per 10k |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, by_detector in kinds.items():
        for name, row in by_detector.items():
            print(f"| {kind} | {name} | {row['detected']:.0%} | {row['median_delay']} | "
                  f"{row['pre_change_alarms_per_10k']} |")
    print()
    print("| stationary feature | " + " | ".join(detectors) + " |")
    print("| --- | " + " | ".join("---:" for _ in detectors) + " |")
    for kind, by_detector in stationary.items():
        print(f"| {kind} | " + " | ".join(str(by_detector[name]) for name in detectors) + " |")
    _say(f"wrote {out}")
    return 0
