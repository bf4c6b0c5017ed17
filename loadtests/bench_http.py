"""`banditgate bench http`: the OIP sidecar (REST and gRPC) against bare ONNX Runtime and MLServer, one run.

The same 32-feature ONNX MLP (loadtests/models.py) served by:
(a) bare ONNX Runtime, `session.run` on one row in a loop, in-process (the limit);
(b) `banditgate serve` over REST and (c) over gRPC: one route with one arm (policy fixed), asked
    by route name (the router picks the arm) and, to show what the router costs, by the concrete
    model name and version; predictions are published to Kafka in the background as in production;
(d) Seldon MLServer over REST and over gRPC (the same process serves both) with a small custom ONNX
    Runtime runtime (loadtests/mlserver_peer.py), with inference in its serving process
    (parallel_workers=0) and with its default (parallel_workers=1, one inference worker process);
    each ratio is against MLServer's best configuration for that transport in the same run
    (`MLSERVER`);
(e) the gRPC floors (loadtests/grpc_floor.py): a ModelInfer that does nothing, on grpc.aio and on
    the sync `grpc.server` banditgate runs, on the servers' core.

Every system is driven by the same generator (loadtests/http_load.py), run as its own process:
max sustained throughput from a closed loop with `CONNECTIONS` requests in flight, then p50/p99
from an open loop at half of that system's own maximum, timed from each request's intended send
time (no coordinated omission). REST requests carry byte-identical JSON bodies for banditgate
and MLServer.

CPU placement: with two or more CPUs, each server (and the in-process ONNX Runtime loop) is
pinned to one CPU and the generator to another, so no server competes with its own load
generator and both peers get exactly one core (BANDITGATE_BENCH_NO_PIN=1 turns pinning off).
Kafka and Redis (used by banditgate only) are not pinned.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

from banditgate.stack import Stack
from loadtests.kafka_harness import create_topics, delete_topics, progress, topic_names
from loadtests.mlserver_peer import SETTINGS_NOTE, ensure_venv, write_model_folder
from loadtests.models import build_mlp
from loadtests.registry import BenchError

N_FEATURES = 32
ROUTE = "bench"
MODEL = "bench-model"
CONNECTIONS = 32
FRACTION = 0.5
SYSTEMS = ("bare_onnxruntime", "grpc_aio_floor", "grpc_sync_floor", "banditgate_rest", "banditgate_rest_model",
           "banditgate_grpc", "banditgate_grpc_model", "mlserver_rest", "mlserver_grpc", "mlserver_rest_default_workers",
           "mlserver_grpc_default_workers")
MLSERVER = {"rest": ("mlserver_rest", "mlserver_rest_default_workers"),
            "grpc": ("mlserver_grpc", "mlserver_grpc_default_workers")}
"""MLServer's configurations per transport; each ratio is against the best of them in the same run."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, generator CPUs), or (None, None) when not pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or os.environ.get("BANDITGATE_BENCH_NO_PIN"):
        return None, None
    return {cpus[0]}, {cpus[-1]}


def _spawn(argv: list[str], log_path: Path, cpus: set[int] | None, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # noqa: S603
                            env={**os.environ, **(env or {})}, cwd=cwd,
                            preexec_fn=pin)  # noqa: PLW1509 - pinning: the child only calls sched_setaffinity


def _stop(process: subprocess.Popen, timeout_s: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    return int(process.returncode)


def _get(url: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise BenchError(f"POST {url} answered {exc.code}: {exc.read()[:300]!r}") from None


def _wait_ready(process: subprocess.Popen, url: str, name: str, log_path: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"{name} exited with {process.returncode} before it was ready: {tail[0]} "
                             f"(log: {log_path})")
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{name} was not ready within {timeout_s:.0f}s (log: {log_path})")


def _probability(answer: dict[str, Any]) -> float:
    for output in answer.get("outputs", []):
        if output.get("name") == "probability":
            return float(output["data"][0])
    raise BenchError(f"no 'probability' output in {str(answer)[:300]}")


class Runner:
    """Runs the generator (its own process, on the generator CPU) for one system; keeps the results."""

    def __init__(self, work: Path, quick: bool, row: list[float]) -> None:
        self.work = work
        self.row = row
        self.server_cpus, self.generator_cpus = _cpu_plan()
        self.phases = ({"warmup_s": 0.5, "throughput_s": 1.5, "latency_s": 1.5} if quick
                       else {"warmup_s": 2.0, "throughput_s": 8.0, "latency_s": 10.0})
        # after a server answers ready it still settles (consumer-group join, first metadata and
        # connection set-up); measuring from then on compares steady states
        self.settle_s = 1.0 if quick else 5.0
        self.results: dict[str, dict[str, Any]] = {}

    def settle(self, name: str) -> None:
        progress(f"{name}: ready; letting it settle for {self.settle_s:.0f}s")
        time.sleep(self.settle_s)

    def measure(self, system: str, kind: str, spec: dict[str, Any], cpus: set[int] | None = None) -> dict[str, Any]:
        spec = {**self.phases, "fraction": FRACTION, "connections": CONNECTIONS, "row": self.row,
                "input_name": "input", **spec}
        spec_path = self.work / f"{system}.spec.json"
        spec_path.write_text(json.dumps(spec))
        pin = self.generator_cpus if cpus is None else cpus
        total_s = spec["warmup_s"] + spec["throughput_s"] + spec["latency_s"]
        progress(f"{system}: max throughput ({spec['throughput_s']:.0f}s closed loop, {spec['connections']} in "
                 f"flight), then latency at {FRACTION:.0%} of it ({spec['latency_s']:.0f}s open loop)")
        done = subprocess.run([sys.executable, "-m", "loadtests.http_load", kind, str(spec_path)],  # noqa: S603
                              capture_output=True, text=True, timeout=total_s + 60,
                              preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None, check=False)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
            raise BenchError(f"{system}: {lines[-1]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        problems = [f"{result[key]} {key.replace('_', ' ')}" for key in
                    ("throughput_errors", "latency_errors", "latency_unanswered") if result.get(key)]
        progress(f"{system}: {result['throughput_rps']:,.0f} requests/s ({result['server_cpu_us_per_request'] or 0:.0f} us "
                 f"server CPU each); at {result['latency_rate_rps']:,.0f}/s "
                 f"p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms, p999 {result['p999_ms']:.3f} ms "
                 f"(send lag p99 {result['send_lag_p99_us']:.0f} us){'; ' + ', '.join(problems) if problems else ''}")
        self.results[system] = result
        return result


def _gateway_config(work: Path, bootstrap: str, redis_url: str, topics: dict[str, str], run_id: str) -> dict:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"bench-http-{run_id}", "topics": topics},
        "redis": {"url": redis_url, "key_prefix": f"bench-http-{run_id}"},
        "models": {"repository": str(work / "models"), "poll_interval_s": 0, "providers": ["CPUExecutionProvider"]},
        "batching": {"max_batch_size": 64, "max_delay_us": 200, "inference_threads": 1},
        "server": {"host": "127.0.0.1", "http_port": _free_port(), "grpc_port": _free_port(),
                   "enable_http": True, "enable_grpc": True},
        "logging": {"level": "warning"},
        "routes": [{"name": ROUTE, "policy": "fixed", "arms": [{"name": "a", "model": MODEL, "version": 1}]}],
    }


def _run_banditgate(runner: Runner, work: Path, body_file: Path, body: bytes) -> float:
    """Measure banditgate over REST and gRPC (route and concrete model); return its probability for the body."""
    addresses = Stack.default().up(progress)
    run_id = uuid.uuid4().hex[:6]
    prefix = f"bench-http-{run_id}"
    topics = topic_names(prefix)
    asyncio.run(create_topics(addresses.kafka, list(topics.values())))
    config = _gateway_config(work, addresses.kafka, addresses.redis, topics, run_id)
    config_path = work / "banditgate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    server = config["server"]
    base = f"http://127.0.0.1:{server['http_port']}"
    log_path = work / "banditgate.log"
    progress(f"banditgate: starting serve (REST :{server['http_port']}, gRPC :{server['grpc_port']})")
    process = _spawn([sys.executable, "-m", "banditgate.cli", "serve", "-c", str(config_path)], log_path, runner.server_cpus)
    try:
        _wait_ready(process, f"{base}/v2/health/ready", "banditgate serve", log_path)
        probability = _probability(_post(f"{base}/v2/models/{ROUTE}/infer", body))
        runner.settle("banditgate")
        rest = {"host": "127.0.0.1", "port": server["http_port"], "body_file": str(body_file), "server_pid": process.pid}
        grpc = {"host": "127.0.0.1", "port": server["grpc_port"], "server_pid": process.pid}
        runner.measure("banditgate_rest", "rest", {**rest, "path": f"/v2/models/{ROUTE}/infer"})
        runner.measure("banditgate_rest_model", "rest", {**rest, "path": f"/v2/models/{MODEL}/versions/1/infer"})
        runner.measure("banditgate_grpc", "grpc", {**grpc, "model_name": ROUTE})
        runner.measure("banditgate_grpc_model", "grpc", {**grpc, "model_name": MODEL, "model_version": "1"})
        if process.poll() is not None:
            raise BenchError(f"banditgate serve exited with {process.returncode} during the run (log: {log_path})")
    finally:
        code = _stop(process)
        asyncio.run(delete_topics(addresses.kafka, list(topics.values())))
    if code != 0:
        progress(f"banditgate: serve exited with {code} (log: {log_path})")
    return probability


def _wait_grpc(process: subprocess.Popen, port: int, log_path: Path, timeout_s: float = 30.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"grpc_floor exited with {process.returncode} before it was ready (log: {log_path})")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
    raise BenchError(f"grpc_floor was not ready within {timeout_s:.0f}s (log: {log_path})")


def _run_grpc_floor(runner: Runner, work: Path, kind: str) -> None:
    """A ModelInfer that does nothing on `kind` (aio or sync), on the servers' core: the ceiling of
    any service on that gRPC server."""
    port = _free_port()
    log_path = work / f"grpc_{kind}_floor.log"
    progress(f"grpc_floor: starting a do-nothing {kind} ModelInfer on :{port}")
    process = _spawn([sys.executable, "-m", "loadtests.grpc_floor", str(port), kind], log_path, runner.server_cpus)
    try:
        _wait_grpc(process, port, log_path)
        runner.measure(f"grpc_{kind}_floor", "grpc", {"host": "127.0.0.1", "port": port, "model_name": "floor",
                                                      "server_pid": process.pid})
    finally:
        _stop(process)


def _run_mlserver(runner: Runner, work: Path, body_file: Path, body: bytes, model_path: Path, system: str,
                  parallel_workers: int) -> float:
    executable = ensure_venv(progress)
    http_port, grpc_port = _free_port(), _free_port()
    folder = write_model_folder(work / system, ROUTE, model_path, http_port, grpc_port, parallel_workers)
    log_path = work / f"{system}.log"
    progress(f"mlserver: starting with parallel_workers={parallel_workers} (REST :{http_port}, gRPC :{grpc_port})")
    # MLServer reads settings.json from the folder it serves; its environment is its own venv
    env = {"PATH": f"{executable.parent}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(executable.parent.parent)}
    process = _spawn([str(executable), "start", str(folder)], log_path, runner.server_cpus, env=env, cwd=folder)
    try:
        _wait_ready(process, f"http://127.0.0.1:{http_port}/v2/models/{ROUTE}/ready", "mlserver", log_path,
                    timeout_s=120)
        probability = _probability(_post(f"http://127.0.0.1:{http_port}/v2/models/{ROUTE}/infer", body))
        runner.settle("mlserver")
        runner.measure(system, "rest", {"host": "127.0.0.1", "port": http_port, "body_file": str(body_file),
                                        "path": f"/v2/models/{ROUTE}/infer", "server_pid": process.pid})
        # the same process over gRPC (MLServer always serves both): raw_input_contents, as for banditgate
        runner.measure(system.replace("_rest", "_grpc"), "grpc", {"host": "127.0.0.1", "port": grpc_port,
                                                                  "model_name": ROUTE, "server_pid": process.pid})
    finally:
        _stop(process)
    return probability


def _run(quick: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    try:
        model_path = build_mlp(work / "models" / MODEL / "1" / "model.onnx", n_features=N_FEATURES, hidden=64, seed=1)
        row = np.random.default_rng(7).standard_normal(N_FEATURES).astype(np.float32).round(6).tolist()
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": row}]})
        body_file = work / "body.json"
        body_file.write_bytes(body)
        runner = Runner(work, quick, row)
        ensure_venv(progress)  # fail early, before the other measurements, when MLServer cannot be installed
        runner.measure("bare_onnxruntime", "ort", {"model": str(model_path)}, cpus=runner.server_cpus)
        _run_grpc_floor(runner, work, "aio")
        _run_grpc_floor(runner, work, "sync")
        ours = _run_banditgate(runner, work, body_file, body)
        theirs = _run_mlserver(runner, work, body_file, body, model_path, "mlserver_rest", parallel_workers=0)
        _run_mlserver(runner, work, body_file, body, model_path, "mlserver_rest_default_workers", parallel_workers=1)
        if abs(ours - theirs) > 1e-5:
            raise BenchError(f"banditgate and MLServer disagree on the same model: probability {ours} vs {theirs}")
    finally:
        if not os.environ.get("BANDITGATE_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = dict(runner.results)
    best = {transport: max(names, key=lambda name: results[name]["throughput_rps"])
            for transport, names in MLSERVER.items()}
    results["mlserver_best"] = best
    ml_rest, ml_grpc = results[best["rest"]], results[best["grpc"]]
    results["ratio_rest_vs_mlserver"] = round(results["banditgate_rest"]["throughput_rps"] / ml_rest["throughput_rps"], 3)
    results["ratio_grpc_vs_mlserver"] = round(results["banditgate_grpc"]["throughput_rps"] / ml_grpc["throughput_rps"], 3)
    # what a do-nothing service allows on this core (the sync server banditgate runs; grpc.aio for
    # reference), against MLServer's gRPC and against banditgate's gRPC
    results["ratio_grpc_floor_vs_mlserver"] = round(results["grpc_sync_floor"]["throughput_rps"]
                                                    / ml_grpc["throughput_rps"], 3)
    results["ratio_grpc_aio_floor_vs_mlserver"] = round(results["grpc_aio_floor"]["throughput_rps"]
                                                        / ml_grpc["throughput_rps"], 3)
    results["ratio_grpc_vs_grpc_floor"] = round(results["banditgate_grpc"]["throughput_rps"]
                                               / results["grpc_sync_floor"]["throughput_rps"], 3)
    # the same comparison in server CPU per request (requests per core-second): steadier than rates
    # when other work shares the machine; against the same best MLServer configurations
    cpu = {name: results[name]["server_cpu_us_per_request"] for name in
           ("banditgate_rest", "banditgate_grpc", best["rest"], best["grpc"])}
    results["server_cpu_us_per_request"] = {"banditgate_rest": cpu["banditgate_rest"],
                                            "banditgate_grpc": cpu["banditgate_grpc"],
                                            "mlserver_rest": cpu[best["rest"]], "mlserver_grpc": cpu[best["grpc"]]}
    for ours, theirs, key in (("banditgate_rest", best["rest"], "cpu_ratio_rest_vs_mlserver"),
                              ("banditgate_grpc", best["grpc"], "cpu_ratio_grpc_vs_mlserver")):
        results[key] = round(cpu[theirs] / cpu[ours], 3) if cpu[theirs] and cpu[ours] else None
    bare = results["bare_onnxruntime"]
    results["p99_above_bare_ms"] = {name: round(results[name]["p99_ms"] - bare["p99_ms"], 3)
                                    for name in SYSTEMS if name != "bare_onnxruntime"}
    results["router_cost"] = {
        "rest_throughput_route_vs_model": round(results["banditgate_rest"]["throughput_rps"]
                                                / results["banditgate_rest_model"]["throughput_rps"], 3),
        "grpc_throughput_route_vs_model": round(results["banditgate_grpc"]["throughput_rps"]
                                                / results["banditgate_grpc_model"]["throughput_rps"], 3)}
    server_cpus, generator_cpus = runner.server_cpus, runner.generator_cpus
    results["meta"] = {
        "model": f"MLP {N_FEATURES}-64-1 (onnx), one row per request", "quick": quick, "cpus": os.cpu_count(),
        "phases_s": {**runner.phases, "settle_after_ready_s": runner.settle_s}, "latency_load_fraction": FRACTION,
        "generator": (f"loadtests/http_load.py in its own process (uvloop): REST over {CONNECTIONS} HTTP/1.1 "
                      f"keep-alive connections (raw asyncio protocol, pre-encoded request, one in flight per "
                      f"connection); gRPC via grpc.aio on one channel with up to {CONNECTIONS} calls in flight "
                      f"(pre-serialised request, raw_input_contents); bare ONNX Runtime timed in-process"),
        "connections": CONNECTIONS,
        "throughput": "closed loop, requests answered 200/OK per second after a warm-up",
        "latency": "open loop at half of each system's own maximum, from each request's intended send time "
                   "(no coordinated omission), HdrHistogram",
        "server_cpu_us_per_request": "CPU time of the server process and its children (all threads) during the "
                                     "throughput window / requests answered; for bare ONNX Runtime the loop's own "
                                     "CPU per call; the Kafka broker's share of banditgate's publishing is not "
                                     "included. Robust to other load on the machine, unlike wall-clock rates",
        "generator_cpu_busy": "the generator's own CPU time / wall time during the throughput window (1.0: the "
                              "generator, not the server, was the limit)",
        "cpu_pinning": ({"servers": sorted(server_cpus), "generator": sorted(generator_cpus)} if server_cpus
                        else "off"),
        "banditgate": "banditgate serve, route with 1 arm (policy fixed), no shadow, batching max_delay_us 200, "
                      "1 inference thread, predictions published to Kafka; *_model entries ask the concrete "
                      "model name and version (no router)",
        "mlserver": SETTINGS_NOTE,
        "grpc_aio_floor": "loadtests/grpc_floor.py aio: a grpc.aio ModelInfer that answers a fixed response "
                          "without decoding, routing or inference, on the servers' core; the most any grpc.aio "
                          "service (MLServer's gRPC included) can answer there",
        "grpc_sync_floor": "loadtests/grpc_floor.py sync: the same on a sync grpc.server with the gateway's "
                           "thread count, the server banditgate's gRPC sidecar runs on: its ceiling",
        "mlserver_grpc": "the same MLServer process as mlserver_rest, over gRPC (raw_input_contents)",
        "mlserver_rest_default_workers": "the same MLServer with its default parallel_workers=1 (one inference "
                                         "worker process); mlserver_grpc_default_workers: that over gRPC",
        "mlserver_best": "per transport, the MLServer configuration with the higher throughput in this run; "
                         "ratio_* and cpu_ratio_* are against it",
        "request_body_bytes": len(body),
    }
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| system | max throughput (req/s) | server CPU us/req | p50 ms @ half | p99 ms @ half | p999 ms @ half |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in SYSTEMS:
        r = results[name]
        lines.append(f"| {name} | {r['throughput_rps']:,.0f} | {r['server_cpu_us_per_request'] or 0:,.0f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p999_ms']:.3f} |")
    lines.append("")
    lines.append(f"banditgate REST = {results['ratio_rest_vs_mlserver']:.2f}x MLServer, gRPC = "
                 f"{results['ratio_grpc_vs_mlserver']:.2f}x MLServer (goal 2x, against MLServer's best: "
                 f"{results['mlserver_best']['rest']}, {results['mlserver_best']['grpc']}; a do-nothing sync gRPC "
                 f"service = {results['ratio_grpc_floor_vs_mlserver']:.2f}x, grpc.aio "
                 f"{results['ratio_grpc_aio_floor_vs_mlserver']:.2f}x; banditgate gRPC = "
                 f"{results['ratio_grpc_vs_grpc_floor']:.2f}x of it); per server CPU second: REST "
                 f"{results['cpu_ratio_rest_vs_mlserver'] or 0:.2f}x, gRPC {results['cpu_ratio_grpc_vs_mlserver'] or 0:.2f}x"
                 f"; p99 above bare ONNX Runtime: "
                 f"REST {results['p99_above_bare_ms']['banditgate_rest']:.3f} ms, gRPC "
                 f"{results['p99_above_bare_ms']['banditgate_grpc']:.3f} ms (goal <= 1 ms)")
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    if load_before > (os.cpu_count() or 1) * 0.5:
        progress(f"the machine is busy (load average {load_before:.1f} on {os.cpu_count()} CPUs): "
                 "rates and tail latencies will be lower and noisier than on a quiet machine")
    results = _run(quick)
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    results["meta"]["load_average_1m"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(markdown(results))
    progress(f"wrote {out} in {results['meta']['wall_s']:.0f}s")
    return 0
