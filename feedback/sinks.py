"""Where the join's effects go: Redis (arm statistics through the router's store, and the feedback
ledger of counts and quality sums), Kafka (dead letters, alerts) and Prometheus.

Exactly once, in Redis: every effect carries a token that is unique per request and meaning
(``decision``, ``label:<arm>``, ``dup:<offset>``...). The router's :class:`ArmStatsStore` applies
an arm update at most once per request_id; the ledger script here applies a batch of items, each
at most once per (request_id, token), recording the token in ``P:{route}:fb:seen:<request_id>``
(a hash with the dedup TTL) in the same atomic script that adds the item's increments. A batch
that is retried after a failure, or replayed after a crash, adds nothing twice; the script returns
which items it applied, so the process's Prometheus counters count only those.

Redis keys for route R with prefix P (hash tag ``{R}``: one Cluster slot per route):

``P:{R}:fb:counts``           joined / duplicate / late / orphan / default / unanswered /
                              prediction_duplicate / invalid, and ``<kind>|<arm>``
``P:{R}:fb:quality``          all-time quality sums, fields ``<role>|<arm>|<model>|<version>|<sum>``
``P:{R}:fb:quality:<bucket>`` the same per time bucket (sliding windows), expiring after the window
``P:{R}:fb:seen:<request_id>`` tokens applied for that request (TTL ``redis.dedup_ttl_s``)
``P:{R}:fb:alerted``          promote/reject alerts already sent
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from banditgate.config import Route
from banditgate.events import Alert, DeadLetter, dead_letter_payload, encode
from feedback.join import Count, DropOutcome, Effect, Label, Reward
from feedback.metrics import FeedbackMetrics
from feedback.quality import (
    QualityStats,
    bucket_index,
    bucket_seconds,
    labelled,
    rewarded,
    shadow_observation,
    shadow_verdict,
    window_buckets,
)
from router.stats_store import ArmStatsStore, ArmUpdate

log = logging.getLogger("banditgate.feedback.sinks")

_CHUNK = 500  # ledger items per script call: keeps each atomic step short on the Redis side

_LEDGER = """
local ttl = tonumber(ARGV[1])
local payload = cjson.decode(ARGV[2])
local names = payload[1]
local sums = {}
local flags = {}
for i, item in ipairs(payload[2]) do
  if redis.call('HSETNX', KEYS[item[1]], item[2], '1') == 1 then
    redis.call('EXPIRE', KEYS[item[1]], ttl)
    flags[i] = 1
    for g = 3, #item do
      local group = item[g]
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
  else
    flags[i] = 0
  end
end
for target, t in pairs(sums) do
  for name, value in pairs(t) do
    redis.call('HINCRBYFLOAT', KEYS[target], name, string.format('%.17g', value))
  end
end
for _, e in ipairs(payload[3]) do
  if sums[e[1]] then redis.call('EXPIRE', KEYS[e[1]], e[2]) end
end
return flags
"""

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


Group = tuple[tuple[str, ...], tuple[tuple[str, float], ...]]
"""(hash keys, ((field, amount), ...)): each amount is added to the field in every one of the keys."""


@dataclass(frozen=True, slots=True)
class LedgerItem:
    """Increments applied at most once per (request_id, token); `expire_s` names hashes that
    expire (time buckets) and their TTL."""

    request_id: str
    token: str
    groups: tuple[Group, ...]
    expire_s: Mapping[str, int] | None = None


class Ledger:
    """The feedback ledger in Redis: idempotent batched increments (one script call per route
    and chunk of items, all pipelined in one round trip)."""

    def __init__(self, client: Any, keys: FeedbackKeys, dedup_ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self._dedup_ttl_s = int(dedup_ttl_s)
        self._script = client.register_script(_LEDGER)

    async def apply(self, batches: Mapping[str, Sequence[LedgerItem]]) -> dict[str, list[bool]]:
        """Apply items per route; return, per route, which items were applied now (False: their
        token had been applied before). Raises RedisError on failure (then retry the same batch)."""
        pipe = self._client.pipeline(transaction=False)
        plan: list[str] = []
        for route, items in batches.items():
            for start in range(0, len(items), _CHUNK):
                keys, payload = self._encode(route, items[start:start + _CHUNK])
                await self._script(keys=keys, args=[self._dedup_ttl_s, payload], client=pipe)
                plan.append(route)
        if not plan:
            return {}
        replies = await pipe.execute()
        out: dict[str, list[bool]] = defaultdict(list)
        for route, flags in zip(plan, replies):
            out[route].extend(bool(int(f)) for f in flags)
        return dict(out)

    def _encode(self, route: str, items: Sequence[LedgerItem]) -> tuple[list[str], bytes]:
        keys: list[str] = []
        key_index: dict[str, int] = {}
        names: list[str] = []
        name_index: dict[str, int] = {}
        expire: dict[int, int] = {}
        rows: list[list[Any]] = []
        seen_key = self._keys.seen
        for item in items:
            key = seen_key(route, item.request_id)
            position = key_index.get(key)
            if position is None:
                keys.append(key)
                position = key_index[key] = len(keys)  # Lua arrays start at 1
            row: list[Any] = [position, item.token]
            for targets, increments in item.groups:
                group: list[Any] = [len(targets)]
                for target in targets:
                    position = key_index.get(target)
                    if position is None:
                        keys.append(target)
                        position = key_index[target] = len(keys)
                    group.append(position)
                for name, amount in increments:
                    position = name_index.get(name)
                    if position is None:
                        names.append(name)
                        position = name_index[name] = len(names)
                    group.append(position)
                    group.append(amount)
                row.append(group)
            for target, ttl in (item.expire_s or {}).items():
                expire[key_index[target]] = ttl
            rows.append(row)
        return keys, orjson.dumps((names, rows, sorted(expire.items())))


class LedgerPlanner:
    """Turns join effects into ledger items: which sums each effect adds, and where."""

    def __init__(self, keys: FeedbackKeys, window_s: float) -> None:
        self._keys = keys
        self._bucket_s = bucket_seconds(window_s)
        self._bucket_ttl_s = int(window_s + 2 * self._bucket_s) + 1
        self._names: dict[tuple[str, str, str, int, str], str] = {}

    def _quality(self, route: str, ts: float, served: Any, stats: QualityStats,
                 groups: list[Group], expire: dict[str, int]) -> None:
        bucket = self._keys.quality_bucket(route, bucket_index(ts, self._bucket_s))
        expire[bucket] = self._bucket_ttl_s
        names = self._names
        role, arm, model, version = served.role, served.arm, served.model, served.model_version
        increments = []
        for stat, value in stats.to_fields().items():
            key = (role, arm, model, version, stat)
            name = names.get(key)
            if name is None:
                name = names[key] = f"{role}|{arm}|{model}|{version}|{stat}"
            increments.append((name, value))
        groups.append(((self._keys.quality(route), bucket), tuple(increments)))

    def items(self, effects: Iterable[Effect]) -> dict[str, list[tuple[LedgerItem, list[Effect]]]]:
        """Ledger items per route, each with the effects it stands for. Effects of one request
        that share a token (a decision's count and its reward) become one item; a repeated
        effect (same token and kind, e.g. a replay inside one batch) is kept once."""
        merged: dict[tuple[str, str, str], tuple[list[Group], dict[str, int], list[Effect]]] = {}
        for effect in effects:
            if isinstance(effect, DropOutcome):
                continue
            groups, expire, members = merged.setdefault((effect.route, effect.request_id, effect.token),
                                                        ([], {}, []))
            if any(type(m) is type(effect) for m in members):
                continue
            members.append(effect)
            if isinstance(effect, Count):
                increments: tuple[tuple[str, float], ...] = ((effect.kind, 1.0),)
                if effect.arm is not None:
                    increments += ((f"{effect.kind}|{effect.arm}", 1.0),)
                groups.append(((self._keys.counts(effect.route),), increments))
            elif isinstance(effect, Reward):
                self._quality(effect.route, effect.ts, effect.served, rewarded(effect.reward), groups, expire)
            elif isinstance(effect, Label):
                served = effect.served
                stats = labelled(served.view, effect.label)
                if served.shadow:
                    primary = None if effect.primary is None else effect.primary.view
                    stats = stats + shadow_observation(served.view, primary, effect.label)
                self._quality(effect.route, effect.ts, served, stats, groups, expire)
        out: dict[str, list[tuple[LedgerItem, list[Effect]]]] = defaultdict(list)
        for (route, request_id, token), (groups, expire, members) in merged.items():
            out[route].append((LedgerItem(request_id, token, tuple(groups), expire or None), members))
        return dict(out)


# ---------------------------------------------------------------------------------------------
# Redis: both stores together


@dataclass
class Applied:
    """What a batch of effects did in Redis."""

    counts: list[Count]
    """Count effects applied now (not seen before)."""
    arm_applied: int
    arm_duplicates: int


class RedisSink:
    """Applies effects to the router's arm statistics and to the feedback ledger."""

    def __init__(self, store: ArmStatsStore, ledger: Ledger, planner: LedgerPlanner) -> None:
        self._store = store
        self._ledger = ledger
        self._planner = planner

    async def apply(self, effects: Sequence[Effect], metrics: FeedbackMetrics | None = None) -> Applied:
        """Apply every effect at most once. Raises RedisError (or OSError) on failure: calling
        again with the same effects is safe (what landed is not applied twice)."""
        updates: dict[str, list[ArmUpdate]] = defaultdict(list)
        for effect in effects:
            if isinstance(effect, Reward):
                updates[effect.route].append(ArmUpdate(effect.request_id, effect.served.arm, effect.reward))
        planned = self._planner.items(effects)
        batches = {route: [item for item, _ in pairs] for route, pairs in planned.items()}
        arm_calls = [self._store.apply(route, batch) for route, batch in updates.items()]
        results = await asyncio.gather(self._ledger.apply(batches), *arm_calls)
        flags_by_route: dict[str, list[bool]] = results[0]
        counts: list[Count] = []
        for route, pairs in planned.items():
            for (item, members), applied in zip(pairs, flags_by_route.get(route, [])):
                if applied:
                    counts.extend(m for m in members if isinstance(m, Count))
        arm_applied = arm_duplicates = 0
        for route, result in zip(updates, results[1:]):
            arm_applied += result.applied
            arm_duplicates += result.duplicates
            if metrics is not None:
                metrics.arm_updates.labels(route, "applied").inc(result.applied)
                metrics.arm_updates.labels(route, "duplicate").inc(result.duplicates)
        return Applied(counts, arm_applied, arm_duplicates)


# ---------------------------------------------------------------------------------------------
# Kafka: dead letters and alerts


class KafkaOut:
    """Dead letters and alerts through one aiokafka producer (acknowledged before returning)."""

    def __init__(self, producer: Any, deadletter_topic: str, alerts_topic: str) -> None:
        self._producer = producer
        self.deadletter_topic = deadletter_topic
        self.alerts_topic = alerts_topic

    async def send_all(self, messages: Sequence[tuple[str, bytes | None, bytes]]) -> None:
        """Send (topic, key, value) messages and wait until the broker acknowledged all of them."""
        futures = [await self._producer.send(topic, key=key, value=value) for topic, key, value in messages]
        if futures:
            await asyncio.gather(*futures)

    def dead_letter(self, key: bytes | None, error: str, reason: str, topic: str, partition: int, offset: int,
                    payload: bytes) -> tuple[str, bytes | None, bytes]:
        letter = DeadLetter(error=error, topic=topic, partition=partition, offset=offset,
                            payload=dead_letter_payload(payload), reason=reason)
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


__all__ = ["Applied", "FeedbackKeys", "KafkaOut", "Ledger", "LedgerItem", "LedgerPlanner", "QualityMonitor",
           "RedisSink", "parse_quality"]
