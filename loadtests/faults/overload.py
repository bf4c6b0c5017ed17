"""Twice the load the gateway can serve, over Kafka and HTTP at once: memory must stay bounded.

1. The gateway's maximum: a burst of requests drained as fast as it can (answers per second, from
   the predictions' broker append times).
2. Steady state at half of it: the resident set size (RSS) the process settles at.
3. 2x the maximum offered for `duration` seconds through Kafka, while HTTP clients keep
   twice the requests in flight that the sidecar admits (`server.max_in_flight_requests`): the
   Kafka loop must slow its fetching (the backlog waits in Kafka, not in the process) and HTTP
   must be answered 429/503 with Retry-After beyond the limit. RSS is sampled every 250 ms.
4. The offered load stops: how long until every Kafka request is answered (`drain_s`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import GatewayProc
from loadtests.faults.traffic import HttpTally, SteadyLoad, http_load


class RssSampler:
    def __init__(self, proc: GatewayProc, interval_s: float = 0.25) -> None:
        self.proc = proc
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    def start(self) -> "RssSampler":
        self.samples = []
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            rss = self.proc.rss_mb()
            if rss is not None:
                self.samples.append(rss)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return self.samples


async def overload(ctx: Context) -> dict[str, Any]:
    burst, steady_s, duration_s = ctx.pick((25_000, 5.0, 15.0), (100_000, 20.0, 60.0))
    http_limit = 32
    connections = 2 * http_limit  # twice the requests the sidecar serves at once
    scene = await GatewayScene.create(ctx, "overload", server={"max_in_flight_requests": http_limit})
    try:
        (gateway,) = await scene.start_replicas(1)
        # 1. the maximum, from a burst
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="max", n=burst, rate_rps=1e9)
        await load.run()
        await scene.drain(set(load.ids()), timeout_s=120, settle_s=0.0)
        # from the first request sent to the last answer appended (answers are appended in
        # batches, so the span of the answers alone would overstate the rate)
        last_ms = max(r.ts_ms for r in scene.predictions.records if r.key.startswith("max-"))
        max_rps = burst / max(0.001, last_ms / 1000.0 - load.started_s)
        ctx.say(f"overload: the gateway's maximum is {max_rps:.0f} requests/s")
        # 2. steady state at half of it
        sampler = RssSampler(gateway).start()
        steady = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="steady", n=int(max_rps * 0.5 * steady_s),
                            rate_rps=max_rps * 0.5)
        await steady.run()
        await scene.drain(set(steady.ids()), timeout_s=60, settle_s=0.0)
        steady_samples = await sampler.stop()
        steady_rss = max(steady_samples)
        ctx.say(f"overload: steady-state RSS {steady_rss:.0f} MB; offering {2 * max_rps:.0f} requests/s "
                f"for {duration_s:.0f}s plus {connections} HTTP connections")
        # 3. twice the maximum through Kafka, HTTP on top
        sampler.start()
        over = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="over", n=int(2 * max_rps * duration_s),
                          rate_rps=2 * max_rps)
        stop_http = asyncio.Event()
        tally = HttpTally()
        http_task = asyncio.get_running_loop().create_task(
            http_load(gateway.http_port, "http", connections, stop_http, tally))
        await over.run()
        stop_http.set()
        await http_task
        offered_s = over.finished_s - over.started_s
        # 4. drain
        drain_s = await scene.drain(set(over.ids()), timeout_s=max(120.0, 4 * duration_s), settle_s=0.5)
        overload_samples = await sampler.stop()
        answered = set(scene.predictions.keys)
        kafka_lost = sum(1 for request_id in over.ids() if request_id not in answered
                         and request_id not in scene.dead_keys())
        http_lost = sum(1 for request_id in tally.answered_ids if request_id not in answered)
        rejected = tally.statuses.get(429, 0) + tally.statuses.get(503, 0)
        result = {
            "max_rps": round(max_rps), "offered_kafka_rps": round(over.sent / max(offered_s, 1e-3)),
            "offered_s": round(offered_s, 1), "steady_rss_mb": round(steady_rss, 1),
            "max_rss_mb": round(max(overload_samples, default=0.0), 1),
            "rss_ratio": round(max(overload_samples, default=0.0) / steady_rss, 2),
            "lost": kafka_lost + http_lost, "kafka_lost": kafka_lost, "http_lost": http_lost,
            "sent": over.sent, "http_sent": tally.total, "http_answered": len(tally.answered_ids),
            "rejected_http": rejected, "http_statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
            "http_connect_errors": tally.connect_errors, "retry_after_missing": tally.retry_after_missing,
            "drain_s": round(drain_s, 2),
        }
    finally:
        await scene.close()
    result["crashes"] = scene.procs.crashes()
    result["unclean_exits"] = scene.procs.unclean_terms()
    return result
