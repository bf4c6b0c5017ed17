"""`banditgate bench faults [--quick] --out FILE.json`: the reliability suite.

Each scenario injects one fault — processes killed without warning, a broker restart, Redis
going away, 2x overload, garbage on the wire, replicas rebalancing, a SIGTERM under load — into
real `banditgate serve` / `banditgate feedback` processes on a Kafka broker and a Redis that
this suite starts for itself (free loopback ports, a folder of its own, purged at the end; the
shared development stack is never touched). Counts come from reading the output topics back
(predictions `read_committed`) and from Redis, never from the processes' own counters.

Writes `{"quick", "scenarios": {name: {...}}, "targets": {...}, "failed_targets": [...]}` and a
markdown table next to it (`FILE.md`); exits 1 when a target is missed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from banditgate.stack import cache_dir
from loadtests.faults.context import Context
from loadtests.faults.harness import OwnStack, write_models

ScenarioFn = Callable[[Context], Awaitable[dict[str, Any]]]


def _say(message: str) -> None:
    print(f"bench faults: {message}", file=sys.stderr, flush=True)


def scenarios() -> list[tuple[str, ScenarioFn]]:
    from loadtests.faults import (
        delivery,
        feedback_faults,
        gateway_faults,
        hung_model,
        join_memory,
        malformed,
        outages,
        overload,
        poison,
        poison_model,
        redis_modes,
    )

    return [
        ("malformed", malformed.malformed),
        ("poison_model", poison_model.poison_model),
        ("hung_model", hung_model.hung_model),
        ("gateway_kill_alo", lambda ctx: gateway_faults.gateway_kill(ctx, "at_least_once")),
        ("gateway_kill_eos", lambda ctx: gateway_faults.gateway_kill(ctx, "exactly_once")),
        ("graceful_shutdown", gateway_faults.graceful_shutdown),
        ("rebalance", gateway_faults.rebalance),
        ("feedback_kill", feedback_faults.feedback_kill),
        ("redis_outage", outages.redis_outage),
        ("overload", overload.overload),
        ("broker_restart", outages.broker_restart),
        ("poison_values", poison.poison_values),
        ("redis_readonly", redis_modes.redis_readonly),
        ("redis_oom", redis_modes.redis_oom),
        ("oversize_output", delivery.oversize_output),
        ("eos_broker_restart", delivery.eos_broker_restart),
        ("eos_txn_abort", delivery.eos_txn_abort),
        ("join_memory", join_memory.join_memory),
    ]


TARGETS = "lost = 0, double_counted = 0, crashes = 0, client_errors = 0; *_eos, eos_* duplicates = 0; " \
          "oversize_output duplicates = 0; recovered_s <= 10; " \
          "overload max_rss_mb <= 1.5 x steady_rss_mb; hung_model other_route_p99_ratio <= 2 and drained; " \
          "poison_values poison_accepted = 0, non_finite_values = 0, exact; " \
          "join_memory max_rss_mb <= 1.5 x budget_mb + 200"


_WITH_OUTCOMES = {"feedback_kill", "redis_outage", "poison_values", "redis_readonly", "redis_oom"}
_WITH_CLIENTS = {"hung_model", "redis_outage", "poison_values", "redis_readonly", "redis_oom", "oversize_output"}


def zero_keys(name: str) -> tuple[str, ...]:
    """The keys scenario `name` must report, each with the target 0 (a missing one is a missed target:
    a scenario that stopped reporting a count must not pass as if it were 0). `double_counted`
    where outcomes are applied, `client_errors` where clients are well-behaved, `unclean_exits`
    where processes are stopped with SIGTERM."""
    keys = ["lost", "crashes"]
    if name in _WITH_OUTCOMES:
        keys.append("double_counted")
    if name in _WITH_CLIENTS:
        keys.append("client_errors")
    if name != "join_memory":
        keys.append("unclean_exits")
    return tuple(keys)


def missed_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every target a scenario missed, as `scenario.key=value` (an `error` counts as missed)."""
    bad = []
    for name, r in results.items():
        if "error" in r:
            bad.append(f"{name}.error={r['error']}")
        if "error" not in r:
            for key in zero_keys(name):
                if key not in r:
                    bad.append(f"{name}.{key} missing")
        for key in ("lost", "double_counted", "crashes", "client_errors", "unclean_exits"):
            if r.get(key, 0) != 0:
                bad.append(f"{name}.{key}={r[key]}")
        if (name.endswith("_eos") or name.startswith("eos_") or name == "oversize_output") \
                and r.get("duplicates", 1) != 0:
            bad.append(f"{name}.duplicates={r.get('duplicates')}")
        if r.get("recovered_s", 0) is None or r.get("recovered_s", 0) > 10:
            bad.append(f"{name}.recovered_s={r.get('recovered_s')}")
        if name == "overload" and "max_rss_mb" in r and r["max_rss_mb"] > 1.5 * r["steady_rss_mb"]:
            bad.append(f"overload.max_rss_mb={r['max_rss_mb']} > 1.5 x {r['steady_rss_mb']}")
        if name == "hung_model" and "error" not in r:
            if r.get("other_route_p99_ratio") is None or r["other_route_p99_ratio"] > 2:
                bad.append(f"hung_model.other_route_p99_ratio={r.get('other_route_p99_ratio')} > 2")
            if not r.get("drained"):
                bad.append("hung_model.drained=False")
        if name == "poison_values":  # every poison refused, Redis exactly the good ones' tally
            for key, want in (("poison_accepted", 0), ("non_finite_values", 0), ("exact", True)):
                if r.get(key) != want:
                    bad.append(f"poison_values.{key}={r.get(key)}")
        if name == "join_memory" and "error" not in r and not r["max_rss_mb"] <= 1.5 * r["budget_mb"] + 200:
            bad.append(f"join_memory.max_rss_mb={r['max_rss_mb']} > 1.5 x {r['budget_mb']} + 200")
    return bad


TABLE_KEYS = ("sent", "answered", "lost", "duplicates", "order_violations", "outcomes", "applied", "double_counted",
              "client_errors", "recovered_s", "max_rss_mb", "steady_rss_mb", "rejected_http", "drain_s", "bad_sent",
              "dead_lettered", "good_answered", "crashes", "pause_p99_ms", "exit_s", "seconds")
"""Keys shown in the progress line of each scenario."""

SCENARIO_KEYS = {
    "gateway_kill_alo": ("sent", "answered", "lost", "duplicates", "order_violations", "kills"),
    "gateway_kill_eos": ("sent", "answered", "lost", "duplicates", "order_violations", "kills"),
    "feedback_kill": ("outcomes", "applied", "double_counted", "lost", "exact", "kills", "sigterm_exit_code"),
    "broker_restart": ("sent", "lost", "duplicates", "recovered_s", "down_s", "unready_during_outage",
                       "producer_replacements"),
    "redis_outage": ("sent", "lost", "client_errors", "double_counted", "recovered_s", "all_held_applied_s", "down_s",
                     "answered_during_outage", "gateway_outage_log_lines"),
    "overload": ("max_rps", "offered_kafka_rps", "steady_rss_mb", "max_rss_mb", "lost", "rejected_http",
                 "http_answered", "drain_s"),
    "malformed": ("bad_sent", "dead_lettered", "good_answered", "lost"),
    "rebalance": ("sent", "lost", "duplicates", "order_violations", "pause_p99_ms"),
    "graceful_shutdown": ("sent", "lost", "duplicates", "exit_s", "exit_code", "readiness_status_after_sigterm",
                          "unready_after_s"),
    "poison_model": ("sent", "answered", "lost", "failed_on_broken_arm", "drained_after_s", "broken_share_after_drain",
                     "guardrail_alerts"),
    "hung_model": ("sent", "lost", "client_errors", "other_route_p99_ratio", "other_route_p99_ms", "drained_after_s",
                   "failed_fast_after_s", "hung_arm_dead_lettered", "healthy_model_timeouts"),
    "poison_values": ("sent", "outcomes", "applied", "lost", "double_counted", "client_errors", "poison_kafka",
                      "dead_lettered", "poison_http", "rejected_http", "exact", "non_finite_values"),
    "redis_readonly": ("sent", "lost", "client_errors", "double_counted", "recovered_s", "all_held_applied_s", "down_s",
                       "held_outcomes", "feedback_outage_log_lines", "gateway_write_failure_log_lines"),
    "redis_oom": ("sent", "lost", "client_errors", "double_counted", "recovered_s", "all_held_applied_s", "down_s",
                  "held_outcomes", "feedback_outage_log_lines", "gateway_write_failure_log_lines"),
    "oversize_output": ("sent", "answered", "lost", "duplicates", "oversize_sent", "oversize_dead_lettered",
                        "client_errors", "rewinds"),
    "eos_broker_restart": ("sent", "lost", "duplicates", "recovered_s", "down_s", "unready_during_outage",
                           "transactions_redone"),
    "eos_txn_abort": ("sent", "answered", "lost", "duplicates", "intrusions", "transactions_redone", "stalled"),
    "join_memory": ("sent", "lost", "evicted", "held", "budget_mb", "max_rss_mb", "idle_rss_mb", "drain_s"),
}
"""What the markdown table shows per scenario (every key is in the JSON)."""


def markdown(results: dict[str, dict[str, Any]], quick: bool) -> str:
    lines = [f"banditgate bench faults ({'quick' if quick else 'full'} run)", "",
             "| scenario | results | crashes | seconds |", "| --- | --- | ---: | ---: |"]
    for name, r in results.items():
        if "error" in r:
            cells = f"error: {r['error']}"
        else:
            cells = ", ".join(f"{k} {r[k]}" for k in SCENARIO_KEYS.get(name, TABLE_KEYS) if k in r)
        lines.append(f"| `{name}` | {cells} | {r.get('crashes', '-')} | {r.get('seconds', '-')} |")
    return "\n".join(lines) + "\n"


async def _run_all(root: Path, quick: bool, only: set[str] | None) -> dict[str, dict[str, Any]]:
    stack = OwnStack(root / "stack")
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    _say(f"starting the suite's own Kafka (port {stack.stack.kafka_port}) and Redis (port {stack.stack.redis_port}) "
         f"in {root}")
    try:
        await asyncio.to_thread(stack.up, lambda m: _say(m))
        ctx = Context(stack=stack, work=work, models=write_models(work / "models"), quick=quick,
                      run_id=uuid.uuid4().hex[:6], say=_say)
        chosen = [(n, fn) for n, fn in scenarios() if only is None or n in only]
        for index, (name, fn) in enumerate(chosen, start=1):
            _say(f"[{index}/{len(chosen)}] {name} ...")
            t0 = time.monotonic()
            try:
                result = await fn(ctx)
            except Exception as exc:  # noqa: BLE001 - one scenario's failure is reported, the rest still run
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            result["seconds"] = round(time.monotonic() - t0, 1)
            results[name] = result
            shown = {k: result[k] for k in TABLE_KEYS if k in result}
            _say(f"[{index}/{len(chosen)}] {name}: {json.dumps(shown)}")
    finally:
        _say("stopping the suite's own Kafka and Redis")
        await asyncio.to_thread(stack.down)
    _say(f"all scenarios done in {time.monotonic() - started:.0f}s")
    return results


def run(out: Path, quick: bool = False, only: set[str] | None = None) -> int:
    """Run every scenario (or those in `only`), write JSON to `out` and markdown beside it."""
    # the suite's own consumers log every transient error of a broker it restarts on purpose
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    base = cache_dir() / "faults"
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    try:
        results = uvloop.run(_run_all(root, quick, only))
    finally:
        bad = missed_targets(results) if results else ["no results"]
        if bad:  # keep the processes' logs and configs for whoever investigates
            logs = out.parent / f"{out.stem}-logs"
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(root / "work", logs, ignore=shutil.ignore_patterns("models"), dirs_exist_ok=True)
            _say(f"logs of the processes kept in {logs}")
        shutil.rmtree(root, ignore_errors=True)
    doc = {"quick": quick, "seconds": round(time.monotonic() - started, 1), "targets": TARGETS,
           "failed_targets": bad, "scenarios": results}
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(markdown(results, quick))
    print(markdown(results, quick))
    if bad:
        print(f"bench faults: targets missed: {'; '.join(bad[:8])}", flush=True)
        return 1
    print(f"bench faults: {len(results)} scenarios, every target met ({doc['seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":  # `python -m loadtests.bench_faults OUT [--quick] [scenario ...]` (development)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    raise SystemExit(run(Path(args[0]), quick="--quick" in sys.argv, only=set(args[1:]) or None))
