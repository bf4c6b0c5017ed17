"""Redis up but refusing writes, under load: read-only (a failover), then over maxmemory.

Both keep the data and answer reads, so the gateways keep routing on fresh snapshots while every
write fails with an error reply (``READONLY``, ``OOM``) that redis-py raises as a ResponseError.
The feedback worker must take these for an outage (banditgate.redis_errors: transient): retry,
acknowledge nothing meanwhile, say so once, and apply everything exactly once afterwards; the
gateways' call counters wait for the next try. The load, the expectations and the checks are
redis_outage's (loadtests.faults.outages.redis_fault); only the fault differs.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis

from loadtests.faults.context import Context
from loadtests.faults.harness import free_port
from loadtests.faults.outages import RedisFault, redis_fault

DOWN_S = 10.0
"""How long Redis refuses writes, quick run and full run alike."""


async def _error_counts(client: aredis.Redis) -> dict[str, int]:
    """Redis's own count of error replies by code (INFO errorstats, Redis 6.2 and later)."""
    stats = await client.info("errorstats")
    return {name.removeprefix("errorstat_"): int(value["count"]) for name, value in stats.items()
            if isinstance(value, dict) and "count" in value}


async def _with_error_counts(ctx: Context, name: str, fault: RedisFault, client: aredis.Redis) -> dict[str, Any]:
    before = await _error_counts(client)
    timing = ctx.pick((300, 3.0, DOWN_S, 3.0), (800, 10.0, DOWN_S, 10.0))
    result = await redis_fault(ctx, name, timing, fault)
    after = await _error_counts(client)
    # what Redis itself refused meanwhile: evidence that the fault bit (scripts of Redis < 7 count
    # a refused write inside a script under their own wrapper's code)
    result["redis_error_replies"] = {code: after[code] - before.get(code, 0) for code in sorted(after)
                                     if after[code] != before.get(code, 0)}
    return result


async def redis_readonly(ctx: Context) -> dict[str, Any]:
    """`REPLICAOF` an address where nothing listens: Redis keeps its data and answers every write
    with READONLY, as a primary demoted in a failover does; `REPLICAOF NO ONE` restores it."""
    client = aredis.Redis.from_url(ctx.redis, socket_timeout=5, socket_connect_timeout=5)
    nowhere = free_port()
    try:
        fault = RedisFault(lambda: client.execute_command("REPLICAOF", "127.0.0.1", str(nowhere)),
                           lambda: client.execute_command("REPLICAOF", "NO", "ONE"),
                           doing=f"turning Redis read-only (REPLICAOF 127.0.0.1 {nowhere})",
                           undoing="taking writes again (REPLICAOF NO ONE)")
        return await _with_error_counts(ctx, "redis_readonly", fault, client)
    finally:
        await client.aclose()


async def redis_oom(ctx: Context) -> dict[str, Any]:
    """`maxmemory` just above the memory in use with `noeviction`: the next writes push it over
    and Redis answers them with OOM until the limit is lifted again."""
    client = aredis.Redis.from_url(ctx.redis, socket_timeout=5, socket_connect_timeout=5)
    saved = await client.config_get("maxmemory*")
    limit: list[int] = []

    async def begin() -> None:
        used = int((await client.info("memory"))["used_memory"])
        limit.append(used + 64 * 1024)
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", str(limit[0]))

    async def end() -> None:
        await client.config_set("maxmemory", saved.get("maxmemory", "0"))
        await client.config_set("maxmemory-policy", saved.get("maxmemory-policy", "noeviction"))

    try:
        fault = RedisFault(begin, end, doing="capping Redis at 64 KiB above its memory in use (noeviction)",
                           undoing="lifting the memory cap")
        result = await _with_error_counts(ctx, "redis_oom", fault, client)
        result["maxmemory_bytes"] = limit[0] if limit else None
        return result
    finally:
        await client.aclose()
