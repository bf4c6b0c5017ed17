"""A hung model: one arm's model never finishes a batch. Every other route must keep its latency.

Two routes on one gateway (two inference threads): `fault` (route B: the two healthy models) and
`hung` (route A: a healthy arm and `stuck`, whose model runs an ONNX Loop of 2**62 iterations on
any batch holding a row with a negative first feature; ONNX Runtime can end it between iterations).

1. Baseline (after a few seconds of the same load, not measured): both routes under steady Kafka
   load (route A's rows all positive: nothing hangs) plus a few HTTP clients on route B; route
   B's end-to-end latency is measured.
2. The hang: the same load, route A's rows now all hang the `stuck` arm's model. Its first batch
   runs until `models.inference_timeout_s` and is ended; from then on the model is unavailable,
   its batches fail at once (dead-lettered `model_unavailable`) while one probe per backoff period
   checks it, and the guardrail drains the arm (its error rate is the worst).

Route B's latency is from each request's intended send time to its prediction's broker append
time (so a stall anywhere counts, the gateway's in-order publication included); the key
`other_route_p99_ratio` is its p99 under the hang over its p99 in the baseline, both in this run.
Every request is answered or dead-lettered with `model_unavailable` (`lost` counts the rest);
route B's clients see no error (`client_errors`); readiness is sampled during the hang.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import orjson
import redis.asyncio as aredis

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import ARMS, HANGING_MODEL, ROUTE, GatewayProc, http_status, route_config
from loadtests.faults.readback import percentile
from loadtests.faults.traffic import HttpTally, SteadyLoad, http_load

HUNG_ROUTE = "hung"
FLOOR = 0.05
TIMEOUT_S = 0.2
"""`models.inference_timeout_s` here: several times the slowest healthy batch run seen on this
2-core machine under the suite's load (tens of ms), and how long the first hung batch holds the
Kafka answers fetched with it (answers are published in fetch order)."""


def hung_route() -> dict[str, Any]:
    model, version = ARMS["b"]
    return {"name": HUNG_ROUTE, "policy": "thompson", "exploration_floor": FLOOR, "guardrail": {"min_outcomes": 100},
            "arms": [{"name": "healthy", "model": model, "version": version},
                     {"name": "stuck", "model": HANGING_MODEL[0], "version": HANGING_MODEL[1]}]}


def latencies_ms(load: SteadyLoad, first_answer_ms: dict[str, int]) -> list[float]:
    """Per answered request of `load`: its prediction's append time minus its intended send time."""
    out = []
    for index in range(load.n):
        answered = first_answer_ms.get(f"{load.tag}-{index}")
        if answered is not None:
            out.append(answered - (load.started_s + index / load.rate_rps) * 1000.0)
    return out


async def http_get(port: int, path: str, timeout_s: float = 2.0) -> str:
    """The body of GET http://127.0.0.1:port/path ('' when it does not answer)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return ""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)
        return raw.partition(b"\r\n\r\n")[2].decode(errors="replace")
    except (OSError, asyncio.TimeoutError):
        return ""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def timeouts_by_model(metrics_text: str) -> dict[str, float]:
    """`banditgate_inference_timeouts_total` per model, from a /metrics page."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("banditgate_inference_timeouts_total{"):
            labels, _, value = line.rpartition(" ")
            model = labels.split('model="', 1)[1].split('"', 1)[0]
            out[model] = out.get(model, 0.0) + float(value)
    return out


class HangWatch:
    """During the hang: when the stuck arm is drained (Redis) and what readiness says (HTTP)."""

    def __init__(self, ctx: Context, gateway: GatewayProc, started_s: float) -> None:
        self.client = aredis.Redis.from_url(ctx.redis)
        self.key = f"{ctx.prefix('hung_model')}:{{{HUNG_ROUTE}}}:arms"
        self.gateway = gateway
        self.started_s = started_s
        self.drained_at: float | None = None
        self.samples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._task: asyncio.Task | None = None

    def start(self) -> "HangWatch":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        port = self.gateway.http_port
        while True:
            if self.drained_at is None and await self.client.hget(self.key, "stuck:state") == b"drained":
                self.drained_at = time.time()
            for name, path in (("gateway", "/v2/health/ready"), ("hung_model", f"/v2/models/{HANGING_MODEL[0]}/ready"),
                               ("other_route", f"/v2/models/{ROUTE}/ready"),
                               ("hung_route", f"/v2/models/{HUNG_ROUTE}/ready")):
                self.samples[name][str(await http_status(port, path))] += 1
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()


async def _phase(ctx: Context, scene: GatewayScene, gateway: GatewayProc, tag: str, seconds: float,
                 other_rps: float, hung_rps: float, http_rps: float, hang: bool
                 ) -> tuple[SteadyLoad, SteadyLoad, HttpTally, HangWatch | None]:
    other = SteadyLoad(ctx.kafka, scene.topics["requests"], tag=f"{tag}-b", n=int(other_rps * seconds),
                       rate_rps=other_rps, route=ROUTE, seed=1)
    hung = SteadyLoad(ctx.kafka, scene.topics["requests"], tag=f"{tag}-a", n=int(hung_rps * seconds),
                      rate_rps=hung_rps, route=HUNG_ROUTE, seed=2, negative_first=hang, positive_first=not hang)
    tally = HttpTally()
    stop_http = asyncio.Event()
    loop = asyncio.get_running_loop()
    http_task = loop.create_task(http_load(gateway.http_port, f"{tag}-http", 2, stop_http, tally, rate_rps=http_rps))
    watch = HangWatch(ctx, gateway, time.time()).start() if hang else None
    try:
        await asyncio.gather(other.run(), hung.run())
    finally:
        stop_http.set()
        await http_task
    await scene.drain(set(other.ids()) | set(hung.ids()), timeout_s=ctx.pick(60, 180), settle_s=0.5)
    if watch is not None:
        await watch.stop()
    return other, hung, tally, watch


async def hung_model(ctx: Context) -> dict[str, Any]:
    base_s, hang_s, other_rps, hung_rps, http_rps = ctx.pick((20.0, 35.0, 300.0, 150.0, 40.0),
                                                             (60.0, 90.0, 500.0, 250.0, 80.0))
    scene = await GatewayScene.create(ctx, "hung_model", routes=[route_config(), hung_route()],
                                      batching={"inference_threads": 2},
                                      models_settings={"inference_timeout_s": TIMEOUT_S, "unavailable_retry_s": 1.0,
                                                       "unavailable_retry_max_s": 8.0})
    try:
        (gateway,) = await scene.start_replicas(1)
        # not measured: the first seconds after start are slower (connections, fetch sessions,
        # caches) and would flatter the ratio
        warm_b, warm_a, warm_http, _ = await _phase(ctx, scene, gateway, "warmup", ctx.pick(5.0, 10.0), other_rps,
                                                    hung_rps, http_rps, hang=False)
        ctx.say(f"hung_model: baseline, {other_rps:.0f} + {hung_rps:.0f} requests/s for {base_s:.0f}s")
        base_b, base_a, base_http, _ = await _phase(ctx, scene, gateway, "base", base_s, other_rps, hung_rps,
                                                    http_rps, hang=False)
        ctx.say("hung_model: the stuck arm's model now hangs on every batch it gets")
        hung_b, hung_a, hung_http, watch = await _phase(ctx, scene, gateway, "hang", hang_s, other_rps, hung_rps,
                                                        http_rps, hang=True)
        assert watch is not None  # noqa: S101 - the hang phase has one
        timeouts = timeouts_by_model(await http_get(gateway.http_port, "/metrics"))
        first_ms: dict[str, int] = {}
        duplicates = sum(count - 1 for count in scene.predictions.keys.values() if count > 1)
        for rec in scene.predictions.records:
            if rec.key not in first_ms or rec.ts_ms < first_ms[rec.key]:
                first_ms[rec.key] = rec.ts_ms
        reasons: dict[str, str] = {}
        first_failed_ms: int | None = None
        for rec in scene.deadletter.records:
            reason = orjson.loads(rec.value)["reason"] if rec.value is not None else "?"
            reasons.setdefault(rec.key, reason)
            if reason == "model_unavailable" and (first_failed_ms is None or rec.ts_ms < first_failed_ms):
                first_failed_ms = rec.ts_ms
        loads = (warm_b, warm_a, base_b, base_a, hung_b, hung_a)
        ids = [request_id for load in loads for request_id in load.ids()]
        lost = sum(1 for i in ids if i not in first_ms and reasons.get(i) != "model_unavailable")
        other_failed = sum(1 for load in (warm_b, base_b, hung_b) for i in load.ids() if i not in first_ms)
        tallies = (warm_http, base_http, hung_http)
        statuses: collections.Counter[int] = collections.Counter()
        for tally in tallies:
            statuses.update(tally.statuses)
        http_errors = sum(n for status, n in statuses.items() if status != 200) + sum(t.connect_errors for t in tallies)
        base_ms, hung_ms = latencies_ms(base_b, first_ms), latencies_ms(hung_b, first_ms)
        base_p99, hung_p99 = percentile(base_ms, 99), percentile(hung_ms, 99)
        hang_started = hung_a.started_s
        result = {
            "sent": len(ids), "answered": sum(1 for i in ids if i in first_ms), "lost": lost, "duplicates": duplicates,
            "client_errors": other_failed + http_errors,
            "other_route_p99_ratio": round(hung_p99 / base_p99, 2) if base_p99 > 0 else None,
            "other_route_p50_ms": [round(percentile(base_ms, 50), 1), round(percentile(hung_ms, 50), 1)],
            "other_route_p99_ms": [round(base_p99, 1), round(hung_p99, 1)],
            "other_route_max_ms": [round(max(base_ms, default=0.0), 1), round(max(hung_ms, default=0.0), 1)],
            "other_route_requests": [len(base_ms), len(hung_ms)],
            "drained": watch.drained_at is not None,
            "drained_after_s": round(watch.drained_at - hang_started, 2) if watch.drained_at is not None else None,
            "failed_fast_after_s": round(first_failed_ms / 1000.0 - hang_started, 2) if first_failed_ms else None,
            "hung_arm_dead_lettered": sum(1 for i in hung_a.ids() if reasons.get(i) == "model_unavailable"),
            "hung_route_answered": sum(1 for i in hung_a.ids() if i in first_ms),
            "wrong_reason": sum(1 for reason in reasons.values() if reason != "model_unavailable"),
            "inference_timeouts": timeouts,
            "healthy_model_timeouts": sum(v for model, v in timeouts.items() if model != HANGING_MODEL[0]),
            "readiness_during_hang": {name: dict(counts) for name, counts in watch.samples.items()},
            "http_statuses": {str(k): v for k, v in sorted(statuses.items())},
            "inference_timeout_s": TIMEOUT_S,
        }
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result
