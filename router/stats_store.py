"""Arm statistics in Redis: idempotent batched updates, one-round-trip snapshots, admin states.

The router's only I/O. Key layout for route R with prefix P (hash tag ``{R}`` keeps every key of
a route in one Redis Cluster slot, so the Lua script may touch them all):

``P:{R}:arms`` (hash)
    ``counter``          outcomes counted so far (the discounting clock)
    ``half_life``        half-life in outcomes used by the last writer (0: none)
    ``<arm>:w``          weight (effective outcome count) as of the arm's last update
    ``<arm>:m``          weighted mean reward
    ``<arm>:q``          weighted sum of squared deviations (m2)
    ``<arm>:c``          ``counter`` right after the arm's last update
    ``<arm>:state``      ``active`` or ``drained``
    ``<arm>:calls`` / ``<arm>:errors``   served / failed requests (gateway counters)
``P:{R}:seen:<request_id>`` (string with TTL ``dedup_ttl_s``)
    marks an outcome as counted

Discounting is lazy: an outcome multiplies every arm's weight and m2 by 2^(-1/half_life), but
instead of rewriting all arms the script decays only the arm it updates, by the outcomes since
that arm's ``c``; readers decay each arm by ``counter - c`` the same way. That is exactly the
per-outcome decay, with one arm written per outcome.

The update script, per (request_id, arm, reward): ``SET seen NX EX ttl``; if the key was new it
increments ``counter``, decays the arm by ``counter - c`` (the outcomes since its last update,
this one included), adds the reward with weight 1 (Welford) and stores ``c = counter``; otherwise
it counts a duplicate. So the newest outcome weighs 1 and one k outcomes older 2^(-k/half_life).
Redis runs a script atomically, so concurrent updaters never lose an update and a redelivered
outcome never counts twice.

The snapshot refresher gateways run lives in :mod:`router.refresher` and is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from banditgate.config import RedisConfig, Route
from banditgate.events import MAX_MAGNITUDE, is_name
from router.arm_stats import ARM_STATES, ArmSnapshot, ArmStats, RouteSnapshot, decay_factor

# at most this many outcomes per script call: keeps each atomic step short on the Redis side
_CHUNK = 1000

ARM_UPDATE_LUA = """
local MAX_MAGNITUDE = 1e15
local MAX_STORED = 1e300
local function bg_number(v)
  return type(v) == 'number' and v >= -MAX_MAGNITUDE and v <= MAX_MAGNITUDE
end
local function bg_count(v)
  return type(v) == 'number' and v >= 1 and v <= 1e12 and v % 1 == 0
end
local function bg_name(v)
  return type(v) == 'string' and #v <= 128 and string.find(v, '^[%w][%w_%.%-]*$') ~= nil
end
local function bg_refuse(why)
  return redis.error_reply('BGREFUSED ' .. why)
end
local function bg_stored(hash, field, value)
  -- a number this code wrote (or nothing); NaN fails both comparisons
  if value == false or value == nil then return 0, nil end
  local n = tonumber(value)
  if n == nil or not (n >= -MAX_STORED and n <= MAX_STORED) then
    return nil, 'field ' .. field .. ' of ' .. hash .. ' holds ' .. string.sub(tostring(value), 1, 40) .. ', not a number'
  end
  return n, nil
end
local function bg_hash_or_none(key)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'hash' and t ~= 'none' then return key .. ' holds a ' .. t .. ', not a hash' end
  return nil
end
local function arm_check(arm, reward)
  if not bg_name(arm) then return 'arm ' .. string.sub(tostring(arm), 1, 64) .. ' is not a name' end
  if not bg_number(reward) then return 'reward ' .. tostring(reward) .. ' is not a number in [-1e15, 1e15]' end
  return nil
end
local function arm_open(hash, half_life)
  -- reads only: the caller refuses the call (before any write) when this returns an error
  if type(half_life) ~= 'number' or not (half_life >= 0 and half_life <= 1e12) then
    return nil, 'half-life ' .. tostring(half_life) .. ' is not a number in [0, 1e12]'
  end
  local why = bg_hash_or_none(hash)
  if why then return nil, why end
  local counter, err = bg_stored(hash, 'counter', redis.call('HGET', hash, 'counter'))
  if err then return nil, err end
  return {hash = hash, half_life = half_life, counter = counter, arms = {}, applied = 0, duplicates = 0}, nil
end
local function arm_load(s, arm)
  -- reads one arm's fields into the state (before any write); returns an error or nil
  if s.arms[arm] then return nil end
  local names = {':w', ':m', ':q', ':c'}
  local v = redis.call('HMGET', s.hash, arm .. ':w', arm .. ':m', arm .. ':q', arm .. ':c')
  local a = {}
  for i, suffix in ipairs(names) do
    local n, err = bg_stored(s.hash, arm .. suffix, v[i])
    if err then return err end
    a[i] = n
  end
  if a[1] < 0 or a[3] < 0 then return 'arm ' .. arm .. ' of ' .. s.hash .. ' has a negative weight or m2' end
  s.arms[arm] = {w = a[1], m = a[2], q = a[3], c = a[4]}
  return nil
end
local function arm_add(s, seen, ttl, arm, reward)
  if not redis.call('SET', seen, '1', 'NX', 'EX', ttl) then
    s.duplicates = s.duplicates + 1
    return
  end
  local a = s.arms[arm]
  s.counter = s.counter + 1
  if s.half_life > 0 and s.counter > a.c then
    local f = math.pow(2, -(s.counter - a.c) / s.half_life)
    a.w = a.w * f
    a.q = a.q * f
  end
  a.w = a.w + 1
  local delta = reward - a.m
  a.m = a.m + delta / a.w
  a.q = a.q + delta * (reward - a.m)
  a.c = s.counter
  s.applied = s.applied + 1
end
local function arm_close(s)
  if s.applied > 0 then
    local fields = {'counter', string.format('%d', s.counter), 'half_life', string.format('%.17g', s.half_life)}
    for arm, a in pairs(s.arms) do
      table.insert(fields, arm .. ':w'); table.insert(fields, string.format('%.17g', a.w))
      table.insert(fields, arm .. ':m'); table.insert(fields, string.format('%.17g', a.m))
      table.insert(fields, arm .. ':q'); table.insert(fields, string.format('%.17g', a.q))
      table.insert(fields, arm .. ':c'); table.insert(fields, string.format('%d', a.c))
    end
    redis.call('HSET', s.hash, unpack(fields))
  end
end
"""
"""The arm update as Lua functions, for any script that updates arm statistics (this store's,
and the feedback ledger's, which applies them in the same script call as its own items).

A script checks everything before its first write and refuses with an error reply
(``BGREFUSED <why>``, banditgate.redis_errors.REFUSAL_CODE) that changed nothing; Redis does not
roll back a script that fails half-way, so this is what keeps a retry or a replay exact.
``arm_check(arm, reward)`` checks one update's arguments (a name as banditgate.events.NAME_PATTERN,
a reward within banditgate.events.MAX_MAGNITUDE, ``MAX_MAGNITUDE`` here); ``arm_open(stats hash,
half_life)`` checks the hash's type and reads the clock, and ``arm_load(state, arm)`` reads and
checks one arm's stored numbers (both only read; they return an error text instead of failing);
then ``arm_add(state, seen key, ttl, arm, reward)`` counts one outcome once per seen key (``SET
NX``: never an error, whatever the key holds) and ``arm_close(state)`` writes the touched arms back.
With rewards within the bound and stored numbers finite, nothing these compute can overflow."""

_APPLY = ARM_UPDATE_LUA + """
local ttl = tonumber(ARGV[2])
if not bg_count(ttl) then return bg_refuse('dedup TTL ' .. tostring(ARGV[2]) .. ' is not a whole number of seconds') end
if #ARGV ~= 2 * #KEYS then return bg_refuse('expected ' .. (2 * #KEYS) .. ' arguments, got ' .. #ARGV) end
local rewards = {}
for i = 2, #KEYS do
  local arm, reward = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local why = arm_check(arm, reward)
  if why then return bg_refuse('update ' .. (i - 1) .. ': ' .. why) end
  rewards[i] = reward
end
local s, why = arm_open(KEYS[1], tonumber(ARGV[1]))
if why then return bg_refuse(why) end
for i = 2, #KEYS do
  why = arm_load(s, ARGV[2 * i - 1])
  if why then return bg_refuse(why) end
end
for i = 2, #KEYS do
  arm_add(s, KEYS[i], ttl, ARGV[2 * i - 1], rewards[i])
end
arm_close(s)
return {s.applied, s.duplicates}
"""


@dataclass(frozen=True, slots=True)
class ArmUpdate:
    """One outcome's reward for the arm that served it. Raises ValueError if malformed."""

    request_id: str
    arm: str
    reward: float

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("ArmUpdate needs a non-empty request_id")
        check_arm_update(self.arm, self.reward)


def check_arm_update(arm: str, reward: float) -> None:
    """Raises ValueError unless `arm` is a name (banditgate.events.NAME_PATTERN: no ':') and
    `reward` a number within banditgate.events.MAX_MAGNITUDE (what the update script accepts)."""
    if not is_name(arm):
        raise ValueError(f"ArmUpdate arm must be a name (letters, digits, '_', '.', '-'), got {arm!r}")
    if not -MAX_MAGNITUDE <= reward <= MAX_MAGNITUDE:
        raise ValueError(f"ArmUpdate reward must be finite and within [-{MAX_MAGNITUDE:g}, {MAX_MAGNITUDE:g}], "
                         f"got {reward!r}")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    """Outcomes counted now."""
    duplicates: int
    """Outcomes whose request_id had been counted before (redeliveries): ignored."""


class ArmStatsStore:
    """Arm statistics of every route in Redis (see the module docstring for keys and semantics)."""

    transient_errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
    """What a Redis outage raises: the refresher reports these as an outage, without a trace."""

    def __init__(self, client: redis_asyncio.Redis, prefix: str = "bg", dedup_ttl_s: int = 8 * 86400,
                 half_lives: Mapping[str, float | None] | None = None) -> None:
        """`half_lives` maps route name to its discounting half-life in outcomes (absent: none)."""
        if dedup_ttl_s < 1:
            raise ValueError(f"dedup_ttl_s must be >= 1, got {dedup_ttl_s}")
        self._client = client
        self._prefix = prefix
        self._dedup_ttl_s = int(dedup_ttl_s)
        self._half_lives = dict(half_lives or {})
        self._apply_script = client.register_script(_APPLY)

    @classmethod
    def for_routes(cls, client: redis_asyncio.Redis, redis_config: RedisConfig, routes: Iterable[Route]) -> ArmStatsStore:
        """A store with the configured prefix, dedup TTL and each route's half-life."""
        return cls(client, prefix=redis_config.key_prefix, dedup_ttl_s=redis_config.dedup_ttl_s,
                   half_lives={route.name: route.half_life for route in routes})

    @property
    def dedup_ttl_s(self) -> int:
        return self._dedup_ttl_s

    def half_life(self, route: str) -> float:
        """The route's half-life in outcomes as the update script reads it (0.0: none)."""
        return float(self._half_lives.get(route) or 0.0)

    def stats_key(self, route: str) -> str:
        return f"{self._prefix}:{{{route}}}:arms"

    def seen_key(self, route: str, request_id: str) -> str:
        return f"{self._prefix}:{{{route}}}:seen:{request_id}"

    async def apply(self, route: str, updates: Sequence[ArmUpdate]) -> ApplyResult:
        """Count each update once per request_id, in one round trip. Raises RedisError on failure.

        After a failure the whole batch may be retried: updates that did land count as duplicates.
        """
        if not updates:
            return ApplyResult(0, 0)
        half_life = self._half_lives.get(route) or 0.0
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(updates), _CHUNK):
            chunk = updates[start:start + _CHUNK]
            keys = [self.stats_key(route)] + [self.seen_key(route, u.request_id) for u in chunk]
            args: list[str | int] = [repr(float(half_life)), self._dedup_ttl_s]
            for update in chunk:
                args += [update.arm, repr(float(update.reward))]
            await self._apply_script(keys=keys, args=args, client=pipe)
        replies = await pipe.execute()
        return ApplyResult(sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies))

    async def snapshot(self, route: str) -> RouteSnapshot:
        """All arms of `route`, decayed to now, in one round trip. Raises RedisError on failure."""
        return _parse(route, await self._client.hgetall(self.stats_key(route)))

    async def snapshots(self, routes: Iterable[str]) -> dict[str, RouteSnapshot]:
        """Snapshots of several routes in one pipelined round trip."""
        names = list(routes)
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.stats_key(name))
        replies = await pipe.execute()
        return {name: _parse(name, reply) for name, reply in zip(names, replies)}

    async def set_arm_state(self, route: str, arm: str, state: str) -> None:
        """Mark an arm ``active`` or ``drained`` for every gateway. Raises ValueError for another state."""
        if state not in ARM_STATES:
            raise ValueError(f"arm state must be one of {', '.join(ARM_STATES)}, got {state!r}")
        await self._client.hset(self.stats_key(route), f"{arm}:state", state)

    async def reset_arm(self, route: str, arm: str) -> None:
        """Forget an arm's statistics and call counters (its state is kept)."""
        await self._client.hdel(self.stats_key(route), *(f"{arm}:{field}" for field in ("w", "m", "q", "c", "calls", "errors")))

    async def record_calls(self, route: str, counts: Mapping[str, tuple[int, int]]) -> None:
        """Add (served, failed) request counts per arm, for the guardrail's error-rate test."""
        if not counts:
            return
        pipe = self._client.pipeline(transaction=False)
        for arm, (calls, errors) in counts.items():
            pipe.hincrby(self.stats_key(route), f"{arm}:calls", int(calls))
            pipe.hincrby(self.stats_key(route), f"{arm}:errors", int(errors))
        await pipe.execute()

    async def clear_route(self, route: str) -> None:
        """Delete a route's statistics hash (dedup marks expire on their own)."""
        await self._client.delete(self.stats_key(route))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _stored(value: str, what: str) -> float:
    """A number the update script wrote; ValueError for anything else (NaN and infinities too)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return number


def _parse(route: str, raw: Mapping[bytes | str, bytes | str]) -> RouteSnapshot:
    """Turn the hash into a snapshot, decaying each arm from its last update to `counter`.

    An arm whose stored numbers are not finite numbers (a hash corrupted by hand, or written by
    something else) is *unusable*: it is listed in ``unusable`` and comes out drained with empty
    statistics, so routing never samples from garbage, and the other arms are unaffected. A
    corrupt ``counter`` or ``half_life`` (the whole route's clock) raises ValueError: the
    refresher then keeps the route's last snapshot and says so."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    counter = int(_stored(fields.get("counter", "0"), "counter"))
    half_life = _stored(fields.get("half_life", "0"), "half_life") or None
    if half_life is not None and half_life < 0:
        raise ValueError(f"half_life is {half_life!r}, not >= 0")
    per_arm: dict[str, dict[str, str]] = {}
    for name, value in fields.items():
        arm, separator, field = name.rpartition(":")
        if separator:
            per_arm.setdefault(arm, {})[field] = value
    arms = {}
    unusable = []
    for arm, values in per_arm.items():
        try:
            weight, m2 = _stored(values.get("w", "0"), "w"), _stored(values.get("q", "0"), "q")
            if weight < 0 or m2 < 0:
                raise ValueError("negative weight or m2")
            stats = ArmStats(weight=weight, mean=_stored(values.get("m", "0"), "m"), m2=m2)
            elapsed = max(0, counter - int(_stored(values.get("c", str(counter)), "c")))
            arms[arm] = ArmSnapshot(stats=stats.decayed(decay_factor(elapsed, half_life)),
                                    state=values.get("state", "active"), calls=int(values.get("calls", 0)),
                                    errors=int(values.get("errors", 0)))
        except (ValueError, OverflowError):
            unusable.append(arm)
            arms[arm] = ArmSnapshot(state="drained")
    return RouteSnapshot(route=route, arms=arms, outcome_count=counter, unusable=tuple(sorted(unusable)))


# the refresher is plain asyncio and lives in its own module; re-exported for callers of the store
from router.refresher import SnapshotRefresher  # noqa: E402

__all__ = ["ARM_UPDATE_LUA", "ApplyResult", "ArmStatsStore", "ArmUpdate", "SnapshotRefresher", "check_arm_update"]
