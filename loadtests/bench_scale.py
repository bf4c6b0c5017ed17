"""`banditgate bench scale [--quick] --out FILE.json`: one process against two, gateways and workers.

Four phases on a Kafka broker and a Redis of the bench's own (the fault suite's `OwnStack`: free
loopback ports, purged at the end; the shared development stack is never touched), each on fresh
topics of `PARTITIONS` partitions and a fresh consumer group:

* ``gateway_x1``, ``gateway_x2``: 1 (2) `banditgate serve` processes with the same config join
  one consumer group on the requests topic; once the group is stable, a backlog of N requests is
  produced at full speed and they answer it. Throughput is requests answered per second, counted
  from the predictions topic (read back by a tail of its own, distinct request ids);
* ``worker_x1``, ``worker_x2``: 1 (2) `banditgate feedback` processes with the same app id; once
  they are ready and the group is stable, a backlog of N predictions and their N outcomes is
  produced and they apply it. Throughput is outcomes applied per second, counted from the
  worker's own ledger in Redis (the route's ``joined`` counter, which the ledger script
  increments in the same script call as the arm update).

The processes start on empty topics so that start-up and the rebalances that take every member
in are over before any work exists (a backlog produced before they start is half drained by the
first process while the second one starts). The measured window opens when the last record of
the backlog is acknowledged (the producer no longer competes for the cores; the work done while
it produced is outside the window) and ends when 90% of the backlog is done (partitions drain
unevenly at the very end) or at a time cap. The CPU time the measured processes used in the
window (from /proc) gives the figures per core; Redis's own `INFO commandstats` and CPU, reset
when the backlog starts, give Redis commands and Redis CPU per request and per outcome.

JSON keys: ``one_replica_rps``, ``two_replicas_rps``, ``scaling_ratio`` (two / one),
``one_worker_ops``, ``two_workers_ops``, ``workers_scaling_ratio``, ``cores``, ``load_average``,
``phases`` (per phase: ``rate``, ``per_cpu_s``, ``cpu_cores``, ``servers_cores``, ``machine_cores``,
``window_s``, ``counted``, ``n``, ``crashes``, ``redis``), ``gateway_rps_per_core`` and
``worker_ops_per_core`` (one process's ``per_cpu_s``), ``redis_per_request`` and
``redis_per_outcome`` (see `redis_per_unit`), ``partitions``, ``quick``, ``seconds``. A markdown
table is written beside the JSON (``FILE.md``); the exit code is 1 when a phase failed or a
process crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PARTITIONS = 4
FRACTION = 0.9
"""The window ends when this share of the backlog is done: past it, the partitions that drained
first leave their process idle while another finishes, which measures the key spread, not the rate."""
SAMPLE_S = 0.2



@dataclass(frozen=True)
class Sizes:
    """Backlog sizes and the most seconds a window may last (both bounded: a slow machine ends a
    window at the cap and reports what it counted)."""

    gateway_n: int
    worker_n: int
    cap_s: float


QUICK = Sizes(gateway_n=40_000, worker_n=16_000, cap_s=25.0)
FULL = Sizes(gateway_n=400_000, worker_n=150_000, cap_s=60.0)


def _say(message: str) -> None:
    print(f"bench scale: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# pure: rates from samples, ratios, Redis deltas, the JSON and the table


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds (monotonic)
    done: int  # requests answered / outcomes applied so far
    cpu_s: float  # CPU seconds the measured processes used so far
    servers_cpu_s: float = 0.0  # CPU seconds of the bench's Kafka broker and Redis so far
    machine_cpu_s: float = 0.0  # CPU seconds of the whole machine (every process, anyone's) so far


def window(samples: list[Sample], t0: float, total: int, fraction: float = FRACTION) -> dict[str, Any]:
    """The rate between the first sample at or after `t0` and the first one that reached
    `fraction` of `total` (or the last sample): ``rate`` per second, ``per_cpu_s`` per CPU second
    of the measured processes, ``cpu_cores`` (CPU seconds per second: how many cores they kept
    busy), ``servers_cores`` (the same for the broker and Redis), ``machine_cores`` (the whole
    machine: at the core count, the window was CPU-bound), ``window_s``, ``counted``. Raises ValueError when the window is empty (the backlog was
    done before the window opened: too small a backlog for this machine)."""
    after = [s for s in samples if s.t >= t0]
    if len(after) < 2:
        raise ValueError("fewer than two samples in the window")
    start = after[0]
    goal = fraction * total
    end = next((s for s in after if s.done >= goal), after[-1])
    span = end.t - start.t
    counted = end.done - start.done
    if span <= 0 or counted <= 0:
        raise ValueError(f"nothing done in the window ({start.done} of {total} done when it opened): "
                         "the backlog is too small for this machine")
    cpu = end.cpu_s - start.cpu_s
    return {"rate": round(counted / span, 1), "per_cpu_s": round(counted / cpu, 1) if cpu > 0 else None,
            "cpu_cores": round(cpu / span, 2), "servers_cores": round((end.servers_cpu_s - start.servers_cpu_s) / span, 2),
            "machine_cores": round((end.machine_cpu_s - start.machine_cpu_s) / span, 2),
            "window_s": round(span, 2), "counted": counted,
            "done_at_start": start.done, "reached": end.done >= goal}


def ratio(two: float | None, one: float | None) -> float | None:
    return round(two / one, 3) if two is not None and one else None


BENCH_COMMANDS = ("info", "config", "dbsize")
"""What the bench itself sends to Redis to read and reset these statistics: never counted."""


def commandstats_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                       own: dict[str, int] | None = None) -> dict[str, int]:
    """Calls per command between two `INFO commandstats` (redis-py's parsed form: ``cmdstat_X``
    -> {"calls": ...}), less the bench's own calls (`own`, and BENCH_COMMANDS); commands run
    inside Lua scripts count under their own names as well."""
    out = {}
    for key, stats in after.items():
        name = key.removeprefix("cmdstat_")
        if name.split("|", 1)[0] in BENCH_COMMANDS:
            continue
        calls = int(stats.get("calls", 0)) - int(before.get(key, {}).get("calls", 0)) - (own or {}).get(name, 0)
        if calls > 0:
            out[name] = calls
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def redis_per_unit(calls: dict[str, int], cpu_s: float, units: int,
                   footprint: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Redis load per unit of work (a request answered, an outcome applied): ``commands`` (every
    command Redis executed, those inside scripts too: commandstats cannot tell them apart),
    ``scripts`` (script calls: one round trip each, however many commands they run), ``cpu_us``
    (Redis CPU per unit), ``keys`` and ``memory_bytes`` (what the phase left in Redis per unit,
    from a `footprint` of (keys, bytes) added: dedup marks held for their TTL) and
    ``by_command`` (per unit, largest first). Start-up and periodic
    work (snapshot reads, heartbeats) are spread over the units, so a longer run shows less."""
    if units <= 0:
        return {}
    total = sum(calls.values())
    scripts = sum(calls.get(c, 0) for c in SCRIPT_COMMANDS)
    return {"units": units, "commands": round(total / units, 3), "scripts": round(scripts / units, 4),
            "cpu_us": round(cpu_s * 1e6 / units, 2), "keys": round(footprint[0] / units, 3),
            "memory_bytes": round(footprint[1] / units, 1),
            "by_command": {name: round(n / units, 4) for name, n in calls.items()}}


def summary(phases: dict[str, dict[str, Any]], *, cores: int, load_average: list[float], quick: bool,
            partitions: int = PARTITIONS) -> dict[str, Any]:
    """The bench's JSON from its four phases (``gateway_x1``, ``gateway_x2``, ``worker_x1``,
    ``worker_x2``; a phase that failed carries ``error`` and its rates are None)."""
    def rate(name: str) -> float | None:
        return phases.get(name, {}).get("rate")

    return {
        "one_replica_rps": rate("gateway_x1"), "two_replicas_rps": rate("gateway_x2"),
        "scaling_ratio": ratio(rate("gateway_x2"), rate("gateway_x1")),
        "one_worker_ops": rate("worker_x1"), "two_workers_ops": rate("worker_x2"),
        "workers_scaling_ratio": ratio(rate("worker_x2"), rate("worker_x1")),
        "gateway_rps_per_core": phases.get("gateway_x1", {}).get("per_cpu_s"),
        "worker_ops_per_core": phases.get("worker_x1", {}).get("per_cpu_s"),
        "redis_per_request": phases.get("gateway_x1", {}).get("redis", {}),
        "redis_per_outcome": phases.get("worker_x1", {}).get("redis", {}),
        "cores": cores, "load_average": load_average, "partitions": partitions, "quick": quick,
        "phases": phases,
    }


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, (int, float)) else str(value)


def markdown(doc: dict[str, Any]) -> str:
    rows = [("gateway_x1", "gateway (`serve`)", 1, "requests/s"), ("gateway_x2", "gateway (`serve`)", 2, "requests/s"),
            ("worker_x1", "feedback worker", 1, "outcomes/s"), ("worker_x2", "feedback worker", 2, "outcomes/s")]
    lines = [(f"banditgate bench scale ({'quick' if doc['quick'] else 'full'} run): one process against two, "
              f"{doc['partitions']} partitions, one consumer group, the backlog produced once they are in"),
             "",
             (f"This machine has {doc['cores']} cores (load average {doc['load_average']} at the start), shared "
              "by Kafka, Redis, the bench's own readers and the processes measured: two processes compete for the "
              "same cores, so a ratio below 2 shows this machine's contention, not how replicas on their own "
              "cores scale. Per core = per CPU second the measured processes used in the window."),
             "",
             ("Cores busy: the measured processes; Kafka + Redis: the bench's broker and Redis; machine: every "
              "process on it, the other users' included (at the core count, the window was CPU-bound)."),
             "",
             ("| process | replicas | throughput | unit | per core | cores busy | Kafka + Redis | machine | window s "
              "| counted | backlog |"),
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, label, count, unit in rows:
        p = doc["phases"].get(key, {})
        if "error" in p:
            lines.append(f"| {label} | {count} | error: {p['error']} | | | | | | | | {_cell(p.get('n'))} |")
            continue
        lines.append(f"| {label} | {count} | {_cell(p.get('rate'))} | {unit} | {_cell(p.get('per_cpu_s'))} | "
                     f"{_cell(p.get('cpu_cores'))} | {_cell(p.get('servers_cores'))} | {_cell(p.get('machine_cores'))} | "
                     f"{_cell(p.get('window_s'))} | {_cell(p.get('counted'))} | "
                     f"{_cell(p.get('n'))} |")
    lines += ["", (f"scaling ratio (two / one): gateways {_cell(doc['scaling_ratio'])}, "
                   f"workers {_cell(doc['workers_scaling_ratio'])}"), ""]
    for key, unit in (("redis_per_request", "request"), ("redis_per_outcome", "outcome")):
        r = doc.get(key) or {}
        if r:
            top = ", ".join(f"{name} {n}" for name, n in list(r["by_command"].items())[:8])
            lines.append(f"Redis per {unit} (one process, {r['units']:,} {unit}s): {r['commands']} commands "
                         f"({r['scripts']} script calls), {r['cpu_us']} µs of Redis CPU, {r['keys']} keys and "
                         f"{r['memory_bytes']} bytes left in Redis; by command: {top}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# I/O: backlog, group membership, CPU of processes, Redis stats


def machine_cpu_s() -> float:
    """CPU seconds the machine spent outside idle and iowait since boot (every core, every process)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pids: Iterable[int | None]) -> float:
    """User + system CPU seconds of the processes (all their threads); a gone process adds 0."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        if pid is None:
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
    return total


async def produce(bootstrap: str, records: Iterable[tuple[str, bytes, bytes]], partitions: int) -> tuple[int, float]:
    """Send (topic, key, value) records with the producer's batch API, grouped per partition the
    way the default partitioner places the key (so a request's prediction and outcome share a
    partition number); returns how many were acknowledged and the seconds it took."""
    from aiokafka import AIOKafkaProducer

    from gateway.transport.kafka_batches import partition_for

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024,
                                request_timeout_ms=60_000)
    await producer.start()
    sent = 0
    started = time.monotonic()
    try:
        open_batches: dict[tuple[str, int], Any] = {}
        futures: list[tuple[asyncio.Future, int]] = []
        counts: dict[tuple[str, int], int] = {}

        async def flush(slot: tuple[str, int]) -> None:
            batch = open_batches.pop(slot)
            futures.append((await producer.send_batch(batch, slot[0], partition=slot[1]), counts.pop(slot)))

        for topic, key, value in records:
            slot = (topic, partition_for(key, partitions))
            if slot not in open_batches:
                open_batches[slot] = producer.create_batch()
                counts[slot] = 0
            if open_batches[slot].append(key=key, value=value, timestamp=None) is None:
                await flush(slot)
                open_batches[slot] = producer.create_batch()
                counts[slot] = 0
                open_batches[slot].append(key=key, value=value, timestamp=None)
            counts[slot] += 1
        for slot in list(open_batches):
            await flush(slot)
        for future, count in futures:
            await future
            sent += count
    finally:
        await producer.stop()
    return sent, time.monotonic() - started


async def wait_group(bootstrap: str, group: str, members: int, timeout_s: float) -> None:
    """Until the consumer group is Stable with `members` members (the rebalance that took the
    last one in is over)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        seen = ("?", -1)
        while time.monotonic() < deadline:
            response = (await admin.describe_consumer_groups([group]))[0]
            for entry in response.groups:  # (error_code, group, state, protocol_type, protocol, members, ...)
                seen = (entry[2], len(entry[5]))
                if entry[1] == group and entry[2] == "Stable" and len(entry[5]) == members:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"consumer group {group} not Stable with {members} members within {timeout_s:.0f}s "
                           f"(last: {seen[0]}, {seen[1]} members)")
    finally:
        await admin.close()


class RedisStats:
    """Redis's own command counts and CPU, reset at the start of a phase."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aredis

        self.client = aredis.Redis.from_url(url)

    async def reset(self) -> None:
        await self.client.config_resetstat()

    async def read(self) -> tuple[dict[str, dict[str, float]], float]:
        """(`INFO commandstats`, Redis CPU seconds so far)."""
        stats = await self.client.info("commandstats")
        cpu = await self.client.info("cpu")
        return stats, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    async def footprint(self) -> tuple[int, int]:
        """(keys, bytes of memory in use)."""
        memory = await self.client.info("memory")
        return int(await self.client.dbsize()), int(memory["used_memory"])

    async def close(self) -> None:
        await self.client.aclose()


SERVER_PIDS: list[int | None] = []
"""The bench's own Kafka broker and Redis (filled in once they run)."""


async def sample_until(count: Callable[[], Awaitable[int]], pids: list[int], total: int, cap_s: float,
                       alive: Callable[[], bool], name: str) -> list[Sample]:
    """Samples every SAMPLE_S until `total` is done, the cap, or a measured process died."""
    samples: list[Sample] = []
    deadline = time.monotonic() + cap_s
    last_report = time.monotonic()
    while time.monotonic() < deadline:
        done = await count()
        samples.append(Sample(time.monotonic(), done, proc_cpu_s(pids), proc_cpu_s(SERVER_PIDS), machine_cpu_s()))
        if done >= total or not alive():
            break
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            _say(f"{name}: {done:,}/{total:,}")
        await asyncio.sleep(SAMPLE_S)
    return samples


# ---------------------------------------------------------------------------------------------
# phases


async def gateway_phase(ctx: Any, replicas: int, n: int, cap_s: float, redis_stats: RedisStats) -> dict[str, Any]:
    from loadtests.faults.context import GatewayScene
    from loadtests.faults.traffic import good_rows, request_value

    name = f"scale_gw{replicas}"
    scene = await GatewayScene.create(ctx, name, partitions=PARTITIONS)
    try:
        rows = good_rows(2000, seed=replicas)
        tag = f"s{replicas}"
        procs = await scene.start_replicas(replicas)
        await wait_group(ctx.kafka, f"{ctx.prefix(name)}-gw", replicas, 60.0)
        await redis_stats.reset()
        _, cpu_before = await redis_stats.read()
        keys_before, memory_before = await redis_stats.footprint()
        produced, produce_s = await produce(
            ctx.kafka, ((scene.topics["requests"], f"{tag}-{i}".encode(), request_value(f"{tag}-{i}", rows[i % len(rows)]))
                        for i in range(n)), PARTITIONS)
        t0 = time.monotonic()
        _say(f"{name}: {produced:,} requests produced in {produce_s:.1f}s; {len(scene.predictions.keys):,} answered "
             "meanwhile; the window opens")

        async def answered() -> int:
            return len(scene.predictions.keys)

        samples = await sample_until(answered, [p.pid for p in procs], n, cap_s,
                                     lambda: all(p.alive() for p in procs), name)
        stats, cpu_after = await redis_stats.read()
        result = {"n": n, "replicas": replicas, "produce_s": round(produce_s, 2), **window(samples, t0, n)}
        done = samples[-1].done
        keys_after, memory_after = await redis_stats.footprint()
        result["redis"] = redis_per_unit(commandstats_delta({}, stats), cpu_after - cpu_before, done,
                                         (keys_after - keys_before, memory_after - memory_before))
        result["answered"] = done
        result["dead_lettered"] = len(scene.dead_keys())
    finally:
        await scene.close()
    result["crashes"] = scene.procs.crashes()
    return result


def feedback_events(n: int, tag: str, seed: int) -> Iterable[tuple[str, bytes, bytes]]:
    """(topic field, key, value): prediction i then outcome i, two arms, rewards 0/1."""
    from loadtests.faults.harness import ARMS, ROUTE

    rng = random.Random(seed)  # noqa: S311 - rewards of a benchmark, not secrets
    now = time.time()
    arms = sorted(ARMS)
    for i in range(n):
        request_id = f"{tag}-{i}"
        arm = arms[i % len(arms)]
        model, version = ARMS[arm]
        probability = rng.random()
        reward = float(rng.random() < probability)
        key = request_id.encode()
        yield "predictions", key, orjson.dumps({
            "request_id": request_id, "route": ROUTE, "arm": arm, "model": model, "model_version": version,
            "policy": "thompson", "propensity": 0.5,
            "outputs": {"probability": [probability], "label": int(probability >= 0.5)},
            "ts_request": now - 0.01, "ts_predicted": now, "latency_ms": 2.0})
        yield "outcomes", key, orjson.dumps({"request_id": request_id, "reward": reward, "label": int(reward),
                                             "ts": now + 1})


async def worker_phase(ctx: Any, workers: int, n: int, cap_s: float, redis_stats: RedisStats) -> dict[str, Any]:
    from loadtests.faults.harness import ROUTE, FeedbackProc, Processes, create_topics, feedback_config

    name = f"scale_fb{workers}"
    prefix = ctx.prefix(name)
    topics = await create_topics(ctx.kafka, prefix, PARTITIONS)
    app_id = f"{prefix}-fb"
    procs = Processes()
    counts_key = f"{prefix}:{{{ROUTE}}}:fb:counts"
    try:
        config = feedback_config(kafka=ctx.kafka, redis=ctx.redis, topics=topics, app_id=app_id, redis_prefix=prefix)
        running = [FeedbackProc(f"{name}-{i}", config, ctx.work) for i in range(workers)]
        for proc in running:
            procs.add(proc).spawn()
        await asyncio.gather(*(proc.wait_ready() for proc in running))
        await wait_group(ctx.kafka, app_id, workers, 90.0)

        async def applied() -> int:
            raw = await redis_stats.client.hget(counts_key, "joined")
            return int(float(raw)) if raw is not None else 0

        await redis_stats.reset()
        _, cpu_before = await redis_stats.read()
        keys_before, memory_before = await redis_stats.footprint()
        produced, produce_s = await produce(ctx.kafka, ((topics[field], key, value) for field, key, value
                                                        in feedback_events(n, f"w{workers}", seed=workers)), PARTITIONS)
        t0 = time.monotonic()
        before = await applied()
        _say(f"{name}: {produced:,} predictions and outcomes produced in {produce_s:.1f}s; {before:,} applied "
             "meanwhile; the window opens")

        samples = await sample_until(applied, [p.pid for p in running], n, cap_s,
                                     lambda: all(p.alive() for p in running), name)
        stats, cpu_after = await redis_stats.read()
        result = {"n": n, "workers": workers, "produce_s": round(produce_s, 2), **window(samples, t0, n)}
        done = samples[-1].done
        polls = {"hget": len(samples) + 1}  # the bench's own reads of the counter
        keys_after, memory_after = await redis_stats.footprint()
        result["redis"] = redis_per_unit(commandstats_delta({}, stats, polls), cpu_after - cpu_before, done,
                                         (keys_after - keys_before, memory_after - memory_before))
        result["applied"] = done
    finally:
        await asyncio.to_thread(procs.stop_all)
    result["crashes"] = procs.crashes()
    return result


async def _run(root: Path, quick: bool) -> dict[str, dict[str, Any]]:
    from loadtests.faults.context import Context
    from loadtests.faults.harness import OwnStack, write_models

    sizes = QUICK if quick else FULL
    stack = OwnStack(root / "stack")
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    phases: dict[str, dict[str, Any]] = {}
    _say(f"starting the bench's own Kafka (port {stack.stack.kafka_port}) and Redis (port {stack.stack.redis_port})")
    try:
        await asyncio.to_thread(stack.up, _say)
        state = stack.stack._read_state()  # noqa: SLF001 - the pids the stack recorded, for their CPU time
        SERVER_PIDS[:] = [state.get(server, {}).get("pid") for server in ("kafka", "redis")]
        ctx = Context(stack=stack, work=work, models=write_models(work / "models"), quick=quick,
                      run_id=uuid.uuid4().hex[:6], say=_say)
        redis_stats = RedisStats(stack.redis)
        try:
            plan = [("gateway_x1", 1), ("gateway_x2", 2), ("worker_x1", 1), ("worker_x2", 2)]
            for name, count in plan:
                started = time.monotonic()
                try:
                    if name.startswith("gateway"):
                        phases[name] = await gateway_phase(ctx, count, sizes.gateway_n, sizes.cap_s, redis_stats)
                    else:
                        phases[name] = await worker_phase(ctx, count, sizes.worker_n, sizes.cap_s, redis_stats)
                except Exception as exc:  # noqa: BLE001 - one phase's failure is reported; the others still run
                    _say(f"{name} failed: {type(exc).__name__}: {exc}")
                    phases[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                phases[name]["seconds"] = round(time.monotonic() - started, 1)
                shown = {k: phases[name][k] for k in ("rate", "per_cpu_s", "cpu_cores", "window_s", "error") if k in phases[name]}
                _say(f"{name}: {json.dumps(shown)}")
        finally:
            await redis_stats.close()
    finally:
        _say("stopping the bench's own Kafka and Redis")
        await asyncio.to_thread(stack.down)
    return phases


def cores() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run(out: Path, quick: bool = False) -> int:
    """Run the four phases; write the JSON to `out` and the markdown table beside it."""
    import uvloop

    from banditgate.stack import cache_dir

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    base = cache_dir() / "scale"
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    load = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    phases: dict[str, dict[str, Any]] = {}
    try:
        phases = uvloop.run(_run(root, quick))
    finally:
        failed = [name for name, p in phases.items() if "error" in p]
        if failed or not phases:  # keep the processes' logs for whoever investigates
            logs = out.parent / f"{out.stem}-logs"
            shutil.rmtree(logs, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copytree(root / "work", logs, ignore=shutil.ignore_patterns("models"), dirs_exist_ok=True)
                _say(f"logs of the processes kept in {logs}")
        shutil.rmtree(root, ignore_errors=True)
    doc = summary(phases, cores=cores(), load_average=load, quick=quick)
    doc["seconds"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    out.with_suffix(".md").write_text(table)
    print(table)
    crashes = sum(p.get("crashes", 0) for p in phases.values())
    if failed or crashes:
        print(f"bench scale: failed phases {failed or '-'}, crashes {crashes}", flush=True)
        return 1
    return 0
