"""`banditgate rollout status|promote|rollback|pause|resume|start|admit ROUTE`: operate a route's rollout.

``admit ROUTE --version N`` lets a version refused at the admission gate (or still waiting
there) enter as a shadow by hand; ``status`` prints the admission figures as a table.

Reads and changes the rollout record in Redis through router.rollout_store (compare-and-set on
the state's seq, the audit event and alert queued in the same step), then publishes the route's
queued events to Kafka (routing-changes, alerts) through the feedback worker's path (KafkaOut: an
alert also goes to the route's webhook); if Kafka does not answer they stay queued and the
feedback worker publishes them. Gateways apply the change within one snapshot refresh.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from banditgate.config import Config, Rollout, Route
from banditgate.jsontypes import JSONObject
from router.rollout import RolloutError

if TYPE_CHECKING:
    import redis.asyncio as redis_asyncio

ACTIONS = ("status", "promote", "rollback", "pause", "resume", "start", "admit")


def _route(config: Config, name: str) -> tuple[Route, Rollout]:
    """The route and its rollout configuration (which it must have)."""
    try:
        route = config.route(name)
    except KeyError:
        raise RolloutError(f"no route {name!r} in the config (routes: {', '.join(r.name for r in config.routes)})") from None
    if route.rollout is None:
        raise RolloutError(f"route {name!r} has no rollout configuration")
    return route, route.rollout


async def _publish(config: Config, client: redis_asyncio.Redis, route: str) -> int:
    """Publish the route's queued audit events and alerts on the worker's path (KafkaOut, so an
    alert also reaches the route's webhook). Returns how many were sent."""
    from aiokafka import AIOKafkaProducer

    from banditgate.connections import kafka_client_kwargs
    from feedback.lifecycle import LifecycleDriver
    from feedback.sinks import KafkaOut
    from feedback.webhooks import WebhookNotifier

    producer = AIOKafkaProducer(**kafka_client_kwargs(config.kafka), enable_idempotence=True, acks="all")
    await asyncio.wait_for(producer.start(), timeout=10)
    webhooks = WebhookNotifier({r.name: r.webhook_url for r in config.routes if r.webhook_url})
    webhooks.start()
    try:
        topics = config.kafka.topics
        driver = LifecycleDriver(config, client, KafkaOut(producer, topics.deadletter, topics.alerts, webhooks,
                                                       cloudevents=config.kafka.cloudevents))
        return int(await asyncio.wait_for(driver.rollouts.drain_outbox(route, driver.send_queued), timeout=20))
    finally:
        await webhooks.stop()
        await producer.stop()


async def rollout_command(config: Config, action: str, route_name: str, who: str, reason: str,
                          version: int | None) -> JSONObject:
    """Do `action` on the route's rollout; returns what to print. Raises RolloutError."""
    from banditgate.connections import redis_client
    from router.rollout import Evidence, status
    from router.rollout_store import RolloutStore

    if action not in ACTIONS:
        raise RolloutError(f"unknown rollout action {action!r}: {', '.join(ACTIONS)}")
    route, rollout = _route(config, route_name)
    client = redis_client(config.redis)
    store = RolloutStore(client, prefix=config.redis.key_prefix)
    try:
        change = None
        if action == "start":
            if version is None:
                raise RolloutError("rollout start needs --version N")
            record = await store.begin(route, version, time.time(), actor=f"admin:{who}")
            if record is None:
                raise RolloutError(f"route {route_name}: version {version} may not start now (a rollout is active, or it "
                                   "is not newer than the version serving or one rejected before)")
            change = f"route {route_name}: {record.state.candidate_arm} none -> {record.state.stage} by admin:{who}"
        elif action == "admit":
            if version is None:
                raise RolloutError("rollout admit needs --version N")
            _, audit = await store.admit(route, version, who, reason)
            change = audit.log_line()
        elif action != "status":
            _, audit = await store.operate(route, action, who, reason)
            change = audit.log_line()
        record = await store.read(route_name)
        out: JSONObject = {"route": route_name}
        if change is not None:
            out["change"] = change
            try:
                out["published"] = await _publish(config, client, route_name)
            except Exception as exc:  # noqa: BLE001 - queued: the feedback worker publishes it
                out["published"] = f"queued ({type(exc).__name__}); the feedback worker publishes it"
        if record is None:
            out["rollout"] = None
            return out
        view = status(record.state, Evidence(), rollout, time.time())
        worker = await store.status(route_name)
        if worker is not None and worker.get("seq") == record.state.seq:
            view.update({k: worker[k] for k in ("next", "next_rule", "next_reason", "awaiting", "evidence") if k in worker})
            view["evidence_age_s"] = round(time.time() - float(worker.get("ts", 0)), 1)
        else:
            view.update(next=None, next_rule="unknown", next_reason="no evidence from a feedback worker yet",
                        awaiting=[], evidence={})
        view["rejected"] = dict(record.rejected)
        view["admission"] = dict(record.admission) if record.admission is not None else None
        out["rollout"] = view
        return out
    finally:
        await client.aclose()


def run_rollout(config: Config, action: str, route: str, who: str, reason: str, version: int | None,
                as_json: bool) -> int:
    """The CLI command: prints the outcome (one JSON object with --json)."""
    result = asyncio.run(rollout_command(config, action, route, who, reason, version))
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    if "change" in result:
        print(result["change"])
        print(f"events published: {result['published']}")
    view = result.get("rollout")
    if view is None:
        print(f"route {route}: no rollout yet")
        return 0
    print(f"route {route}: {view['arm']} ({view['model']} v{view['version']}) replacing {view['replaces']}: "
          f"{view['stage']}{' (paused)' if view['paused'] else ''} for {view['stage_age_s']:.0f} s, seq {view['seq']}")
    print(f"  last change: {view['last_reason']}")
    if view.get("next"):
        print(f"  next: {view['next']} ({view['next_rule']}): {view['next_reason']}")
    for item in view.get("awaiting", []):
        print(f"  awaiting: {item}")
    routing = view["routing"]
    print(f"  routing: shadows {routing['shadows']}, caps {routing['caps']}, floors {routing['floors']}, "
          f"drained {routing['drained']}, unloaded {routing['unloaded']}")
    if view.get("rejected"):
        print(f"  never retried (model: highest rejected version): {view['rejected']}")
    if view.get("admission"):
        from router.rollout_admission import table

        for line in table(view["admission"]):
            print(f"  {line}")
    return 0
