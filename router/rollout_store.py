"""Rollout state in Redis: compare-and-set on the state's seq, an outbox for audit events and alerts.

Keys for route R with prefix P (hash tag ``{R}``: the same Cluster slot as the arm statistics):

``P:{R}:rollout``          hash: a :class:`router.lineup.RolloutRecord` (the RolloutState fields,
                           ``base``, ``rejected``, ``baseline``)
``P:{R}:rollout:outbox``   list: audit events (routing-changes topic) and alerts written in the
                           same script as the transition, published by whoever drains it
``P:{R}:rollout:lease``    who drains the outbox now (SET NX PX), so one process publishes
``P:{R}:rollout:latency``  hash ``<seq>|<bucket>`` -> rows: the candidate's serving latency per stage
                           (gateways add, the feedback worker reads the p99)
``P:{R}:rollout:alarms``   hash kind -> alarms so far (gateways count their drift alarms here for the
                           worker's retraining triggers)
``P:{R}:rollout:admission:lease``  which gateway benchmarks the version at the admission stage (SET NX
                           PX ``<version>:<token>``; the verdict itself is in the record, field ``admission``)

Exactly once: a transition is written by one Lua script only if the stored ``seq`` still equals
the transition's ``from_seq`` (a start only if the stored seq is the one the starter read, or
nothing is stored), and the script appends the transition's audit event and alert to the
outbox in the same atomic step. So with several feedback workers and gateways evaluating the
same evidence, each transition lands once and its events are queued once; a process that dies
after the write loses nothing (the next drain publishes them). Draining is at least once: a
drainer that dies between publishing and trimming leaves them for the next one after the lease
(15 s) expires, and each event carries its ``seq`` so consumers can drop a repeat.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from banditgate.config import Route
from banditgate.events import Alert, RoutingChange
from banditgate.jsontypes import JSONObject, JSONValue
from router.lineup import RolloutRecord, lineup, primaries_after, replaced_arm, serving_version
from router.rollout import NOT_RETRIED, AuditRecord, RolloutState, Transition, may_start, start
from router.rollout_admission import clean

if TYPE_CHECKING:
    from router.arm_stats import ArmStats

_CAS = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  if current then return 0 end
elseif (not current) or tonumber(current) ~= tonumber(ARGV[2]) then
  return 0
end
local n = tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n))
for i = 4, 3 + n do redis.call('RPUSH', KEYS[2], ARGV[i]) end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

OUTBOX_LEASE_MS = 15_000
LATENCY_BASE_MS = 0.05
LATENCY_GROWTH = 1.1
"""Latency buckets: bucket i holds [0.05 ms * 1.1^i, 0.05 ms * 1.1^(i+1)): 10% resolution."""


def latency_bucket(latency_ms: float) -> int:
    """The histogram bucket of a latency (0 for anything at or below the first edge)."""
    if latency_ms <= LATENCY_BASE_MS:
        return 0
    return int(math.log(latency_ms / LATENCY_BASE_MS) / math.log(LATENCY_GROWTH))


def latency_quantile(counts: Mapping[int, float], q: float) -> float | None:
    """The `q` quantile (upper edge of its bucket, ms) of a bucket -> rows histogram; None if empty."""
    total = sum(counts.values())
    if total <= 0:
        return None
    seen = 0.0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= q * total:
            return LATENCY_BASE_MS * LATENCY_GROWTH ** (bucket + 1)
    return LATENCY_BASE_MS * LATENCY_GROWTH ** (max(counts) + 1)


def audit_event(audit: AuditRecord) -> JSONObject:
    """The routing-changes event of a transition (``seq``: the state's seq after it)."""
    return RoutingChange(seq=audit.from_seq + 1, **audit.to_dict()).to_dict()


def rollout_alert(audit: AuditRecord) -> Alert | None:
    """The promote / reject / rollback alert of a transition (None for pause and resume)."""
    if audit.alert_kind is None:
        return None
    return Alert(kind=audit.alert_kind, route=audit.route, arm=audit.arm, model_version=audit.version,
                 metric="rollout_stage", value=float(audit.from_seq + 1), threshold=0.0, ts=audit.ts,
                 details={"model": audit.model, "from_stage": audit.from_stage, "to_stage": audit.to_stage,
                          "actor": audit.actor, "reason": audit.reason, "seq": audit.from_seq + 1,
                          # a refusal carries the figures it was decided on
                          **({"admission": dict(audit.details)} if audit.to_stage == "refused" else {})})


def _text(value: object) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


class RolloutStore:
    """Rollout records of every route in Redis (see the module docstring)."""

    def __init__(self,
                 client: Any,  # Any: redis.asyncio.Redis, whose stubs type hgetall as dict[bytes | str, ...] (not per decode mode)
                 prefix: str = "bg") -> None:
        self._client = client
        self._prefix = prefix
        self._cas = client.register_script(_CAS)
        self._release = client.register_script(_RELEASE)

    def key(self, route: str, suffix: str = "") -> str:
        return f"{self._prefix}:{{{route}}}:rollout" + (f":{suffix}" if suffix else "")

    # -- records ---------------------------------------------------------------------------------

    async def read(self, route: str) -> RolloutRecord | None:
        """The stored record of `route`, None when it never had a rollout. Raises RolloutError
        for a corrupt record, RedisError when Redis is away."""
        raw = await self._client.hgetall(self.key(route))
        return RolloutRecord.from_fields(raw) if raw else None

    async def read_many(self, routes: Iterable[str]) -> dict[str, RolloutRecord | None]:
        """Records of several routes in one round trip."""
        names = list(routes)
        if not names:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.key(name))
        replies = await pipe.execute()
        return {name: RolloutRecord.from_fields(raw) if raw else None for name, raw in zip(names, replies)}

    async def compare_and_set_hash(self, key: str, outbox_key: str, field: str, expected: int | None,
                                   fields: Mapping[str, str], outbox: Sequence[Mapping[str, JSONValue]] = ()) -> bool:
        """Replace hash `key` by `fields` only if its `field` still equals `expected` (None: only if
        the hash has no such field), appending `outbox` items to list `outbox_key` in the same step.
        Returns whether it was written."""
        args: list[str | int] = [field, "" if expected is None else str(expected), len(outbox)]
        args += [orjson.dumps(item).decode() for item in outbox]
        for name, value in fields.items():
            args += [name, value]
        return bool(await self._cas(keys=[key, outbox_key], args=args))

    async def write(self, record: RolloutRecord, expected_seq: int | None, audit: AuditRecord | None = None) -> bool:
        """Store `record` if the stored seq is still `expected_seq` (None: nothing stored), queueing
        the audit event and alert of `audit`. Returns whether this call wrote it."""
        outbox: list[JSONObject] = []
        if audit is not None:
            outbox.append({"topic": "routing_changes", "value": audit_event(audit)})
            alert = rollout_alert(audit)
            if alert is not None:
                outbox.append({"topic": "alerts", "value": alert.to_dict()})
        route = record.state.route
        return await self.compare_and_set_hash(self.key(route), self.key(route, "outbox"), "seq", expected_seq,
                                               record.to_fields(), outbox)

    async def apply(self, record: RolloutRecord, transition: Transition, baseline: ArmStats | None = None) -> bool:
        """Apply `transition` to `record` once (compare-and-set on ``transition.audit.from_seq``)."""
        return await self.write(record.with_state(transition.state, baseline), transition.audit.from_seq,
                                transition.audit)

    async def begin(self, route: Route, version: int, now: float | None = None, actor: str = "rule:new-version"
                    ) -> RolloutRecord | None:
        """Start a rollout of `version` of the route's rollout model, once across processes.

        Returns the new record, or None when the version may not start (another rollout is
        active, the version is not newer than the one serving or one rejected before, or another
        process started it first). Raises RolloutError when the route has no rollout config.
        """
        from router.rollout import RolloutError

        if route.rollout is None or not route.rollout.enabled:
            raise RolloutError(f"route {route.name} has no rollout configuration")
        model = route.rollout_model()
        assert model is not None  # noqa: S101 - rollout config implies a model
        previous = await self.read(route.name)
        primaries = primaries_after(previous) if previous is not None else lineup(route, None).arms
        replaces = replaced_arm(route, primaries)
        if replaces is None:
            raise RolloutError(f"route {route.name}: no arm serves model {model} to be replaced")
        serving = serving_version(primaries, replaces)
        if serving is not None and version <= serving:
            return None
        rejected = dict(previous.rejected) if previous is not None else {}
        if previous is not None and previous.state.stage in NOT_RETRIED:
            rejected[previous.state.model] = max(rejected.get(previous.state.model, 0), previous.state.version)
        if not may_start(model, version, previous.state if previous is not None else None, rejected):
            return None
        now = time.time() if now is None else now
        gated = route.rollout.admission is not None
        state = start(route.name, model, version, replaces, now, admission=gated)
        record = RolloutRecord.begin(route, state, previous)
        where = "is benchmarked at the admission gate" if gated else "enters as a shadow"
        audit = AuditRecord(route=route.name, model=model, version=version, arm=state.candidate_arm,
                            from_stage="none", to_stage=state.stage, actor=actor,
                            reason=f"version {version} of {model} appeared; it {where}",
                            before={}, after={"stage": state.stage, "shadows": [] if gated else [state.candidate_arm]},
                            ts=now, from_seq=record.state.seq - 1, alert_kind=None)
        written = await self.write(record, previous.state.seq if previous is not None else None, audit)
        return record if written else None

    async def operate(self, route: Route, action: str, who: str, reason: str = "", now: float | None = None,
                      attempts: int = 5) -> tuple[RolloutRecord, AuditRecord]:
        """An operator's promote / rollback / pause / resume of the route's current rollout,
        applied once (compare-and-set; retried on a concurrent change). Raises RolloutError when
        there is no active rollout or the action is unknown."""
        from router.rollout import RolloutError, manual

        if route.rollout is None:
            raise RolloutError(f"route {route.name} has no rollout configuration")
        for _ in range(attempts):
            record = await self.read(route.name)
            if record is None:
                raise RolloutError(f"route {route.name} has no rollout")
            # `action` is the operator's word, not yet an Action: manual refuses an unknown one
            transition = manual(record.state, action, who, time.time() if now is None else now,  # type: ignore[arg-type]
                                route.rollout, reason)
            if await self.apply(record, transition):
                return record.with_state(transition.state), transition.audit
        raise RolloutError(f"route {route.name}: the rollout kept changing under {action}; try again")

    async def admit(self, route: Route, version: int, who: str, reason: str = "", now: float | None = None,
                    attempts: int = 5) -> tuple[RolloutRecord, AuditRecord]:
        """An operator admits `version` by hand (from the admission or refused stage it enters as a
        shadow), once (compare-and-set; retried on a concurrent change). Raises RolloutError."""
        from router.rollout import RolloutError, admit

        if route.rollout is None:
            raise RolloutError(f"route {route.name} has no rollout configuration")
        for _ in range(attempts):
            record = await self.read(route.name)
            if record is None:
                raise RolloutError(f"route {route.name} has no rollout")
            transition = admit(record.state, version, who, time.time() if now is None else now, route.rollout,
                               reason)
            # the stored verdict says it was admitted by hand (the gauges and `rollout status` read
            # it), the benchmark's figures and its reason kept beside
            measured = dict(record.admission) if record.admission is not None else {}
            manual: JSONObject = {**measured, "admitted": True,
                                  "reason": clean(f"admitted by hand by {who}"
                                                  f"{': ' + reason if reason else ''}"),
                                  "manual": {"who": who, "measured": measured.get("reason")}}
            for key, default in (("candidate", None), ("incumbent", None), ("checks", [])):
                manual.setdefault(key, default)
            admitted = record.with_state(transition.state, admission=manual)
            if await self.write(admitted, transition.audit.from_seq, transition.audit):
                return admitted, transition.audit
        raise RolloutError(f"route {route.name}: the rollout kept changing under admit; try again")

    async def claim_admission(self, route: str, version: int, ttl_ms: int) -> str | None:
        """Claim the right to benchmark `version` of the route's rollout (one replica at a time;
        SET NX PX, so a replica that dies mid-run frees it after `ttl_ms`). Returns the token to
        release it with, None when another replica holds it."""
        token = f"{version}:{uuid.uuid4().hex}"
        if await self._client.set(self.key(route, "admission:lease"), token, nx=True, px=max(1, int(ttl_ms))):
            return token
        return None

    async def release_admission(self, route: str, token: str) -> None:
        await self._release(keys=[self.key(route, "admission:lease")], args=[token])

    async def decide_admission(self, record: RolloutRecord, transition: Transition,
                               result: JSONObject) -> bool:
        """Record the admission verdict with its figures and its transition (to shadow or refused)
        once: compare-and-set on the seq the benchmark started from, the audit event and (refused)
        the alert queued in the same step. Returns whether this call wrote it."""
        return await self.write(record.with_state(transition.state, admission=result), transition.audit.from_seq,
                                transition.audit)

    async def set_status(self, route: str, status: Mapping[str, object], ttl_s: int = 300) -> None:
        """The feedback worker's latest view of the rollout (evidence, what is awaited), for status."""
        await self._client.set(self.key(route, "status"), orjson.dumps(dict(status), default=str), ex=ttl_s)

    async def status(self, route: str) -> JSONObject | None:
        raw = await self._client.get(self.key(route, "status"))
        return None if raw is None else dict(orjson.loads(raw))

    # -- outbox ----------------------------------------------------------------------------------

    async def drain_outbox(self, route: str, send: Callable[[list[JSONObject]], Awaitable[None]],
                           batch: int = 100) -> int:
        """Publish queued events of `route` through `send` (which must raise unless all were
        acknowledged), then remove them. One drainer at a time (a lease); returns how many it sent."""
        outbox = self.key(route, "outbox")
        if not await self._client.llen(outbox):
            return 0
        lease, token = self.key(route, "lease"), uuid.uuid4().hex
        if not await self._client.set(lease, token, nx=True, px=OUTBOX_LEASE_MS):
            return 0
        try:
            raw = await self._client.lrange(outbox, 0, batch - 1)
            items = [orjson.loads(item) for item in raw]
            if items:
                await send(items)
                await self._client.ltrim(outbox, len(items), -1)
            return len(items)
        finally:
            await self._release(keys=[lease], args=[token])

    # -- latency ---------------------------------------------------------------------------------

    async def add_latency(self, route: str, seq: int, counts: Mapping[int, int]) -> None:
        """Add a candidate's rows per latency bucket, for the stage with `seq`."""
        if not counts:
            return
        pipe = self._client.pipeline(transaction=False)
        for bucket, rows in counts.items():
            pipe.hincrby(self.key(route, "latency"), f"{seq}|{bucket}", int(rows))
        await pipe.execute()

    async def latency(self, route: str, seq: int) -> dict[int, int]:
        """The candidate's latency histogram for the stage with `seq`."""
        raw = await self._client.hgetall(self.key(route, "latency"))
        out: dict[int, int] = {}
        for name, value in raw.items():
            stage_seq, _, bucket = _text(name).partition("|")
            if stage_seq == str(seq) and bucket.isascii() and bucket.isdigit():
                out[int(bucket)] = int(_text(value))
        return out

    # -- alarms for retraining triggers ----------------------------------------------------------

    async def add_alarms(self, route: str, counts: Mapping[str, int]) -> None:
        """Count alarms of a route (``drift`` from the gateways) for its retraining triggers."""
        if not counts:
            return
        pipe = self._client.pipeline(transaction=False)
        for kind, count in counts.items():
            pipe.hincrby(self.key(route, "alarms"), kind, int(count))
        await pipe.execute()

    async def alarms(self, route: str) -> dict[str, int]:
        """Alarms counted so far per kind (never reset: readers remember what they consumed)."""
        raw = await self._client.hgetall(self.key(route, "alarms"))
        return {_text(k): int(_text(v)) for k, v in raw.items()}

    async def clear(self, route: str) -> None:
        await self._client.delete(self.key(route), self.key(route, "outbox"), self.key(route, "lease"),
                                  self.key(route, "latency"), self.key(route, "status"), self.key(route, "alarms"),
                                  self.key(route, "admission:lease"))


def state_of(record: RolloutRecord | None) -> RolloutState | None:
    return None if record is None else record.state


__all__ = ["RolloutStore", "audit_event", "latency_bucket", "latency_quantile", "rollout_alert", "state_of"]
