"""`banditgate bench kafka`: the Kafka path against a passthrough and a naive consumer, one run.

Each system runs as its own process on the local stack with the same 32-feature MLP, the same
request payloads and fresh topics:
(a) passthrough consumer→producer (no decoding, no inference), (b) naive per-message consumer,
(c) `banditgate serve` with two arms (Thompson sampling) and one shadow.
Sustained throughput comes from draining a preloaded topic (outputs / span of their broker
timestamps); latency from an open-loop run at half of each system's own maximum.

Latency at fixed rates (`fixed_rates`, `lone_request`): the gateway against `relay` (the gateway's
own Kafka loop and producer with the model taken out, loadtests/peers.py), both running at once
on fresh topics, each offered the same open-loop rates in turn (50/s, then 1 000, 5 000 and
10 000/s; which of the two goes first alternates), so that both meet the same machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import uvloop
import yaml

from banditgate.stack import Stack
from loadtests.kafka_harness import (
    LatencyResult,
    cpu_seconds,
    create_topics,
    delete_topics,
    open_loop,
    output_timestamps,
    preload,
    progress,
    request_payloads,
    throughput_from_stamps,
    topic_names,
)
from loadtests.models import build_mlp

N_FEATURES = 32
ROUTE = "bench"
FIXED_RATES = (1000.0, 5000.0, 10000.0)
LONE_RATE = 50.0


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603


def _stop(process: subprocess.Popen, timeout_s: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    return process.returncode


def _gateway_config(work: Path, bootstrap: str, redis_url: str, topics: dict[str, str], group: str,
                    name: str = "banditgate.yaml") -> Path:
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "topics": topics},
        "redis": {"url": redis_url, "key_prefix": f"bench-{group}"},
        "models": {"repository": str(work / "models"), "poll_interval_s": 0},
        "batching": {"max_batch_size": 512, "max_delay_us": 1000, "inference_threads": 2,
                     "max_queue_rows": 16384, "max_in_flight_batches": 8},
        "server": {"http_port": 0, "grpc_port": 0, "enable_http": False, "enable_grpc": False},
        "routes": [{"name": ROUTE, "policy": "thompson", "exploration_floor": 0.05,
                    "arms": [{"name": "a", "model": "bench-a", "version": 1},
                             {"name": "b", "model": "bench-b", "version": 1}],
                    "shadows": [{"name": "c", "model": "bench-c", "version": 1}]}],
    }
    path = work / name
    path.write_text(yaml.safe_dump(config))
    return path


async def _measure(system: str, argv: list[str], bootstrap: str, work: Path, n_max: int,
                   latency_s: float, in_topic: str, out_topic: str, latency: bool = True) -> dict:
    payloads = request_payloads(n_max, N_FEATURES, ROUTE, prefix=f"{system}")
    progress(f"{system}: preloading {n_max} requests")
    await preload(bootstrap, in_topic, payloads)
    process = _spawn(argv, work / f"{system}.log")
    try:
        started = time.monotonic()
        stamps = await output_timestamps(bootstrap, out_topic, n_max, timeout_s=max(60.0, n_max / 500),
                                         on_progress=lambda n: progress(f"{system}: {n}/{n_max} answered"))
        if process.poll() is not None:
            raise RuntimeError(f"{system} exited with {process.returncode}; see {work / (system + '.log')}")
        throughput = throughput_from_stamps(stamps)
        progress(f"{system}: {len(stamps)} answered, {throughput:,.0f} requests/s "
                 f"(drained in {time.monotonic() - started:.1f}s)")
        if not latency:
            return {"throughput_rps": round(throughput, 1), "requests_drained": len(stamps)}
        rate = max(1.0, throughput / 2)
        progress(f"{system}: open-loop latency at {rate:,.0f} requests/s for {latency_s:.0f}s")
        result = await open_loop(bootstrap, in_topic, out_topic, ROUTE, N_FEATURES, rate, latency_s)
    finally:
        code = _stop(process)
    latency = result
    lost = latency.sent - latency.received
    progress(f"{system}: p50 {latency.p50_ms:.2f} ms, p99 {latency.p99_ms:.2f} ms, p999 {latency.p999_ms:.2f} ms"
             f"{f', {lost} unanswered' if lost else ''}; exit {code}")
    return {"throughput_rps": round(throughput, 1), "p50_ms": round(latency.p50_ms, 3),
            "p99_ms": round(latency.p99_ms, 3), "p999_ms": round(latency.p999_ms, 3),
            "latency_rate_rps": round(rate, 1), "latency_sent": latency.sent, "latency_unanswered": lost,
            "requests_drained": len(stamps)}


def _percentiles(result: LatencyResult) -> dict:
    return {"p50_ms": round(result.p50_ms, 3), "p99_ms": round(result.p99_ms, 3), "p999_ms": round(result.p999_ms, 3),
            "sent": result.sent, "unanswered": result.sent - result.received}


async def _fixed_rates(bootstrap: str, redis_url: str, work: Path, run_id: str, created: list[str],
                       duration_s: float) -> tuple[list[dict], dict]:
    """Open-loop latency of `relay` and the gateway at LONE_RATE and each of FIXED_RATES (both up
    at once, each rate offered to one then the other, the order alternating)."""
    python = sys.executable
    systems: dict[str, tuple[str, str]] = {}
    processes: dict[str, subprocess.Popen] = {}
    try:
        for system in ("relay", "banditgate"):
            prefix = f"bench-{run_id}-fixed-{system}"
            topics = topic_names(prefix)
            await create_topics(bootstrap, list(topics.values()))
            created += list(topics.values())
            group = f"{prefix}-group"
            if system == "banditgate":
                config = _gateway_config(work, bootstrap, redis_url, topics, group, name="fixed.yaml")
                exe = shutil.which("banditgate") or f"{Path(python).parent}/banditgate"
                argv = [exe, "serve", "-c", str(config)]
            else:
                argv = [python, "-m", "loadtests.peers", "relay", bootstrap, topics["requests"],
                        topics["predictions"], group]
            processes[system] = _spawn(argv, work / f"fixed-{system}.log")
            systems[system] = (topics["requests"], topics["predictions"])
        for system, (in_topic, out_topic) in systems.items():
            # warm up: group joined, models and code paths warm, every request answered
            for _ in range(10):
                warm = await open_loop(bootstrap, in_topic, out_topic, ROUTE, N_FEATURES, 500.0, 1.0, quiet_s=3.0)
                if processes[system].poll() is not None:
                    raise RuntimeError(f"{system} exited with {processes[system].returncode}; "
                                       f"see {work / f'fixed-{system}.log'}")
                if warm.received == warm.sent:
                    break
            else:
                raise RuntimeError(f"{system} did not answer its warm-up requests; see {work / f'fixed-{system}.log'}")
        rows: list[dict] = []
        lone: dict = {"rate_rps": LONE_RATE}
        for index, rate in enumerate((LONE_RATE, *FIXED_RATES)):
            row: dict = {"rate_rps": rate}
            order = ("relay", "banditgate") if index % 2 == 0 else ("banditgate", "relay")
            for system in order:
                in_topic, out_topic = systems[system]
                cpu_before = cpu_seconds(processes[system].pid)
                result = await open_loop(bootstrap, in_topic, out_topic, ROUTE, N_FEATURES, rate, duration_s,
                                         seed=index)
                cpu_after = cpu_seconds(processes[system].pid)
                lost = result.sent - result.received
                # the process's CPU per answered request over the phase (what the latency costs,
                # which, unlike the latency, the other processes on the machine barely change)
                cpu_us = (round((cpu_after - cpu_before) * 1e6 / result.received, 1)
                          if cpu_before is not None and cpu_after is not None and result.received else None)
                progress(f"{system} at {rate:,.0f}/s: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
                         f"p999 {result.p999_ms:.2f} ms, {cpu_us} CPU us/request"
                         f"{f', {lost} unanswered' if lost else ''}")
                row["passthrough" if system == "relay" else "banditgate"] = {**_percentiles(result),
                                                                              "cpu_us_per_request": cpu_us}
            if rate == LONE_RATE:
                lone.update(row)
            else:
                rows.append(row)
        for system, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{system} exited with {process.returncode}; see {work / f'fixed-{system}.log'}")
        return rows, lone
    finally:
        for process in processes.values():
            _stop(process)


async def _run(out: Path, quick: bool) -> dict:
    addresses = Stack.default().up(progress)
    work = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    for name, seed in (("bench-a", 1), ("bench-b", 2), ("bench-c", 3)):
        build_mlp(work / "models" / name / "1" / "model.onnx", n_features=N_FEATURES, hidden=64, seed=seed)
    n_fast = 30_000 if quick else 200_000
    n_naive = 600 if quick else 3_000
    latency_s = 4.0 if quick else 10.0
    fixed_s = 3.0 if quick else 10.0
    run_id = uuid.uuid4().hex[:6]
    python = sys.executable
    results: dict[str, dict] = {}
    created: list[str] = []
    try:
        for system in ("passthrough", "passthrough_batch", "naive", "banditgate"):
            prefix = f"bench-{run_id}-{system}"
            topics = topic_names(prefix)
            await create_topics(addresses.kafka, list(topics.values()))
            created += list(topics.values())
            group = f"{prefix}-group"
            if system == "banditgate":
                config = _gateway_config(work, addresses.kafka, addresses.redis, topics, group)
                exe = shutil.which("banditgate") or f"{Path(python).parent}/banditgate"
                argv = [exe, "serve", "-c", str(config)]
            elif system == "naive":
                model = str(work / "models" / "bench-a" / "1" / "model.onnx")
                argv = [python, "-m", "loadtests.peers", "naive", addresses.kafka,
                        topics["requests"], topics["predictions"], group, model]
            else:
                argv = [python, "-m", "loadtests.peers", system, addresses.kafka,
                        topics["requests"], topics["predictions"], group]
            n = n_naive if system == "naive" else n_fast
            results[system] = await _measure(system, argv, addresses.kafka, work, n, latency_s,
                                             topics["requests"], topics["predictions"],
                                             latency=system != "passthrough_batch")
        fixed, lone = await _fixed_rates(addresses.kafka, addresses.redis, work, run_id, created, fixed_s)
    finally:
        if created:
            await delete_topics(addresses.kafka, created)
        if not os.environ.get("BANDITGATE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    bg = results["banditgate"]
    bg["ratio_vs_passthrough"] = round(bg["throughput_rps"] / results["passthrough"]["throughput_rps"], 3)
    bg["ratio_vs_naive"] = round(bg["throughput_rps"] / results["naive"]["throughput_rps"], 3)
    bg["ratio_vs_passthrough_batch"] = round(bg["throughput_rps"] / results["passthrough_batch"]["throughput_rps"], 3)
    results["fixed_rates"] = fixed
    results["lone_request"] = lone
    results["meta"] = {"model": f"MLP {N_FEATURES}-64-1 (onnx)", "arms": 2, "shadows": 1, "quick": quick,
                       "requests_throughput_phase": n_fast, "requests_naive": n_naive,
                       "latency_duration_s": latency_s, "fixed_rate_duration_s": fixed_s, "cpus": os.cpu_count(),
                       "note": "throughput: drain of a preloaded topic; latency: open loop at half of each "
                               "system's own maximum, from intended send time to output arrival; "
                               "ratio_vs_passthrough uses the idiomatic send()-per-record passthrough; "
                               "passthrough_batch (aiokafka batch API, what banditgate uses) is the client's "
                               "ceiling, reported with ratio_vs_passthrough_batch; fixed_rates and lone_request: "
                               "open loop at each rate, both systems up at once, the passthrough there is the "
                               "relay peer (the gateway's Kafka loop and producer without the model)"}
    return results


def markdown(results: dict) -> str:
    lines = ["| system | throughput (req/s) | p50 ms | p99 ms | p999 ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("passthrough", "passthrough_batch", "naive", "banditgate"):
        r = results[name]
        if "p50_ms" not in r:
            lines.append(f"| {name} | {r['throughput_rps']:,.0f} | - | - | - |")
            continue
        lines.append(f"| {name} | {r['throughput_rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} |")
    bg = results["banditgate"]
    lines.append("")
    lines.append(f"banditgate = {bg['ratio_vs_passthrough']:.2f}x passthrough, {bg['ratio_vs_naive']:.1f}x naive, "
                 f"{bg['ratio_vs_passthrough_batch']:.2f}x the batch-API passthrough")
    lines += ["", "| rate (req/s) | passthrough p50 / p99 ms | banditgate p50 / p99 ms |", "| ---: | ---: | ---: |"]
    for row in [results["lone_request"], *results["fixed_rates"]]:
        p, b = row["passthrough"], row["banditgate"]
        lines.append(f"| {row['rate_rps']:,.0f} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} | "
                     f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f} |")
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    results = uvloop.run(_run(out, quick))
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(markdown(results))
    progress(f"wrote {out}")
    return 0


async def _fixed_only(quick: bool) -> dict:
    """Only the fixed-rate phase (for working on latency; `banditgate bench kafka` runs everything)."""
    addresses = Stack.default().up(progress)
    work = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    for name, seed in (("bench-a", 1), ("bench-b", 2), ("bench-c", 3)):
        build_mlp(work / "models" / name / "1" / "model.onnx", n_features=N_FEATURES, hidden=64, seed=seed)
    created: list[str] = []
    try:
        fixed, lone = await _fixed_rates(addresses.kafka, addresses.redis, work, uuid.uuid4().hex[:6], created,
                                         3.0 if quick else 10.0)
    finally:
        if created:
            await delete_topics(addresses.kafka, created)
        if not os.environ.get("BANDITGATE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return {"fixed_rates": fixed, "lone_request": lone}


if __name__ == "__main__":
    # python -m loadtests.bench_kafka OUT.json [--quick]: the fixed-rate phase alone
    only = uvloop.run(_fixed_only("--quick" in sys.argv[2:]))
    Path(sys.argv[1]).write_bytes(orjson.dumps(only, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(only, option=orjson.OPT_INDENT_2).decode())
