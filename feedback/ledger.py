"""The feedback ledger in Redis: its key names, the Lua script that applies a batch of items at
most once each, the wire format between the two, and the pure planner that turns join effects
into the script's arguments. (feedback/sinks.py sends the planned chunks and counts what landed.)

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

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, assert_never

import orjson

from banditgate.events import MAX_MAGNITUDE, is_name
from banditgate.jsontypes import JSONValue
from feedback.join import Count, DropOutcome, Effect, Label, Reward, Served
from feedback.outcome_metrics import (
    FIELD_NAMES,
    bucket_seconds,
    labelled_fields,
    rewarded_fields,
    shadow_fields,
)
from feedback.pairs import Pairs
from router.stats_store import ARM_UPDATE_LUA, ArmStatsStore, check_arm_update

if TYPE_CHECKING:
    from redis import asyncio as aredis

_CHUNK = 1000  # ledger items per script call: keeps each atomic step short on the Redis side

# ---------------------------------------------------------------------------------------------
# The wire format between the planner (Python, writes) and the script (Lua, reads): positional
# JSON arrays. Each constant below is defined in the script under the same name, from this value
# (LEDGER_LUA's first lines), so the two sides cannot disagree.
#
# ARGV: [dedup TTL s, payload]; payload = [names, items, expiries, arm spec] (LedgerChunk.payload)
#   names       field names, referred to by 1-based position
#   items       [seen key, token, group...], groups from position FIRST_GROUP:
#               [n, target 1..n, name, amount, name, amount...]  a sum group (n >= 1 targets, each
#                                                                adds every amount to its name)
#               [ARM_UPDATE, arm seen key, arm, reward]          the route's arm statistics
#   expiries    [[target, TTL s]...]: targets (time buckets) that expire
#   arm spec    [] or [stats hash, half-life, TTL s] (when an item has an ARM_UPDATE group)
# keys and targets are 1-based positions in KEYS.
# Reply: [flags, arm updates applied, arm updates duplicate], flags one APPLIED / NOT_APPLIED
# character per item.

ARM_UPDATE = 0
"""First element of a group that updates the route's arm statistics (a sum group starts with its
number of targets, at least 1)."""
FIRST_GROUP = 3
"""1-based position of an item's first group (after its seen key and token)."""
APPLIED = "1"
"""An item's flag in the reply: its token was new, its sums were added now."""
NOT_APPLIED = "0"
"""An item's flag in the reply: its token had been applied before, nothing was added."""
MAX_INCREMENT = 1e31
"""The largest amount an item may add (a sum of the contract's numbers, at most 1e15, or their
squares: at most 4e30); past it, NaN or a JSON null (orjson's infinity) the script refuses."""
_APPLIED_BYTE = ord(APPLIED)

_WIRE_LUA = f"""
-- the wire format: feedback/ledger.py defines these, under the same names
local ARM_UPDATE = {ARM_UPDATE}
local FIRST_GROUP = {FIRST_GROUP}
local APPLIED, NOT_APPLIED = '{APPLIED}', '{NOT_APPLIED}'
local MAX_INCREMENT = {MAX_INCREMENT:.0e}
"""

_LEDGER_BODY = """
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
  for g = FIRST_GROUP, #item do
    local group = item[g]
    if type(group) ~= 'table' then
      return bg_refuse('item ' .. i .. ': group ' .. (g - FIRST_GROUP + 1) .. ' is not a list')
    end
    local n = group[1]
    if n == ARM_UPDATE then
      local name, reward = group[3], group[4]
      if #group ~= 4 or KEYS[group[2]] == nil or type(reward) ~= 'number'
          or not (reward >= -MAX_MAGNITUDE and reward <= MAX_MAGNITUDE) or not (arms[name] or bg_name(name)) then
        return bg_refuse('item ' .. i .. ': ' .. (arm_check(name, reward) or 'a malformed arm update'))
      end
      arms[name] = true
      any_arm = true
    else
      if type(n) ~= 'number' or KEYS[n] == nil or (#group - 1 - n) % 2 ~= 0 then
        return bg_refuse('item ' .. i .. ': group ' .. (g - FIRST_GROUP + 1) .. ' is not [n, target..., name, amount...]')
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
    flags[i] = APPLIED
  else
    flags[i] = NOT_APPLIED
  end
end
local sums = {}
for i, item in ipairs(rows) do
  local new = flags[i] == APPLIED
  for g = FIRST_GROUP, #item do
    local group = item[g]
    if group[1] == ARM_UPDATE then
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

LEDGER_LUA = ARM_UPDATE_LUA + _WIRE_LUA + _LEDGER_BODY  # nosec B608: Lua text, no SQL is built here
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


QualitySlotKey: TypeAlias = tuple[int, bool, str, str, int]
"""(time bucket number, shadow, arm, model, model version): one quality group of a chunk."""


class LedgerChunk:
    """One script call's worth of ledger items for one route, encoded as the script reads them:
    KEYS (seen hashes and target hashes), field names, and per item ``[seen key, token, group...]``
    with a group ``[n targets, target..., name, amount, name, amount...]`` (1-based positions), or,
    for the route's arm statistics, ``[ARM_UPDATE, arm seen key, arm, reward]`` (see `arm`; the
    wire format above)."""

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
        self.arm: list[JSONValue] = []
        """``[stats hash position, half-life, dedup TTL s]`` once an item updates arm statistics."""
        self.keys: list[str | bytes] = []
        self.key_index: dict[str | bytes, int] = {}
        self.names: list[str] = []
        self.name_index: dict[str, int] = {}
        self.rows: list[list[JSONValue]] = []
        self.members: list[Effect] = []
        """The effect each item stands for (to count the applied ones)."""
        self.expire: dict[int, int] = {}
        """Target key position -> TTL in seconds (time buckets)."""
        self.groups: dict[tuple[str, str | None], list[JSONValue]] = {}
        """Count groups by (kind, arm): the same list for every item that has it."""
        self.stat_names: dict[QualitySlotKey, tuple[list[float], dict[str, int]]] = {}
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

    def __init__(self, client: aredis.Redis, keys: FeedbackKeys, dedup_ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self._dedup_ttl_s = int(dedup_ttl_s)
        self._script = client.register_script(LEDGER_LUA)

    async def apply(self, chunks: Sequence[LedgerChunk]) -> list[ChunkApplied]:
        """Apply each chunk's items; return, per chunk, which items were applied now (False:
        their token had been applied before) and how many arm updates counted. Raises RedisError
        on failure (then retry the same chunks: nothing is applied twice)."""
        applied: list[ChunkApplied] = []
        for reply in await self.apply_each(chunks):
            if isinstance(reply, BaseException):
                raise reply
            applied.append(reply)
        return applied

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
        applied = _APPLIED_BYTE
        return [reply if isinstance(reply, BaseException)
                else ChunkApplied([flag == applied for flag in reply[0]], int(reply[1]), int(reply[2]))
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

    def _field_names(self, served: Served) -> dict[str, str]:
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

    def _quality_slot(self, chunk: LedgerChunk, route: str, slot_key: QualitySlotKey,
                      served: Served) -> tuple[list[float], dict[str, int]]:
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

    def _count_group(self, chunk: LedgerChunk, route: str, kind: str, arm: str | None) -> list[JSONValue]:
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
            # what each kind of effect adds, taken out of it here (cases by frequency in a
            # batch: a label per model that predicted, then the serving arm's reward and count)
            reward: float | None = None
            count: tuple[str, str | None] | None = None
            pair_sums: Mapping[str, float] | None = None
            match effect:
                case Label():
                    served = effect.served
                    token = "label:" + served.arm  # Label.token, without the call
                    ts = effect.ts
                    fields = labelled_fields(served.view, effect.label)
                    if served.shadow:
                        primary = effect.primary
                        fields.update(shadow_fields(served.view, None if primary is None else primary.view, effect.label))
                case Reward():
                    served = effect.served
                    reward = effect.reward
                    if arms is not None and not (served.arm in arm_names and -MAX_MAGNITUDE <= reward <= MAX_MAGNITUDE):
                        refusal = self._check_reward(effect)
                        if refusal is not None:
                            if refused is None:
                                raise ValueError(refusal.error)
                            refused.append(refusal)
                            continue
                    token = effect.token
                    fields = rewarded_fields(reward)
                    ts = effect.ts
                case Count():
                    token = effect.token
                    count = (effect.kind, effect.arm)
                case Pairs():
                    token = effect.token
                    pair_sums = effect.fields
                case DropOutcome():
                    continue  # a dead letter: nothing to count
                case _:
                    assert_never(effect)
            route = effect.route
            request_id = effect.request_id
            chunk = current.get(route)
            if chunk is None or len(chunk.rows) >= limit:
                chunk = current[route] = LedgerChunk(route)
                chunks.append(chunk)
            if request_id != last_request or route != last_route or chunk is not last_chunk:
                # bytes: the Redis client passes them on as they are (a str costs it ~4x more)
                seen_position = chunk.key(seen_key(route, request_id).encode())
                last_request, last_route, last_chunk = request_id, route, chunk
            # one item per effect, [seen key, token, group...]: an effect repeated in a batch (a
            # token applied before) is recognised by the script like any replay
            row: list[JSONValue] = [seen_position, token]
            chunk.rows.append(row)
            chunk.members.append(effect)
            if count is not None:
                group = chunk.groups.get(count)
                row.append(group if group is not None else count_group(chunk, route, count[0], count[1]))
                continue
            if pair_sums is not None:
                group = [1, chunk.key(self._keys.pairs(route))]  # a sum group with one target
                for name, amount in pair_sums.items():
                    group.append(chunk.name(name))
                    group.append(amount)
                row.append(group)
                continue
            if fields:
                # per chunk, the group's targets and sum names' positions of each (time bucket,
                # model version): nearly every item of a batch reuses one of a handful
                bucket_number = int(ts // bucket_s)
                slot_key = (bucket_number, served.shadow, served.arm, served.model, served.model_version)
                stat = chunk.stat_names.get(slot_key)
                targets, positions = stat if stat is not None else quality_slot(chunk, route, slot_key, served)
                group = targets[:]
                for name, value in fields.items():
                    group += (positions[name], value)
                row.append(group)
            if reward is not None and arms is not None:
                if not chunk.arm:
                    chunk.arm = [chunk.key(arms.stats_key(route)), arms.half_life(route), arms.dedup_ttl_s]
                row.append([ARM_UPDATE, chunk.key(arms.seen_key(route, request_id).encode()), served.arm, reward])
        return chunks
