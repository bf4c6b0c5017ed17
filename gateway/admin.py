"""Admin operations behind the admin token: reload models, show arm statistics, drain/restore/reset arms.

Arm states live in the shared store so every gateway replica applies them within one snapshot
refresh; the local policy is changed at once too, so this replica does not wait for it.
Every change is one audit line in the log (who: the admin endpoint; what; before and after).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson

from banditgate.config import dump_public
from banditgate.jsontypes import JSONObject
from gateway.dataplane import Dataplane
from gateway.errors import GatewayError, InvalidInput, ModelNotFound
from gateway.guardrail_watch import marker_key
from gateway.models.repository import ModelRepository
from gateway.rollout_apply import RolloutApplier
from gateway.serving import RouteRuntime
from router.stats_store import ArmStatsStore

if TYPE_CHECKING:
    from redis import asyncio as aredis

log = logging.getLogger("banditgate.admin")


class Admin:
    def __init__(self, dataplane: Dataplane, repository: ModelRepository, store: ArmStatsStore | None,
                 redis: aredis.Redis | None = None, rollouts: RolloutApplier | None = None) -> None:
        self.dataplane = dataplane
        self.repository = repository
        self.store = store
        self.redis = redis
        self.rollouts = rollouts

    async def handle(self, params: dict[str, str], method: str, body: bytes) -> JSONObject:
        """Dispatch one admin request; raises GatewayError subclasses for the caller's mistakes."""
        if "rollout_action" in params:
            from gateway.admin_rollout import rollout_admin

            return await rollout_admin(self.rollouts, params["route"], params["rollout_action"], method, body)
        if "arm" in params:
            return await self.arm_action(params["route"], params["arm"], params["action"])
        if "route" in params:
            return await self.route_status(params["route"])
        action = params.get("action")
        if action == "reload" and method == "POST":
            return await self.reload()
        if action == "routes" and method == "GET":
            return {"routes": [await self.route_status(name) for name in self.dataplane.routes]}
        if action == "config" and method == "GET":
            return dump_public(self.dataplane.config)  # secrets masked
        raise ModelNotFound(f"unknown admin action {action!r} (reload, routes, config, routes/<route>, "
                            "routes/<route>/arms/<arm>/drain|restore|reset)")

    async def reload(self) -> JSONObject:
        events = await asyncio.to_thread(self.repository.scan)
        self.dataplane.collect_retired()  # a superseded `latest` version: freed when its batches end
        for event in events:
            log.info("admin reload: %s version %s %s%s", event.model, event.version,
                     "loaded" if event.ok else "failed", f": {event.error}" if event.error else "")
        return {"events": [{"model": e.model, "version": e.version, "ok": e.ok, "error": e.error} for e in events],
                "errors": self.repository.errors()}

    def _runtime(self, route: str) -> RouteRuntime:
        runtime = self.dataplane.routes.get(route)
        if runtime is None:
            raise ModelNotFound(f"unknown route {route!r}")
        return runtime

    async def route_status(self, route: str) -> JSONObject:
        runtime = self._runtime(route)
        policy = runtime.policy
        arms: dict[str, dict[str, float | str]] = {name: {"share": float(share), "drained": name in policy.drained}
                for name, share in zip(policy.arm_names, policy.shares)}
        if self.store is not None:
            try:
                snapshot = await self.store.snapshot(route)
                for name, entry in arms.items():
                    arm = snapshot.arm(name)
                    entry.update(weight=arm.stats.weight, mean=arm.stats.mean, calls=arm.calls,
                                      errors=arm.errors, state=arm.state)
            except Exception as exc:  # noqa: BLE001 - status still answers from the local policy
                arms_note = f"arm statistics unavailable: {type(exc).__name__}"
                return {"route": route, "policy": runtime.route.policy, "arms": arms, "note": arms_note}
        return {"route": route, "policy": runtime.route.policy, "arms": arms}

    async def arm_action(self, route: str, arm: str, action: str) -> JSONObject:
        runtime = self._runtime(route)
        if arm not in runtime.policy.arm_names:
            raise ModelNotFound(f"route {route!r} has no arm {arm!r} (arms: {', '.join(runtime.policy.arm_names)})")
        before = {n: round(float(s), 4) for n, s in zip(runtime.policy.arm_names, runtime.policy.shares)}
        try:
            if action == "drain":
                runtime.policy.drain(arm)
                if self.store is not None:
                    await self.store.set_arm_state(route, arm, "drained")
            elif action == "restore":
                runtime.policy.restore(arm)
                if self.store is not None:
                    await self.store.set_arm_state(route, arm, "active")
                    if self.redis is not None:  # let the guardrail judge the arm again from now on
                        await self.redis.delete(marker_key(self.store, route, arm))
            elif action == "reset":
                if self.store is None:
                    raise GatewayError("no arm statistics store is configured")
                await self.store.reset_arm(route, arm)
            else:
                raise InvalidInput(f"unknown arm action {action!r}: drain, restore or reset")
        except ValueError as exc:  # RoutingError: e.g. draining the last arm
            raise InvalidInput(str(exc)) from None
        after = {n: round(float(s), 4) for n, s in zip(runtime.policy.arm_names, runtime.policy.shares)}
        log.info("routing change by admin endpoint: route %s arm %s %s; shares %s -> %s", route, arm, action,
                 orjson.dumps(before).decode(), orjson.dumps(after).decode())
        return {"route": route, "arm": arm, "action": action, "shares_before": before, "shares_after": after}
