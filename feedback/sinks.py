"""Where the join's effects go: Redis (arm statistics through the router's store, and the feedback
ledger of counts and quality sums), Kafka (dead letters, alerts) and Prometheus.

Exactly once, in Redis: every effect carries a token that is unique per request and meaning
(``decision``, ``label:<arm>``, ``dup:<offset>``...). The ledger script here applies a batch of
items, each at most once per (request_id, token), recording the token in
``P:{route}:fb:seen:<request_id>`` (a hash with the dedup TTL) in the same atomic script that adds
the item's increments. The same script call also updates the router's arm statistics for the
batch's rewards, with the router's own update and keys (:data:`router.stats_store.ARM_UPDATE_LUA`:
at most once per request_id by its ``seen`` key, exactly as :class:`ArmStatsStore` applies them),
so a batch costs one script call per route and chunk, not two. A batch that is retried after a
failure, or replayed after a crash, adds nothing twice; the script returns which items (and how
many arm updates) it applied, so the process's Prometheus counters count only those.

Refusals: every script checks its arguments and what is stored before its first write and
refuses with ``BGREFUSED <why>`` having changed nothing (Redis does not roll back a script that
fails half-way: tokens it had written would make the items look applied to the retry). RedisSink
splits a refused chunk until it has the single effects Redis refuses and hands them back to be
dead-lettered (docs/feedback.md, "Poison values and Redis errors").

Redis keys for route R with prefix P (hash tag ``{R}``: one Cluster slot per route):

``P:{R}:fb:counts``           joined / duplicate / late / orphan / default / unanswered /
                              prediction_duplicate / invalid, and ``<kind>|<arm>``
``P:{R}:fb:quality``          all-time quality sums, fields ``<role>|<arm>|<model>|<version>|<sum>``
``P:{R}:fb:quality:<bucket>`` the same per time bucket (sliding windows), expiring after the window
``P:{R}:fb:seen:<request_id>`` tokens applied for that request (TTL ``redis.dedup_ttl_s``)
``P:{R}:fb:alerted``          promote/reject alerts already sent
``P:{R}:fb:pairs``            interleave routes: ``a|b|win`` / ``loss`` / ``tie`` per pair of rankers
                              (a < b), ``<arm>|clicks``, ``impressions``, ``clicks_unshown``
                              (token ``pairs``: one impression counts once; feedback/pairs.py)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from banditgate import redis_errors
from banditgate.config import Route
from banditgate.events import MAX_MAGNITUDE, Alert, DeadLetter, dead_letter_payload, encode, is_name
from banditgate.kafka_delivery import is_delivery_error, needs_new_producer, refusal
from feedback.join import Count, DropOutcome, Effect, Label, Reward
from feedback.metrics import FeedbackMetrics
from feedback.quality import (
    FIELD_NAMES,
    QualityStats,
    bucket_seconds,
    labelled_fields,
    rewarded_fields,
    shadow_fields,
    shadow_verdict,
    window_buckets,
)
from feedback.webhooks import WebhookNotifier, alert_route
from router.stats_store import ARM_UPDATE_LUA, ArmStatsStore, check_arm_update

log = logging.getLogger("banditgate.feedback.sinks")

_CHUNK = 1000  # ledger items per script call: keeps each atomic step short on the Redis side

_LEDGER = ARM_UPDATE_LUA + """
local MAX_INCREMENT = 1e31
local ttl = tonumber(ARGV[1])
if not bg_count(ttl) then return bg_refuse('dedup TTL ' .. tostring(ARGV[1]) .. ' is not a whole number of seconds') end
local decoded, payload = pcall(cjson.decode, ARGV[2])
if not decoded or type(payload) ~= 'table' then return bg_refuse('the payload is not a JSON array') end
local names, rows, expires, arm_spec = payload[1], payload[2], payload[3], payload[4]
if type(names) ~= 'table' or type(rows) ~= 'table' or type(expires) ~= 'table' or type(arm_spec) ~= 'table' then
  return bg_refuse('the payload is not [names, items, expiries, arm]')
end
local type = type
for j = 1, #names do
  if type(names[j]) ~= 'string' then return bg_refuse('field name ' .. j .. ' is not a string') end
end
-- 1. the arguments, before anything is read or written. A position is valid when KEYS (or
-- names) has something there: that also refuses a fraction, a string or a JSON null
local targets = {}
local arms = {}
local any_arm = false
for i = 1, #rows do
  local item = rows[i]
  if type(item) ~= 'table' or KEYS[item[1]] == nil or type(item[2]) ~= 'string' then
    return bg_refuse('item ' .. i .. ' is not [seen key, token, group...]')
  end
  for g = 3, #item do
    local group = item[g]
    if type(group) ~= 'table' then return bg_refuse('item ' .. i .. ': group ' .. (g - 2) .. ' is not a list') end
    local n = group[1]
    if n == 0 then
      local name, reward = group[3], group[4]
      if #group ~= 4 or KEYS[group[2]] == nil or type(reward) ~= 'number'
          or not (reward >= -MAX_MAGNITUDE and reward <= MAX_MAGNITUDE) or not (arms[name] or bg_name(name)) then
        return bg_refuse('item ' .. i .. ': ' .. (arm_check(name, reward) or 'a malformed arm update'))
      end
      arms[name] = true
      any_arm = true
    else
      if type(n) ~= 'number' or KEYS[n] == nil or (#group - 1 - n) % 2 ~= 0 then
        return bg_refuse('item ' .. i .. ': group ' .. (g - 2) .. ' is not [n, target..., name, amount...]')
      end
      local last = n + 1
      for k = 2, last do
        local target = group[k]
        if KEYS[target] == nil then return bg_refuse('item ' .. i .. ': a target is not a key') end
        if targets[target] == nil then targets[target] = {} end
      end
      -- the fields each target gets (for step 2); one or two targets is every group the
      -- planner makes (counts, pairs; a quality sum and its time bucket)
      local first = targets[group[2]]
      local second = n >= 2 and targets[group[3]] or first
      for j = last + 1, #group, 2 do
        local position, value = group[j], group[j + 1]
        if names[position] == nil or type(value) ~= 'number'
            or not (value >= -MAX_INCREMENT and value <= MAX_INCREMENT) then
          return bg_refuse('item ' .. i .. ': ' .. tostring(names[position]) .. ' adds ' .. tostring(value) ..
                           ', not a number in [-1e31, 1e31]')
        end
        first[position] = true
        second[position] = true
        if n > 2 then
          for k = 4, last do targets[group[k]][position] = true end
        end
      end
    end
  end
end
for _, e in ipairs(expires) do
  if type(e) ~= 'table' or KEYS[e[1]] == nil or not bg_count(e[2]) then return bg_refuse('a malformed expiry') end
end
-- 2. what is stored: every key added to is a hash (or absent) holding numbers there, every arm's
-- statistics are numbers (reads only: a refusal here has changed nothing)
for target, fields in pairs(targets) do
  local why = bg_hash_or_none(KEYS[target])
  if why then return bg_refuse(why) end
  local list = {}
  for position in pairs(fields) do list[#list + 1] = names[position] end
  if #list > 0 then
    local values = redis.call('HMGET', KEYS[target], unpack(list))
    for k, value in ipairs(values) do
      local _, err = bg_stored(KEYS[target], list[k], value)
      if err then return bg_refuse(err) end
    end
  end
end
local arm = nil
if any_arm then
  if #arm_spec ~= 3 or KEYS[arm_spec[1]] == nil or not bg_count(arm_spec[3]) then
    return bg_refuse('the arm statistics spec is not [hash, half-life, ttl]')
  end
  local why
  arm, why = arm_open(KEYS[arm_spec[1]], arm_spec[2])
  if why then return bg_refuse(why) end
  for name in pairs(arms) do
    why = arm_load(arm, name)
    if why then return bg_refuse(why) end
  end
end
-- 3. the writes. A seen hash can only fail HSETNX if it holds another type (or, on the first
-- write, with OOM / READONLY): the tokens this call set are removed again and the error returned
-- as it came, so a failed call leaves nothing behind either
local flags = {}
local set_now = {}
local expired = {}
for i, item in ipairs(rows) do
  local key = KEYS[item[1]]
  local reply = redis.pcall('HSETNX', key, item[2], '1')
  if type(reply) == 'table' and reply.err then
    for _, done in ipairs(set_now) do redis.call('HDEL', done[1], done[2]) end
    return reply
  end
  if reply == 1 then
    set_now[#set_now + 1] = {key, item[2]}
    if not expired[item[1]] then
      redis.call('EXPIRE', key, ttl)
      expired[item[1]] = true
    end
    flags[i] = '1'
  else
    flags[i] = '0'
  end
end
local sums = {}
for i, item in ipairs(rows) do
  local new = flags[i] == '1'
  for g = 3, #item do
    local group = item[g]
    if group[1] == 0 then
      -- an arm update: counted once per its own seen key, whatever the item's token says
      arm_add(arm, KEYS[group[2]], arm_spec[3], group[3], group[4])
    elseif new then
      local last_target = 1 + group[1]
      for j = last_target + 1, #group, 2 do
        local name = names[group[j]]
        local value = group[j + 1]
        for k = 2, last_target do
          local t = sums[group[k]]
          if not t then t = {}; sums[group[k]] = t end
          t[name] = (t[name] or 0) + value
        end
      end
    end
  end
end
for target, t in pairs(sums) do
  for name, value in pairs(t) do
    redis.call('HINCRBYFLOAT', KEYS[target], name, string.format('%.17g', value))
  end
end
for _, e in ipairs(expires) do
  if sums[e[1]] then redis.call('EXPIRE', KEYS[e[1]], e[2]) end
end
if arm then
  arm_close(arm)
  return {table.concat(flags), arm.applied, arm.duplicates}
end
return {table.concat(flags), 0, 0}
"""
"""The ledger script (docs/feedback.md, "Poison values and Redis errors"): checks its arguments
(1), then what is stored where it adds (2), and refuses with ``BGREFUSED <why>`` having changed
nothing; only then writes (3). An amount is a sum of the contract's bounded numbers or of their
squares (banditgate.events.MAX_MAGNITUDE = 1e15, so at most 4e30): anything beyond 1e31, NaN, or a
JSON null (what orjson writes for an infinity) is refused."""

# ---------------------------------------------------------------------------------------------
# Redis: key names and the ledger


class FeedbackKeys:
    """Redis key names of the feedback ledger (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def counts(self, route: str) -> str:
        return f"{self.prefix}:{{{route}}}:fb:counts"

    def quality(self, route: str) -> str:
        return f"{self.prefix}:{{{route}}}:fb:quality"

    def quality_bucket(self, route: str, bucket: int) -> str:
        return f"{self.prefix}:{{{route}}}:fb:quality:{bucket}"

    def seen(self, route: str, request_id: str) -> str:
        return f"{self.prefix}:{{{route}}}:fb:seen:{request_id}"

    def alerted(self, route: str) -> str:
        return f"{self.prefix}:{{{route}}}:fb:alerted"

    def pairs(self, route: str) -> str:
        """Interleave routes: win/loss/tie per pair of rankers (see feedback/pairs.py)."""
        return f"{self.prefix}:{{{route}}}:fb:pairs"


class LedgerChunk:
    """One script call's worth of ledger items for one route, encoded as the script reads them:
    KEYS (seen hashes and target hashes), field names, and per item ``[seen key, token, group...]``
    with a group ``[n targets, target..., name, amount, name, amount...]`` (1-based positions), or,
    for the route's arm statistics, ``[0, arm seen key, arm, reward]`` (see `arm`)."""

    __slots__ = (
        "arm",
        "expire",
        "groups",
        "key_index",
        "keys",
        "members",
        "name_index",
        "names",
        "route",
        "rows",
        "stat_names",
    )

    def __init__(self, route: str = "") -> None:
        self.route = route
        self.arm: list[Any] = []
        """``[stats hash position, half-life, dedup TTL s]`` once an item updates arm statistics."""
        self.keys: list[str | bytes] = []
        self.key_index: dict[str | bytes, int] = {}
        self.names: list[str] = []
        self.name_index: dict[str, int] = {}
        self.rows: list[list[Any]] = []
        self.members: list[Effect] = []
        """The effect each item stands for (to count the applied ones)."""
        self.expire: dict[int, int] = {}
        """Target key position -> TTL in seconds (time buckets)."""
        self.groups: dict[Any, list[Any]] = {}
        """Count groups by (kind, arm): the same list for every item that has it."""
        self.stat_names: dict[Any, tuple[list[float], dict[str, int]]] = {}
        """Per (route, time bucket, model version): the quality group's targets and the positions
        of its sum names in `names`."""

    def key(self, key: str | bytes) -> int:
        position = self.key_index.get(key)
        if position is None:
            self.keys.append(key)
            position = self.key_index[key] = len(self.keys)
        return position

    def name(self, name: str) -> int:
        position = self.name_index.get(name)
        if position is None:
            self.names.append(name)
            position = self.name_index[name] = len(self.names)
        return position

    def payload(self) -> bytes:
        return orjson.dumps((self.names, self.rows, sorted(self.expire.items()), self.arm))


@dataclass(frozen=True, slots=True)
class ChunkApplied:
    """What one chunk's script call did."""

    items: list[bool]
    """Per item: applied now (False: its token had been applied before)."""
    arm_applied: int
    """Arm updates counted now."""
    arm_duplicates: int
    """Arm updates whose request had been counted before."""


class Ledger:
    """The feedback ledger in Redis: idempotent batched increments, and the arm statistics
    updates of the same effects (:data:`router.stats_store.ARM_UPDATE_LUA`, each idempotent per
    request by its own seen key, as the router's store applies them), one script call per route
    and chunk of items, all pipelined in one round trip."""

    def __init__(self, client: Any, keys: FeedbackKeys, dedup_ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self._dedup_ttl_s = int(dedup_ttl_s)
        self._script = client.register_script(_LEDGER)

    async def apply(self, chunks: Sequence[LedgerChunk]) -> list[ChunkApplied]:
        """Apply each chunk's items; return, per chunk, which items were applied now (False:
        their token had been applied before) and how many arm updates counted. Raises RedisError
        on failure (then retry the same chunks: nothing is applied twice)."""
        replies = await self.apply_each(chunks)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies  # type: ignore[return-value]

    async def apply_each(self, chunks: Sequence[LedgerChunk]) -> list[ChunkApplied | BaseException]:
        """`apply`, with each chunk's own result: a script call Redis answered with an error
        gives that error in its place (the script changed nothing then), the other chunks are
        applied. Raises what the connection raises (then nothing is known about any chunk)."""
        if not chunks:
            return []
        pipe = self._client.pipeline(transaction=False)
        for chunk in chunks:
            await self._script(keys=chunk.keys, args=[self._dedup_ttl_s, chunk.payload()], client=pipe)
        replies = await pipe.execute(raise_on_error=False)
        # one '0'/'1' character per item: a bulk string parses in one step, an array of integers
        # costs the client a Python call per item
        return [reply if isinstance(reply, BaseException)
                else ChunkApplied([flag == 49 for flag in reply[0]], int(reply[1]), int(reply[2]))
                for reply in replies]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An effect the ledger cannot take, to be dead-lettered instead of applied."""

    effect: Effect
    reason: str
    """A banditgate.events.REASONS code."""
    error: str
    """One line: what was wrong."""


class LedgerPlanner:
    """Turns join effects into ledger items (encoded :class:`LedgerChunk` s): which sums each
    effect adds, and where; one item per effect, keyed by its request and token (an item whose
    token was applied before, in an earlier call or earlier in the same one, changes nothing)."""

    def __init__(self, keys: FeedbackKeys, window_s: float, chunk_items: int = _CHUNK) -> None:
        self._arm_names: set[str] = set()
        """Arm names already checked (the name check runs once per name, not per reward)."""
        self._keys = keys
        self._bucket_s = bucket_seconds(window_s)
        self._bucket_ttl_s = int(window_s + 2 * self._bucket_s) + 1
        self._chunk_items = chunk_items
        self._names: dict[tuple[str, str, str, int], dict[str, str]] = {}
        self._route_keys: dict[str, tuple[str, str]] = {}
        self._bucket_keys: dict[tuple[str, int], str] = {}

    def _field_names(self, served: Any) -> dict[str, str]:
        key = (served.role, served.arm, served.model, served.model_version)
        names = self._names.get(key)
        if names is None:
            prefix = "|".join(str(part) for part in key)
            names = self._names[key] = {stat: f"{prefix}|{stat}" for stat in FIELD_NAMES}
        return names

    def _route_key(self, route: str) -> tuple[str, str]:
        keys = self._route_keys.get(route)
        if keys is None:
            keys = self._route_keys[route] = (self._keys.counts(route), self._keys.quality(route))
        return keys

    def _quality_slot(self, chunk: LedgerChunk, route: str, slot_key: tuple[Any, ...],
                      served: Any) -> tuple[list[float], dict[str, int]]:
        """The quality group's targets and the positions of its sum names in `chunk`, for a
        model version's sums in one time bucket (`chunk` is one route's; `slot_key` is
        ``(bucket number, shadow, arm, model, version)``, as `plan` looks it up)."""
        bucket_number = slot_key[0]
        bucket = self._bucket_keys.get((route, bucket_number))
        if bucket is None:
            if len(self._bucket_keys) > 1000:
                self._bucket_keys.clear()
            bucket = self._bucket_keys[(route, bucket_number)] = self._keys.quality_bucket(route, bucket_number)
        bucket_position = chunk.key(bucket)
        chunk.expire[bucket_position] = self._bucket_ttl_s
        names = self._field_names(served)
        slot = chunk.stat_names[slot_key] = (
            [2, chunk.key(self._route_key(route)[1]), bucket_position],
            {stat: chunk.name(names[stat]) for stat in FIELD_NAMES})
        return slot

    def _count_group(self, chunk: LedgerChunk, route: str, kind: str, arm: str | None) -> list[Any]:
        group = chunk.groups.get((kind, arm))
        if group is None:
            counts = chunk.key(self._route_key(route)[0])
            group = [1, counts, chunk.name(kind), 1.0]
            if arm is not None:
                group += [chunk.name(f"{kind}|{arm}"), 1.0]
            chunk.groups[(kind, arm)] = group
        return group

    def _check_reward(self, effect: Reward) -> Refusal | None:
        """None when the arm statistics can take `effect` (its arm name is remembered), else why not."""
        try:
            check_arm_update(effect.served.arm, effect.reward)
        except ValueError as exc:
            reason = "bad_id" if not is_name(effect.served.arm) else \
                "not_finite" if not math.isfinite(effect.reward) else "out_of_range"
            return Refusal(effect, reason, f"reward for {effect.request_id!r} on route {effect.route!r}: {exc}")
        if len(self._arm_names) >= 4096:
            self._arm_names.clear()  # bounded: a deployment has a handful of arms
        self._arm_names.add(effect.served.arm)
        return None

    def plan(self, effects: Iterable[Effect], arms: ArmStatsStore | None = None,
             refused: list[Refusal] | None = None) -> list[LedgerChunk]:
        """The ledger chunks for `effects` (at most `chunk_items` items each, one route each);
        with `arms`, each Reward also updates the route's arm statistics in that store's keys.
        A Reward the arm statistics cannot take (an arm that is not a name, a reward outside the
        events contract's bound: what check_arm_update refuses) is left out and added to
        `refused`; without `refused`, it raises ValueError."""
        chunks: list[LedgerChunk] = []
        current: dict[str, LedgerChunk] = {}
        seen_key = self._keys.seen
        limit = self._chunk_items
        bucket_s = self._bucket_s
        quality_slot = self._quality_slot
        count_group = self._count_group
        # a step's effects for one request come together: its seen key's position is reused
        last_request = last_route = ""
        last_chunk: LedgerChunk | None = None
        seen_position = 0
        arm_names = self._arm_names
        for effect in effects:
            cls = effect.__class__
            if cls is DropOutcome:
                continue
            if cls is Reward and arms is not None and not (
                    effect.served.arm in arm_names  # type: ignore[union-attr]
                    and -MAX_MAGNITUDE <= effect.reward <= MAX_MAGNITUDE):  # type: ignore[union-attr]
                refusal = self._check_reward(effect)  # type: ignore[arg-type]
                if refusal is not None:
                    if refused is None:
                        raise ValueError(refusal.error)
                    refused.append(refusal)
                    continue
            route = effect.route  # type: ignore[union-attr]
            request_id = effect.request_id
            chunk = current.get(route)
            if chunk is None or len(chunk.rows) >= limit:
                chunk = current[route] = LedgerChunk(route)
                chunks.append(chunk)
            if request_id != last_request or route != last_route or chunk is not last_chunk:
                # bytes: the Redis client passes them on as they are (a str costs it ~4x more)
                seen_position = chunk.key(seen_key(route, request_id).encode())
                last_request, last_route, last_chunk = request_id, route, chunk
            # one item per effect: an effect repeated in a batch (a token applied before) is
            # recognised by the script like any replay
            row: list[Any] = [seen_position, "label:" + effect.served.arm if cls is Label  # type: ignore[union-attr]
                              else effect.token]  # type: ignore[union-attr]
            chunk.rows.append(row)
            chunk.members.append(effect)
            if cls is Count:
                group = chunk.groups.get((effect.kind, effect.arm))  # type: ignore[union-attr]
                row.append(group if group is not None
                           else count_group(chunk, route, effect.kind, effect.arm))  # type: ignore[union-attr]
                continue
            if cls is Reward:
                served = effect.served  # type: ignore[union-attr]
                reward = effect.reward  # type: ignore[union-attr]
                fields = rewarded_fields(reward)
            elif cls is Label:
                served = effect.served  # type: ignore[union-attr]
                fields = labelled_fields(served.view, effect.label)  # type: ignore[union-attr]
                if served.shadow:
                    primary = effect.primary  # type: ignore[union-attr]
                    fields.update(shadow_fields(served.view, None if primary is None else primary.view,
                                                effect.label))  # type: ignore[union-attr]
            else:  # Pairs
                group = [1, chunk.key(self._keys.pairs(route))]
                for name, amount in effect.fields.items():  # type: ignore[union-attr]
                    group.append(chunk.name(name))
                    group.append(amount)
                row.append(group)
                continue
            if fields:
                # per chunk, the group's targets and sum names' positions of each (time bucket,
                # model version): nearly every item of a batch reuses one of a handful
                bucket_number = int(effect.ts // bucket_s)  # type: ignore[union-attr]
                slot_key = (bucket_number, served.shadow, served.arm, served.model, served.model_version)
                stat = chunk.stat_names.get(slot_key)
                targets, positions = stat if stat is not None else quality_slot(chunk, route, slot_key, served)
                group = targets[:]
                for name, value in fields.items():
                    group += (positions[name], value)
                row.append(group)
            if cls is Reward and arms is not None:
                if not chunk.arm:
                    chunk.arm = [chunk.key(arms.stats_key(route)), arms.half_life(route), arms.dedup_ttl_s]
                row.append([0, chunk.key(arms.seen_key(route, request_id).encode()), served.arm, reward])
        return chunks


# ---------------------------------------------------------------------------------------------
# Redis: both stores together


@dataclass
class Applied:
    """What a batch of effects did in Redis."""

    counts: list[Count]
    """Count effects applied now (not seen before)."""
    arm_applied: int
    arm_duplicates: int
    scored: list[Label | Reward] = field(default_factory=list)
    """Label and Reward effects applied now: what the quality-drift watch is fed (once each)."""
    refused: list[Refusal] = field(default_factory=list)
    """Effects left out (the planner's checks) or refused by Redis for good: to dead-letter."""


class Plan:
    """One batch's script calls and how far they got. `RedisSink.apply_planned` moves each
    chunk from `pending` to `done` (with its result) or, refused for good, splits it until the
    refused effects are found (`refused`); called again after an outage it sends only what is
    still pending, so the result counts every applied effect once."""

    __slots__ = ("done", "pending", "refused")

    def __init__(self, chunks: Iterable[LedgerChunk], refused: list[Refusal] | None = None) -> None:
        self.pending: list[LedgerChunk] = list(chunks)
        self.done: list[tuple[LedgerChunk, ChunkApplied]] = []
        self.refused: list[Refusal] = refused if refused is not None else []


class RedisSink:
    """Applies effects to the router's arm statistics and to the feedback ledger."""

    def __init__(self, store: ArmStatsStore, ledger: Ledger, planner: LedgerPlanner) -> None:
        self._store = store
        self._ledger = ledger
        self._planner = planner

    async def apply(self, effects: Sequence[Effect], metrics: FeedbackMetrics | None = None) -> Applied:
        """Apply every effect at most once (ledger items and arm updates in the same script
        calls, one round trip). Raises RedisError (or OSError) on failure: calling again with the
        same effects is safe (what landed is not applied twice)."""
        return await self.apply_planned(self.plan(effects), metrics)

    def plan(self, effects: Sequence[Effect]) -> Plan:
        """The script calls that apply `effects` (pure CPU: a batch plans while the one before it
        is in Redis); a reward the arm statistics cannot take is refused here (`Plan.refused`)."""
        refused: list[Refusal] = []
        return Plan(self._planner.plan(effects, self._store, refused), refused)

    async def apply_planned(self, plan: Plan | list[LedgerChunk], metrics: FeedbackMetrics | None = None) -> Applied:
        """`apply` for a plan from `plan` (or a list of chunks); as safe to call again with the
        same plan, which then sends only the chunks not applied yet.

        A chunk Redis refuses for good (banditgate.redis_errors.REFUSED: our script's argument
        checks, WRONGTYPE, a stored field that is not a number; the script changed nothing) is
        split in halves and sent again, until the single effects it refuses are found: those go
        to `Applied.refused` (reason ``redis_refused``), every other effect is applied. Raises the
        first transient or operator error (after recording what was applied) or a bug."""
        if not isinstance(plan, Plan):
            plan = Plan(plan)
        while plan.pending:
            replies = await self._ledger.apply_each(plan.pending)
            again: list[LedgerChunk] = []
            failure: BaseException | None = None
            for chunk, reply in zip(plan.pending, replies):
                if not isinstance(reply, BaseException):
                    plan.done.append((chunk, reply))
                elif redis_errors.classify(reply) != redis_errors.REFUSED:
                    again.append(chunk)
                    failure = failure or reply
                elif len(chunk.members) == 1:
                    effect = chunk.members[0]
                    plan.refused.append(Refusal(effect, "redis_refused", f"Redis refused the ledger item of "
                                                f"{effect.request_id!r} on route {chunk.route!r}: "
                                                f"{redis_errors.one_line(reply)}"))
                else:
                    again.extend(self._halves(chunk))
            plan.pending = again
            if failure is not None:
                raise failure
        return self._applied(plan, metrics)

    def _halves(self, chunk: LedgerChunk) -> list[LedgerChunk]:
        """`chunk`'s effects as two chunks (re-planned: keys and names are per chunk)."""
        middle = len(chunk.members) // 2
        ignored: list[Refusal] = []  # refused when first planned, never members
        return [*self._planner.plan(chunk.members[:middle], self._store, ignored),
                *self._planner.plan(chunk.members[middle:], self._store, ignored)]

    @staticmethod
    def _applied(plan: Plan, metrics: FeedbackMetrics | None) -> Applied:
        counts: list[Count] = []
        scored: list[Label | Reward] = []
        arm_applied = arm_duplicates = 0
        arm_counts: dict[str, list[int]] = {}
        for chunk, result in plan.done:
            for member, applied in zip(chunk.members, result.items):
                if applied:
                    cls = member.__class__
                    if cls is Count:
                        counts.append(member)  # type: ignore[arg-type]
                    elif cls is Label or cls is Reward:
                        scored.append(member)  # type: ignore[arg-type]
            if chunk.arm:
                arm_applied += result.arm_applied
                arm_duplicates += result.arm_duplicates
                totals = arm_counts.setdefault(chunk.route, [0, 0])
                totals[0] += result.arm_applied
                totals[1] += result.arm_duplicates
        if metrics is not None:
            for route, (applied_now, duplicates) in arm_counts.items():
                metrics.arm_updates.labels(route, "applied").inc(applied_now)
                metrics.arm_updates.labels(route, "duplicate").inc(duplicates)
        return Applied(counts, arm_applied, arm_duplicates, scored, list(plan.refused))


# ---------------------------------------------------------------------------------------------
# Kafka: dead letters and alerts


Outgoing = tuple[str, bytes | None, bytes] | tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]
"""A message KafkaOut sends: (topic, key, value), or with the record's headers as a 4th item."""


class KafkaOut:
    """Dead letters and alerts through one aiokafka producer (acknowledged before returning).
    Every alert it sends (any message to the alerts topic, whoever built it) also goes to its
    route's webhook, when `webhooks` has one for it (queued; never blocks: feedback/webhooks.py).

    A message the broker refuses for good (too large, not authorized, invalid:
    banditgate.kafka_delivery.refusal) is dropped and counted
    (`banditgate_feedback_output_refusals_total{topic,reason}`), logged once per episode: sending
    it again could never succeed, and retrying it held every offset of the worker forever. A
    failure that breaks the producer (a refusal, a broken sequence, fenced, closed) replaces it
    when `producer` is a :class:`feedback.producer.ReplaceableProducer`."""

    def __init__(self, producer: Any, deadletter_topic: str, alerts_topic: str, webhooks: Any = None,
                 metrics: FeedbackMetrics | None = None) -> None:
        self._producer = producer
        self.deadletter_topic = deadletter_topic
        self.alerts_topic = alerts_topic
        self.webhooks: WebhookNotifier | None = webhooks
        self.metrics = metrics
        self.refused = 0
        self._refusals_logged: set[tuple[str, str]] = set()

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        """Send (topic, key, value[, headers]) messages and wait until the broker acknowledged all of them
        (or refused some for good: dropped and counted). Raises the first retriable failure."""
        await self.deliver(list(messages))

    async def deliver(self, pending: list[Outgoing]) -> None:
        """As `send_all`, and leaves in `pending` only the messages to send again: a retry after
        a retriable failure sends neither the delivered nor the refused ones again."""
        producer = self._producer
        used = getattr(producer, "current", producer)
        sent: list[Outgoing] = []
        futures = []
        retry: list[Outgoing] = []
        cause: BaseException | None = None
        broken = refused_any = False
        outcomes: list[tuple[Outgoing, BaseException]] = []
        for message in pending:
            topic, key, value = message[0], message[1], message[2]
            try:
                # a 4th item is the record's headers (the request's trace context)
                futures.append(await (producer.send(topic, key=key, value=value) if len(message) == 3
                                      else producer.send(topic, key=key, value=value, headers=message[3])))
            except Exception as exc:  # a record over max_request_size is refused here, before sending
                if not is_delivery_error(exc):
                    raise
                outcomes.append((message, exc))
                continue
            sent.append(message)
        delivered = []
        if futures:
            for message, result in zip(sent, await asyncio.gather(*futures, return_exceptions=True)):
                if isinstance(result, BaseException):
                    if not is_delivery_error(result):
                        raise result
                    outcomes.append((message, result))
                else:
                    delivered.append(message)
        for message, error in outcomes:
            broken = broken or needs_new_producer(error)
            found = refusal(error)
            if found is None:
                retry.append(message)
                cause = cause or error
                continue
            refused_any = True
            self._refuse(message[0], found.reason, found.error)
        if not refused_any and not retry:
            self._refusals_logged.clear()  # the episode is over: the next refusal is logged again
        pending[:] = retry
        webhooks = self.webhooks
        if webhooks is not None and webhooks.urls:
            for topic, key, value, *_headers in delivered:
                if topic == self.alerts_topic:
                    route = alert_route(key, value)
                    if route is not None:
                        webhooks.notify(route, value)
        replace = getattr(producer, "replace", None)
        if broken and replace is not None:
            try:
                await replace(used)
            except Exception as exc:
                if not is_delivery_error(exc):
                    raise
                cause = cause or exc  # the broker is away: retried (and replaced) on the next try
        if cause is not None:
            raise cause

    def _refuse(self, topic: str, reason: str, error: str) -> None:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.output_refusals.labels(topic, reason).inc()
        if (topic, reason) not in self._refusals_logged:
            self._refusals_logged.add((topic, reason))
            log.error("the broker refused a message to %s for good (%s: %s); it is dropped and counted in "
                      "banditgate_feedback_output_refusals_total (logged once per episode)", topic, reason, error)

    def dead_letter(self, key: bytes | None, error: str, reason: str, topic: str, partition: int, offset: int,
                    payload: bytes, headers: list[tuple[str, bytes]] | None = None) -> Outgoing:
        """A dead letter to send; `headers`: the trace context of the request it concerns."""
        letter = DeadLetter(error=error, topic=topic, partition=partition, offset=offset,
                            payload=dead_letter_payload(payload), reason=reason)
        if headers:
            return self.deadletter_topic, key, encode(letter), headers
        return self.deadletter_topic, key, encode(letter)

    def alert(self, alert: Alert) -> tuple[str, bytes | None, bytes]:
        return self.alerts_topic, alert.route.encode(), encode(alert)


# ---------------------------------------------------------------------------------------------
# quality: gauges and promote / reject


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def parse_quality(raw: Mapping[Any, Any]) -> dict[tuple[str, str, str, str], QualityStats]:
    """A quality hash -> stats per (role, arm, model, version)."""
    grouped: dict[tuple[str, str, str, str], dict[str, float]] = defaultdict(dict)
    for name, value in raw.items():
        parts = _text(name).split("|")
        if len(parts) != 5:
            continue
        role, arm, model, version, stat = parts
        grouped[(role, arm, model, version)][stat] = float(_text(value))
    return {key: QualityStats.from_fields(values) for key, values in grouped.items()}


class QualityMonitor:
    """Reads the quality sums of every route from Redis (all workers' contributions), refreshes
    the gauges, and sends a promote or reject alert once per shadow version when the sequential
    test decides. An alert is sent before it is marked sent, so it may (rarely) repeat."""

    def __init__(self, client: Any, keys: FeedbackKeys, routes: Sequence[Route], window_s: float,
                 confidence: float, margin: float, out: KafkaOut, metrics: FeedbackMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._keys = keys
        self._routes = list(routes)
        self._window_s = window_s
        self._confidence = confidence
        self._margin = margin
        self._out = out
        self._metrics = metrics
        self._clock = clock

    async def refresh(self) -> list[Alert]:
        """One refresh; returns the alerts sent. Raises RedisError / KafkaError on failure."""
        now = self._clock()
        buckets = list(window_buckets(now, self._window_s))
        pipe = self._client.pipeline(transaction=False)
        for route in self._routes:
            pipe.hgetall(self._keys.quality(route.name))
            for bucket in buckets:
                pipe.hgetall(self._keys.quality_bucket(route.name, bucket))
            pipe.hgetall(self._keys.alerted(route.name))
        replies = await pipe.execute()
        rows: list[tuple[tuple[str, ...], Mapping[str, float]]] = []
        alerts: list[Alert] = []
        step = len(buckets) + 2
        for position, route in enumerate(self._routes):
            chunk = replies[position * step:(position + 1) * step]
            total = parse_quality(chunk[0])
            window: dict[tuple[str, str, str, str], QualityStats] = defaultdict(QualityStats)
            for raw in chunk[1:-1]:
                for key, stats in parse_quality(raw).items():
                    window[key] = window[key] + stats
            alerted = {_text(k) for k in chunk[-1]}
            for key in sorted(set(total) | set(window)):
                role, arm, model, version = key
                values = dict(window[key].metrics(route.reward, self._confidence)) if key in window else {}
                if role == "shadow" and key in total:
                    verdict = shadow_verdict(total[key], self._confidence, self._margin)
                    values.update(advantage=verdict.advantage, advantage_low=verdict.lower,
                                  advantage_high=verdict.upper, pairs=verdict.n)
                    marker = f"{verdict.decision}|{arm}|{model}|{version}"
                    if verdict.decision is not None and marker not in alerted:
                        alerts.append(self._alert(route.name, arm, model, version, verdict, total[key], total, now))
                rows.append(((route.name, arm, model, version, role), values))
        self._metrics.quality.update(rows)
        if alerts:
            await self._out.send_all([self._out.alert(a) for a in alerts])
            pipe = self._client.pipeline(transaction=False)
            for alert in alerts:
                details = alert.details
                pipe.hset(self._keys.alerted(alert.route),
                          f"{alert.kind}|{alert.arm}|{details['model']}|{alert.model_version}", orjson.dumps(alert.to_dict()))
                self._metrics.alerts.labels(alert.route, alert.kind).inc()
            await pipe.execute()
            for alert in alerts:
                log.warning("%s alert: route %s shadow %s (%s v%s): advantage %.4f, %.0f%% confidence sequence "
                            "[%.4f, %.4f] over %d paired labels", alert.kind, alert.route, alert.arm,
                            alert.details["model"], alert.model_version, alert.value, 100 * self._confidence,
                            alert.details["lower"], alert.details["upper"], alert.details["pairs"])
        return alerts

    def _alert(self, route: str, arm: str, model: str, version: str, verdict: Any, shadow: QualityStats,
               total: Mapping[tuple[str, str, str, str], QualityStats], now: float) -> Alert:
        primaries = {f"{k[1]}:{k[2]}:v{k[3]}": _summary(s) for k, s in total.items() if k[0] == "primary"}
        return Alert(kind=verdict.decision, route=route, arm=arm, model_version=int(version),
                     metric="paired_loss_advantage", value=verdict.advantage,
                     threshold=self._margin if verdict.decision == "promote" else 0.0, ts=now,
                     details={"model": model, "pairs": int(verdict.n), "lower": verdict.lower, "upper": verdict.upper,
                              "confidence": verdict.confidence, "margin": verdict.margin,
                              "primary_loss": verdict.primary_loss, "shadow_loss": verdict.shadow_loss,
                              "loss": "brier score when both give a probability of a binary label, else 0/1 error",
                              "test": "normal-mixture confidence sequence (Robbins; Howard et al. 2021), "
                                      "Hoeffding sigma=1, valid under continuous monitoring",
                              "shadow": _summary(shadow), "primaries": primaries})


def _summary(stats: QualityStats) -> dict[str, float]:
    return {k: round(v, 6) for k, v in stats.metrics().items()}


__all__ = ["Applied", "ChunkApplied", "FeedbackKeys", "KafkaOut", "Ledger", "LedgerChunk", "LedgerPlanner", "Plan",
           "QualityMonitor", "RedisSink", "Refusal", "parse_quality"]
