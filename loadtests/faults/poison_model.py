"""A poison model: one arm's model crashes on every request it gets. The route must keep answering
with its other arm, the broken arm must be drained to the exploration floor (its failures are
counted per arm in the store, where the guardrail's error-rate test finds it), and one `guardrail`
alert must say so.

Every request is answered (healthy arm) or dead-lettered with the model's error (broken arm):
nothing is lost. The requests the broken arm got are reported as `failed_on_broken_arm`, before
and after the drain: after it, only the floor's share reaches that arm.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aredis

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import ARMS, CRASHING_MODEL, route_config
from loadtests.faults.readback import TopicTail
from loadtests.faults.traffic import SteadyLoad

ROUTE = "poisoned"
FLOOR = 0.05


def poisoned_route() -> dict[str, Any]:
    model, version = ARMS["a"]
    return {"name": ROUTE, "policy": "thompson", "exploration_floor": FLOOR,
            "guardrail": {"min_outcomes": 100},
            "arms": [{"name": "healthy", "model": model, "version": version},
                     {"name": "broken", "model": CRASHING_MODEL[0], "version": CRASHING_MODEL[1]}]}


async def poison_model(ctx: Context) -> dict[str, Any]:
    n, rate = ctx.pick((8000, 500), (30_000, 1000))
    scene = await GatewayScene.create(ctx, "poison_model", routes=[route_config(), poisoned_route()])
    prefix = ctx.prefix("poison_model")
    client = aredis.Redis.from_url(ctx.redis)
    alerts = await TopicTail(ctx.kafka, scene.topics["alerts"], keep_values=True).start()
    try:
        await scene.start_replicas(1)
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="poison", n=n, rate_rps=rate, route=ROUTE,
                          negative_first=True)
        sending = asyncio.get_running_loop().create_task(load.run())
        drained_at: float | None = None
        while not sending.done():
            state = await client.hget(f"{prefix}:{{{ROUTE}}}:arms", "broken:state")
            if state == b"drained" and drained_at is None:
                drained_at = time.time()
                ctx.say(f"poison_model: the broken arm was drained after {drained_at - load.started_s:.1f}s "
                        f"({load.sent} requests sent)")
            await asyncio.sleep(0.1)
        await sending
        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(90, 240))
        answered = set(scene.predictions.keys)
        dead = scene.dead_keys()
        lost = sum(1 for request_id in load.ids() if request_id not in answered and request_id not in dead)
        drained_ms = int(drained_at * 1000) if drained_at is not None else None
        failed_before = failed_after = total_after = 0
        for rec in scene.deadletter.records:
            if drained_ms is not None and rec.ts_ms > drained_ms + 1000:  # one refresh after the drain
                failed_after += 1
            else:
                failed_before += 1
        if drained_ms is not None:
            total_after = sum(1 for rec in scene.predictions.records if rec.ts_ms > drained_ms + 1000) + failed_after
        alert_docs = [orjson.loads(rec.value) for rec in alerts.records if rec.value is not None]
        guardrail_alerts = [a for a in alert_docs if a.get("kind") == "guardrail" and a.get("arm") == "broken"]
        result = {
            "sent": n, "answered": len(answered & set(load.ids())), "lost": lost,
            "failed_on_broken_arm": len(dead), "failed_before_drain": failed_before,
            "failed_after_drain": failed_after,
            "broken_share_after_drain": round(failed_after / total_after, 4) if total_after else None,
            "exploration_floor": FLOOR, "drained": drained_at is not None,
            "drained_after_s": round(drained_at - load.started_s, 2) if drained_at is not None else None,
            "guardrail_alerts": len(guardrail_alerts), "drain_s": round(drain_s, 2),
        }
    finally:
        await alerts.stop()
        await client.aclose()
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result
