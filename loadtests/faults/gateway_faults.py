"""Gateway replicas under faults: SIGKILL and restart, SIGTERM, scaling 1 → 3 → 1."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import GatewayProc, http_status
from loadtests.faults.readback import delivery, longest_gaps_ms, percentile
from loadtests.faults.traffic import SteadyLoad


async def _sleep_until(wall_s: float) -> None:
    delay = wall_s - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _load(ctx: Context, scene: GatewayScene, n: int, rate: float) -> SteadyLoad:
    return SteadyLoad(ctx.kafka, scene.topics["requests"], tag=scene.name, n=n, rate_rps=rate)


async def gateway_kill(ctx: Context, mode: str) -> dict[str, Any]:
    """Two replicas in one group; one is SIGKILLed mid-stream and restarted, `kills` times."""
    name = "gateway_kill_eos" if mode == "exactly_once" else "gateway_kill_alo"
    n, rate, kills = ctx.pick((5000, 1000, 1), (50_000, 2500, 3))
    scene = await GatewayScene.create(ctx, name, delivery=mode)
    try:
        _stable, victim = await scene.start_replicas(2)
        load = _load(ctx, scene, n, rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        while not load.started_s:
            await asyncio.sleep(0.01)
        duration = n / rate
        for k in range(kills):
            await _sleep_until(load.started_s + duration * (k + 0.5) / kills)
            victim.kill()
            ctx.say(f"{name}: SIGKILL {victim.name} ({k + 1}/{kills}) after {load.sent} requests sent")
            await asyncio.sleep(0.5)
            victim.spawn()
            await victim.wait_ready()
        await sending
        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(120, 300))
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        result.update(dead_lettered=len(scene.dead_keys()), kills=kills, delivery=mode, rate_rps=rate,
                      drain_s=round(drain_s, 2))
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result


async def graceful_shutdown(ctx: Context) -> dict[str, Any]:
    """Two replicas under load; SIGTERM one. It must turn unready, finish, commit and exit 0 in time."""
    n, rate = ctx.pick((5000, 1000), (30_000, 2000))
    scene = await GatewayScene.create(ctx, "graceful_shutdown")
    try:
        _stable, victim = await scene.start_replicas(2)
        load = _load(ctx, scene, n, rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        while not load.started_s:
            await asyncio.sleep(0.01)
        await _sleep_until(load.started_s + 0.4 * n / rate)
        ctx.say(f"graceful_shutdown: SIGTERM {victim.name} after {load.sent} requests sent")
        probe = asyncio.get_running_loop().create_task(_readiness_after_signal(victim))
        code, exit_s = await asyncio.to_thread(victim.terminate, 60.0)
        unready_s, unready_status = await probe
        await sending
        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(120, 300))
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        result.update(dead_lettered=len(scene.dead_keys()), exit_code=code, exit_s=round(exit_s, 2),
                      unready_after_s=unready_s, readiness_status_after_sigterm=unready_status,
                      grace_s=victim.config["shutdown_grace_s"],
                      drain_s=round(drain_s, 2))
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result


async def _readiness_after_signal(proc: GatewayProc) -> tuple[float | None, int | None]:
    """(seconds from now, status) of the first readiness answer that is not 200 (a 503 says the
    load balancer was told; None: the port closed before any such answer)."""
    started = time.monotonic()
    while proc.alive():
        status = await http_status(proc.http_port, "/v2/health/ready", timeout_s=2.0)
        if status != 200:
            return (round(time.monotonic() - started, 3) if status is not None else None), status
        await asyncio.sleep(0.01)
    return None, None


async def rebalance(ctx: Context) -> dict[str, Any]:
    """One replica, scaled to three and back to one (SIGTERM) while requests keep coming."""
    n, rate = ctx.pick((12_000, 800), (60_000, 2000))
    scene = await GatewayScene.create(ctx, "rebalance", partitions=6)
    try:
        await scene.start_replicas(1)
        load = _load(ctx, scene, n, rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        while not load.started_s:
            await asyncio.sleep(0.01)
        await asyncio.sleep(ctx.pick(1.0, 5.0))
        ctx.say(f"rebalance: scaling 1 -> 3 after {load.sent} requests sent")
        extra = await scene.start_replicas(2, first_index=1)
        await asyncio.sleep(ctx.pick(2.0, 8.0))
        ctx.say(f"rebalance: scaling 3 -> 1 after {load.sent} requests sent")
        stopped = await asyncio.gather(*(asyncio.to_thread(proc.terminate, 60.0) for proc in extra))
        scaled_down_under_load = not sending.done()
        await sending
        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(120, 300))
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        # gaps while requests were being sent (after the first answers), per output partition
        start_ms = int((load.started_s + 1.0) * 1000)
        end_ms = int(load.finished_s * 1000)
        gaps = longest_gaps_ms(scene.predictions.records, start_ms, end_ms)
        result.update(dead_lettered=len(scene.dead_keys()), pause_p99_ms=percentile(list(gaps.values()), 99),
                      pause_max_ms=max(gaps.values(), default=0),
                      longest_gap_per_partition_ms={str(p): g for p, g in sorted(gaps.items())},
                      scaled_down_under_load=scaled_down_under_load,
                      scale_down_exit_codes=[code for code, _ in stopped], drain_s=round(drain_s, 2))
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result
