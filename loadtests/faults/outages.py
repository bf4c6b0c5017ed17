"""The servers go away under load: the broker restarts; Redis is down for a while.

Neither may need a process restart. While the broker is down the gateway holds its work and
resumes; while Redis is down the gateway keeps routing on its last arm snapshot and the feedback
worker holds its updates, applying each exactly once when Redis returns.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aredis
from aiokafka import AIOKafkaProducer

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import ARMS, ROUTE, FeedbackProc, feedback_config
from loadtests.faults.readback import Rec, delivery
from loadtests.faults.traffic import HttpTally, SteadyLoad, http_load


async def _probe_ready(procs: list[Any], stop: asyncio.Event, log: list[tuple[float, bool]]) -> None:
    while not stop.is_set():
        for proc in procs:
            log.append((time.time(), await proc.ready()))
        await asyncio.sleep(0.25)


def _ready_between(log: list[tuple[float, bool]], start: float, end: float) -> list[bool]:
    return [ok for ts, ok in log if start <= ts <= end]


async def broker_restart(ctx: Context, mode: str = "at_least_once", name: str = "broker_restart") -> dict[str, Any]:
    """Stop the broker for `down_s` mid-stream, start it again; nothing lost, recovery measured
    (`mode`: the gateway's delivery, at_least_once or exactly_once)."""
    rate, before_s, down_s, after_s = ctx.pick((400, 3.0, 6.0, 3.0), (1000, 8.0, 20.0, 10.0))
    n = int(rate * (before_s + down_s + after_s))
    scene = await GatewayScene.create(ctx, name, delivery=mode)
    try:
        (gateway,) = await scene.start_replicas(1)
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="broker", n=n, rate_rps=rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        probe_stop = asyncio.Event()
        readiness: list[tuple[float, bool]] = []
        probing = asyncio.get_running_loop().create_task(_probe_ready([gateway], probe_stop, readiness))
        await asyncio.sleep(before_s)
        ctx.say(f"{name}: stopping the broker after {load.sent} requests sent")
        await asyncio.to_thread(ctx.stack.stop_kafka)
        stopped_at = time.time()
        await asyncio.sleep(down_s)
        ctx.say(f"{name}: starting the broker again after {time.time() - stopped_at:.1f}s down")
        restart_at = time.time()
        await asyncio.to_thread(ctx.stack.start_kafka)
        back_at = time.time()
        sent_before_back = load.sent
        await sending
        backlog = {f"broker-{i}" for i in range(sent_before_back)}
        caught_up: list[float] = []

        def backlog_done() -> bool:
            if not caught_up and not backlog.difference(scene.predictions.keys, scene.dead_keys()):
                caught_up.append(time.time())
            return bool(caught_up)

        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(120, 300))
        backlog_done()
        probe_stop.set()
        await probing
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        back_ms = int(back_at * 1000)
        after = [r.ts_ms for r in scene.predictions.records if r.ts_ms >= back_ms]
        during = _ready_between(readiness, stopped_at + 2.0, restart_at)  # while no broker process ran
        result.update(
            down_s=round(back_at - stopped_at, 1),
            recovered_s=round((min(after) - back_ms) / 1000.0, 2) if after else None,
            dead_lettered=len(scene.dead_keys()), generator_resends=load.failed_sends,
            unready_during_outage=bool(during) and not any(during),
            # from the gateway's log: how often a publication failed and the producer was replaced
            publication_failures=gateway.output().count("could not be published"),
            producer_replacements=gateway.output().count("producer replaced"),
            transactions_redone=gateway.output().count("exactly-once: transaction for"),
            delivery=mode,
            ready_after=_ready_between(readiness, time.time() - 2.0, time.time())[-1:] == [True],
            drain_s=round(drain_s, 2),
        )
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result


# ---------------------------------------------------------------------------------------------
# Redis


def reward_for(request_id: str) -> float:
    """A fixed reward per request (so the expected arm statistics are known exactly)."""
    return 1.0 if zlib.crc32(request_id.encode()) % 3 == 0 else 0.0


class OutcomeResponder:
    """Answers every new prediction with its outcome (the product reporting back), and keeps the
    first prediction per request (lowest offset: the one the join keeps) for the expectations."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.first: dict[str, tuple[int, str]] = {}  # request id -> (offset, arm)
        self.produced_at: dict[str, float] = {}
        self._queue: list[str] = []
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def on_predictions(self, records: list[Rec]) -> None:
        for rec in records:
            if rec.value is None:
                continue
            known = self.first.get(rec.key)
            if known is None:
                self._queue.append(rec.key)
            if known is None or rec.offset < known[0]:
                self.first[rec.key] = (rec.offset, orjson.loads(rec.value)["arm"])

    async def start(self) -> "OutcomeResponder":
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True, linger_ms=5)
        await self._producer.start()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._producer is not None  # noqa: S101
        while not self._closing or self._queue:
            batch, self._queue = self._queue, []
            futures = []
            now = time.time()
            for request_id in batch:
                reward = reward_for(request_id)
                value = orjson.dumps({"request_id": request_id, "reward": reward, "label": int(reward), "ts": now})
                futures.append(await self._producer.send(self.topic, key=request_id.encode(), value=value))
                self.produced_at[request_id] = now
            if futures:
                await asyncio.gather(*futures)
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            await self._task
        if self._producer is not None:
            await self._producer.stop()

    def expected(self) -> dict[str, tuple[int, float]]:
        """Per arm: (outcomes, reward sum) the statistics must hold."""
        out = {arm: [0, 0.0] for arm in ARMS}
        for request_id, (_offset, arm) in self.first.items():
            if request_id in self.produced_at:
                out[arm][0] += 1
                out[arm][1] += reward_for(request_id)
        return {arm: (int(v[0]), float(v[1])) for arm, v in out.items()}


async def arm_statistics(client: aredis.Redis, prefix: str) -> dict[str, Any]:
    """The route's arm statistics hash as numbers: counter, and per arm weight and reward sum."""
    raw = {k.decode(): v.decode() for k, v in (await client.hgetall(f"{prefix}:{{{ROUTE}}}:arms")).items()}
    arms = {}
    for arm in ARMS:
        weight = float(raw.get(f"{arm}:w", 0.0))
        arms[arm] = (weight, weight * float(raw.get(f"{arm}:m", 0.0)))
    return {"counter": int(float(raw.get("counter", 0))), "arms": arms}


@dataclass(frozen=True)
class RedisFault:
    """How a Redis scenario breaks Redis and puts it right again (:func:`redis_fault` runs the
    same load and the same checks around it): `begin` / `end` with what they do, for the log."""

    begin: Callable[[], Awaitable[Any]]
    end: Callable[[], Awaitable[Any]]
    doing: str = "stopping Redis"
    undoing: str = "starting Redis again"


async def redis_outage(ctx: Context) -> dict[str, Any]:
    """Redis down for `down_s` while requests, predictions and outcomes flow (Kafka and HTTP)."""
    return await redis_fault(ctx, "redis_outage", ctx.pick((300, 3.0, 8.0, 3.0), (800, 10.0, 30.0, 10.0)),
                             RedisFault(lambda: asyncio.to_thread(ctx.stack.stop_redis),
                                        lambda: asyncio.to_thread(ctx.stack.start_redis)))


async def redis_fault(ctx: Context, name: str, timing: tuple[int, float, float, float],
                      fault: RedisFault) -> dict[str, Any]:
    """`fault` for `down_s` while requests, predictions and outcomes flow (Kafka and HTTP), with
    `timing` = (requests/s, seconds before, down_s, seconds after): nothing may be lost or counted
    twice, every process stays up; `recovered_s` is from the fault's end to the first outcome
    that arrived meanwhile being applied."""
    rate, before_s, down_s, after_s = timing
    n = int(rate * (before_s + down_s + after_s))
    scene = await GatewayScene.create(ctx, name)
    prefix = ctx.prefix(name)
    client = aredis.Redis.from_url(ctx.redis, socket_timeout=2, socket_connect_timeout=2)
    responder = OutcomeResponder(ctx.kafka, scene.topics["outcomes"])
    scene.predictions.keep_values = True
    scene.predictions.on_records = responder.on_predictions
    worker = FeedbackProc(f"{name}-feedback", feedback_config(
        kafka=ctx.kafka, redis=ctx.redis, topics=scene.topics, app_id=f"{prefix}-fb", redis_prefix=prefix), ctx.work)
    scene.procs.add(worker)
    try:
        worker.spawn()
        (gateway,) = await scene.start_replicas(1)
        await worker.wait_ready()
        await responder.start()
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="redis", n=n, rate_rps=rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        stop_http = asyncio.Event()
        tally = HttpTally()
        http_task = asyncio.get_running_loop().create_task(
            http_load(gateway.http_port, "http", 2, stop_http, tally, rate_rps=20))
        probe_stop = asyncio.Event()
        readiness: list[tuple[float, bool]] = []
        probing = asyncio.get_running_loop().create_task(_probe_ready([gateway], probe_stop, readiness))
        await asyncio.sleep(before_s)
        ctx.say(f"{name}: {fault.doing} after {load.sent} requests sent")
        await fault.begin()
        stopped_at = time.time()
        await asyncio.sleep(down_s)
        held = [rid for rid, ts in responder.produced_at.items() if ts >= stopped_at]
        ctx.say(f"{name}: {fault.undoing} after {time.time() - stopped_at:.1f}s "
                f"({len(held)} outcomes arrived meanwhile)")
        await fault.end()
        back_at = time.time()
        recovered_s, all_held_s = await _held_applied(client, prefix, held, back_at, timeout_s=60.0)
        await sending
        stop_http.set()
        await http_task
        ids = set(load.ids()) | set(tally.answered_ids)
        drain_s = await scene.drain(ids, timeout_s=ctx.pick(120, 300))
        # every answered request gets its outcome; wait until the worker has counted them all
        await asyncio.sleep(0.5)
        await responder.stop()
        expected = responder.expected()
        expected_total = sum(c for c, _ in expected.values())
        deadline = time.monotonic() + ctx.pick(90, 240)
        stats = await arm_statistics(client, prefix)
        while stats["counter"] < expected_total and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            stats = await arm_statistics(client, prefix)
        await asyncio.sleep(2.0)  # a double count would land now
        stats = await arm_statistics(client, prefix)
        probe_stop.set()
        await probing
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        request_lost = result["lost"]
        http_errors = tally.total - tally.statuses.get(200, 0)
        mismatches = []
        for arm, (count, total) in expected.items():
            weight, reward_sum = stats["arms"][arm]
            if abs(weight - count) > 1e-6 or abs(reward_sum - total) > 1e-6:
                mismatches.append(f"arm {arm}: weight {weight:g} reward {reward_sum:g}, expected {count} / {total:g}")
        during = [rec for rec in scene.predictions.records if stopped_at * 1000 <= rec.ts_ms <= back_at * 1000]
        log = gateway.output()
        result.update(
            outcomes=expected_total, applied=stats["counter"],
            double_counted=max(0, stats["counter"] - expected_total),
            lost=request_lost + max(0, expected_total - stats["counter"]),
            requests_lost=request_lost, outcomes_not_applied=max(0, expected_total - stats["counter"]),
            client_errors=len(scene.dead_keys()) + http_errors,
            http_sent=tally.total, http_statuses={str(k): v for k, v in sorted(tally.statuses.items())},
            answered_during_outage=len(during), held_outcomes=len(held),
            recovered_s=recovered_s, all_held_applied_s=all_held_s, down_s=round(back_at - stopped_at, 1),
            exact_arm_statistics=not mismatches, mismatches=mismatches,
            gateway_ready_during_outage=all(_ready_between(readiness, stopped_at, back_at) or [False]),
            gateway_outage_log_lines=log.count("arm statistics unavailable"),
            gateway_write_failure_log_lines=log.count("Redis writes fail"),
            feedback_outage_log_lines=worker.output().count("write failed"),
            feedback_fatal_log_lines=worker.output().count("stopping after an unexpected error"),
            drain_s=round(drain_s, 2),
        )
    finally:
        if not responder._closing:
            await responder.stop()
        await client.aclose()
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result


async def _held_applied(client: aredis.Redis, prefix: str, held: list[str], back_at: float,
                        timeout_s: float) -> tuple[float | None, float | None]:
    """Seconds from Redis back until the first, and until every, outcome that arrived during the
    outage is counted (its request's dedup mark exists in the arm statistics)."""
    if not held:
        return None, None
    first: float | None = None
    remaining = list(held)
    deadline = time.monotonic() + timeout_s
    while remaining and time.monotonic() < deadline:
        try:
            pipe = client.pipeline(transaction=False)
            for request_id in remaining:
                pipe.exists(f"{prefix}:{{{ROUTE}}}:seen:{request_id}")
            found = await pipe.execute()
        except Exception:  # noqa: BLE001 - Redis still loading: try again
            await asyncio.sleep(0.05)
            continue
        now = time.time()
        if any(found) and first is None:
            first = now - back_at
        remaining = [rid for rid, ok in zip(remaining, found) if not ok]
        if remaining:
            await asyncio.sleep(0.05)
    done = None if remaining else time.time() - back_at
    return (round(first, 2) if first is not None else None), (round(done, 2) if done is not None else None)
