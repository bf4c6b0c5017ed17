"""`banditgate bench kafka`: the Kafka path against a passthrough and a naive consumer, one run.

Each system runs as its own process on the local stack with the same 32-feature MLP, the same
request payloads and fresh topics:
(a) passthrough consumer→producer (no decoding, no inference), (b) naive per-message consumer,
(c) `banditgate serve` with two arms (Thompson sampling) and one shadow.
Sustained throughput comes from draining a preloaded topic (outputs / span of their broker
timestamps); latency from an open-loop run at half of each system's own maximum.
"""

from __future__ import annotations

import asyncio
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
from loadtests.kafka_harness import (create_topics, delete_topics, open_loop, output_timestamps, preload, progress,
                                     request_payloads, throughput_from_stamps)
from loadtests.models import build_mlp

N_FEATURES = 32
ROUTE = "bench"


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


def _gateway_config(work: Path, bootstrap: str, redis_url: str, topics: dict[str, str], group: str) -> Path:
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "topics": topics},
        "redis": {"url": redis_url, "key_prefix": f"bench-{group}"},
        "models": {"repository": str(work / "models"), "poll_interval_s": 0},
        "batching": {"max_batch_size": 512, "max_delay_us": 1000, "inference_threads": 2,
                     "max_queue_rows": 16384, "max_in_flight_batches": 4},
        "server": {"http_port": 0, "grpc_port": 0, "enable_http": False, "enable_grpc": False},
        "routes": [{"name": ROUTE, "policy": "thompson", "exploration_floor": 0.05,
                    "arms": [{"name": "a", "model": "bench-a", "version": 1},
                             {"name": "b", "model": "bench-b", "version": 1}],
                    "shadows": [{"name": "c", "model": "bench-c", "version": 1}]}],
    }
    path = work / "banditgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _measure(system: str, argv_for: callable, bootstrap: str, work: Path, n_max: int,  # type: ignore[valid-type]
                   latency_s: float, in_topic: str, out_topic: str, latency: bool = True) -> dict:
    payloads = request_payloads(n_max, N_FEATURES, ROUTE, prefix=f"{system}")
    progress(f"{system}: preloading {n_max} requests")
    await preload(bootstrap, in_topic, payloads)
    process = _spawn(argv_for(), work / f"{system}.log")
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
            return {"throughput_rps": round(throughput, 1), "requests_drained": int(len(stamps))}
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
            "requests_drained": int(len(stamps))}


async def _run(out: Path, quick: bool) -> dict:
    addresses = Stack.default().up(progress)
    work = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    for name, seed in (("bench-a", 1), ("bench-b", 2), ("bench-c", 3)):
        build_mlp(work / "models" / name / "1" / "model.onnx", n_features=N_FEATURES, hidden=64, seed=seed)
    n_fast = 30_000 if quick else 200_000
    n_naive = 600 if quick else 3_000
    latency_s = 4.0 if quick else 10.0
    run_id = uuid.uuid4().hex[:6]
    python = sys.executable
    results: dict[str, dict] = {}
    created: list[str] = []
    try:
        for system in ("passthrough", "passthrough_batch", "naive", "banditgate"):
            prefix = f"bench-{run_id}-{system}"
            topics = {"requests": f"{prefix}.requests", "predictions": f"{prefix}.predictions",
                      "shadow_predictions": f"{prefix}.shadow", "outcomes": f"{prefix}.outcomes",
                      "deadletter": f"{prefix}.deadletter", "alerts": f"{prefix}.alerts",
                      "routing_changes": f"{prefix}.routing"}
            await create_topics(addresses.kafka, list(topics.values()))
            created += list(topics.values())
            group = f"{prefix}-group"
            if system == "banditgate":
                config = _gateway_config(work, addresses.kafka, addresses.redis, topics, group)
                exe = shutil.which("banditgate") or f"{Path(python).parent}/banditgate"
                argv = lambda: [exe, "serve", "-c", str(config)]  # noqa: E731
            elif system == "naive":
                model = str(work / "models" / "bench-a" / "1" / "model.onnx")
                argv = lambda: [python, "-m", "loadtests.peers", "naive", addresses.kafka,  # noqa: E731
                                topics["requests"], topics["predictions"], group, model]
            else:
                argv = lambda: [python, "-m", "loadtests.peers", system, addresses.kafka,  # noqa: E731
                                topics["requests"], topics["predictions"], group]
            n = n_naive if system == "naive" else n_fast
            results[system] = await _measure(system, argv, addresses.kafka, work, n, latency_s,
                                             topics["requests"], topics["predictions"],
                                             latency=system != "passthrough_batch")
    finally:
        if created:
            await delete_topics(addresses.kafka, created)
        if not os.environ.get("BANDITGATE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    bg = results["banditgate"]
    bg["ratio_vs_passthrough"] = round(bg["throughput_rps"] / results["passthrough"]["throughput_rps"], 3)
    bg["ratio_vs_naive"] = round(bg["throughput_rps"] / results["naive"]["throughput_rps"], 3)
    bg["ratio_vs_passthrough_batch"] = round(bg["throughput_rps"] / results["passthrough_batch"]["throughput_rps"], 3)
    results["meta"] = {"model": f"MLP {N_FEATURES}-64-1 (onnx)", "arms": 2, "shadows": 1, "quick": quick,
                       "requests_throughput_phase": n_fast, "requests_naive": n_naive,
                       "latency_duration_s": latency_s, "cpus": os.cpu_count(),
                       "note": "throughput: drain of a preloaded topic; latency: open loop at half of each "
                               "system's own maximum, from intended send time to output arrival; "
                               "ratio_vs_passthrough uses the idiomatic send()-per-record passthrough; "
                               "passthrough_batch (aiokafka batch API, what banditgate uses) is the client's "
                               "ceiling, reported with ratio_vs_passthrough_batch"}
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
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    results = uvloop.run(_run(out, quick))
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(markdown(results))
    progress(f"wrote {out}")
    return 0
