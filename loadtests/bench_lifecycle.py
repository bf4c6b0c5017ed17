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
better acceptable version the moment it arrives).

And the admission gate (:func:`admission_scenario`, real ONNX models, the gateway's own
benchmark child process and verdict, gateway/admission.py): an incumbent serves through the
gateway's batcher and inference pool at a steady rate while two new versions are benchmarked
against it in turn - ``heavy`` answers exactly as the incumbent does (equal accuracy) but holds
2x the weights and does 3x the arithmetic per row, ``light`` costs what the incumbent costs.
Reports ``admission_refused_heavy`` and ``admission_admitted_light`` (the verdicts),
``admission_seconds`` (the longer of the two benchmarks, start to verdict, its pauses left out)
and ``admission_serving_p99_ratio`` (the serving p99 while a benchmark ran over the p99 of the
same load before: a quiet window before each benchmark, and - the child being paused with
SIGSTOP for 1 s after every 1 s it ran - the paused second before each running one, so both
see the same background load; goal <= 1.5), with every figure under ``admission``.

Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from banditgate.config import Admission, Guardrail, Rollout
from banditgate.jsontypes import JSONObject
from loadtests.lifecycle_sim import Run, Scenario, Version, simulate

if TYPE_CHECKING:
    from gateway.models.onnx_runtime import OnnxModel

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


ADMISSION = Admission(max_latency_p99_ratio=2.0, max_memory_ratio=1.5, min_throughput_ratio=0.5, timeout_s=120,
                      samples=400, batch_samples=50, memory_floor_mb=2.0)
"""The bench's budgets (the models' weights are 4 and 8 MB: the memory floor is lowered to 2 MB)."""
ADMISSION_BATCH = 32
SERVING_RATE = 200.0
"""Requests per second of the serving load (one row each) during the admission scenario."""
BEFORE_S = 5.0
"""A quiet window before each benchmark (serving without admission)."""
PHASE_S = 1.0
"""The benchmark's child runs this long, then is paused this long, in turn (see _alternate)."""


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
    lines = [("| scenario | candidate reward | final stages (seeds) | outcomes to full | outcomes canary to rollback "
              "| max share | regret / rollout |"), "| --- | --- | --- | --- | --- | --- | --- |"]
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


class _Serving:
    """A steady load (one-row requests at SERVING_RATE/s) on the incumbent through the gateway's
    batcher and a two-thread inference pool, recording each request's latency (submit to result)."""

    def __init__(self, model: OnnxModel) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from gateway.batching.batcher import ModelBatcher
        from gateway.batching.policy import BatchPolicy

        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serving")
        self.batcher = ModelBatcher(model, self.pool, BatchPolicy(ADMISSION_BATCH, 1000, 8192), timeout_s=10)
        self.rows = np.random.default_rng(3).standard_normal((256, model.inputs[0].shape[1])).astype(np.float32)
        self.latencies: list[tuple[float, float]] = []
        """(monotonic time sent, latency in seconds) per request."""

    async def _one(self, index: int) -> None:
        sent = time.monotonic()
        await self.batcher.submit({"input": self.rows[index % 256:index % 256 + 1]}, 1)
        self.latencies.append((sent, time.monotonic() - sent))

    async def run(self, stop: asyncio.Event, limit_s: float) -> None:
        """Send until `stop` is set or `limit_s` passed (bounded)."""
        tasks: set[asyncio.Task[None]] = set()
        began, index = time.monotonic(), 0
        while not stop.is_set() and time.monotonic() - began < limit_s:
            due = began + index / SERVING_RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.get_running_loop().create_task(self._one(index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.gather(*tasks)

    def p99_ms(self, windows: list[tuple[float, float]]) -> tuple[float, int]:
        """p99 (ms) and count of the requests sent within any of `windows` (monotonic start, end)."""
        window = [latency for sent, latency in self.latencies if any(a <= sent < b for a, b in windows)]
        return (float(np.percentile(window, 99)) * 1000.0 if window else float("nan")), len(window)


async def _admission(workdir: Path, quick: bool) -> JSONObject:
    from banditgate.config import ModelsConfig
    from gateway.admission import run_benchmark
    from gateway.models.model_config import ModelConfig
    from gateway.models.onnx_runtime import OnnxModel
    from loadtests.admission_models import build_admission_model

    hidden = 512 if quick else 1024
    budget = ADMISSION.model_copy(update={"samples": 100, "batch_samples": 6}) if quick else ADMISSION
    incumbent = build_admission_model(workdir / "m" / "1" / "model.onnx", hidden=hidden, seed=1)
    versions = {"heavy": build_admission_model(workdir / "m" / "2" / "model.onnx", hidden=hidden, seed=1, extra=1),
                "light": build_admission_model(workdir / "m" / "3" / "model.onnx", hidden=hidden, seed=2)}
    settings = ModelsConfig(providers=["CPUExecutionProvider"], intra_op_threads=1)
    serving = _Serving(OnnxModel.load(incumbent, "m", 1, ModelConfig(), settings))
    stop = asyncio.Event()
    load = asyncio.get_running_loop().create_task(serving.run(stop, limit_s=600.0))
    await asyncio.sleep(0.5)  # warm: the first batches pay for lazy set-up
    before: list[tuple[float, float]] = []
    during: list[tuple[float, float]] = []
    results = {}
    paused: dict[str, float] = {}
    try:
        for name, path in versions.items():
            quiet = time.monotonic()
            await asyncio.sleep(BEFORE_S)
            before.append((quiet, time.monotonic()))
            spec = {"candidate": {"path": str(path), "model": "m", "version": int(path.parent.name)},
                    "incumbent": {"path": str(incumbent), "model": "m", "version": 1},
                    "references": [], "max_batch": ADMISSION_BATCH, "samples": budget.samples,
                    "batch_samples": budget.batch_samples, "threads": budget.threads,
                    "busy_fraction": budget.busy_fraction, "nice": budget.nice,
                    "providers": ["CPUExecutionProvider"], "graph_optimization": "all"}
            pids: list[int] = []
            task = asyncio.get_running_loop().create_task(run_benchmark(spec, budget, on_start=pids.append))
            paused[name] = await _alternate(task, pids, before, during)
            results[name] = task.result()
            _say(f"admission {name}: {results[name].reason} ({results[name].seconds - paused[name]:.1f} s running, "
                 f"{paused[name]:.1f} s paused)")
    finally:
        stop.set()
        await load
        serving.pool.shutdown(wait=True)
    p99_before, before_n = serving.p99_ms(before)
    p99_during, during_n = serving.p99_ms(during)
    return {
        "admission_refused_heavy": not results["heavy"].admitted,
        "admission_admitted_light": results["light"].admitted,
        "admission_seconds": round(max(r.seconds - paused[name] for name, r in results.items()), 2),
        "admission_serving_p99_ratio": round(p99_during / p99_before, 3),
        "admission": {"budget": budget.model_dump(mode="json"), "max_batch": ADMISSION_BATCH, "hidden": hidden,
                      "serving": {"rate_per_s": SERVING_RATE, "p99_before_ms": round(p99_before, 3),
                                  "requests_before": before_n, "p99_during_ms": round(p99_during, 3),
                                  "requests_during": during_n},
                      **{name: result.to_dict() for name, result in results.items()}},
    }


async def _alternate(task: asyncio.Task[Any], pids: list[int], before: list[tuple[float, float]],
                     during: list[tuple[float, float]]) -> float:
    """Until `task` (a benchmark) ends, let its child run PHASE_S, then stop it (SIGSTOP) for
    PHASE_S: the serving latencies of the running windows are "during admission", those of the
    paused window before each "before". The neighbours' load drifts over seconds to minutes; at
    this alternation both kinds of window see the same background. Returns the seconds paused."""
    import os
    import signal

    paused_s = 0.0
    running_since = time.monotonic()
    while True:
        await asyncio.wait({task}, timeout=PHASE_S)
        now = time.monotonic()
        during.append((running_since, now))
        if task.done() or not pids:
            return paused_s
        try:
            os.kill(pids[0], signal.SIGSTOP)
        except ProcessLookupError:
            await task
            return paused_s
        await asyncio.sleep(PHASE_S)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[0], signal.SIGCONT)
        running_since = time.monotonic()
        before.append((now, running_since))
        paused_s += running_since - now


def admission_scenario(quick: bool = False) -> JSONObject:
    """The admission gate's scenario (see the module docstring): its JSON keys."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-admission-") as folder:
        return asyncio.run(_admission(Path(folder), quick))


def admission_table(summary: JSONObject) -> str:
    from router.rollout_admission import table as figures

    lines = ["", "admission gate (candidate vs incumbent, same process, same rows):"]
    for name in ("heavy", "light"):
        lines.append(f"{name}:")
        lines += figures(summary["admission"][name])
    serving = summary["admission"]["serving"]
    lines.append(f"serving p99 {serving['p99_before_ms']:.2f} ms before, {serving['p99_during_ms']:.2f} ms during "
                 f"admission: ratio {summary['admission_serving_p99_ratio']} (goal <= 1.5); admission_seconds "
                 f"{summary['admission_seconds']}")
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    """Simulate every scenario over its seeds, run the admission scenario, write JSON to `out`,
    print a table; exit code 0."""
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
    summary.update(admission_scenario(quick))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["quick"] = quick
    out.write_text(json.dumps(summary, indent=2))
    print(table(summary))
    print(admission_table(summary))
    _say(f"wrote {out}")
    return 0
