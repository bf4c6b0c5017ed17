"""Admin endpoints for rollouts (behind the admin token, like every /v2/admin endpoint):

``GET  /v2/admin/routes/{route}/rollout/status``          stage, routing, the worker's evidence
``POST /v2/admin/routes/{route}/rollout/promote``         one stage forward
``POST /v2/admin/routes/{route}/rollout/rollback``        back to the previous arms at once
``POST /v2/admin/routes/{route}/rollout/pause|resume``    stop / restart automatic promotion
``POST /v2/admin/routes/{route}/rollout/start``           body ``{"version": N}``: register a version
``POST /v2/admin/routes/{route}/rollout/admit``           body ``{"version": N}``: admit a version refused
                                                          at (or waiting at) the admission gate by hand

An optional JSON body ``{"who": "...", "reason": "..."}`` names the operator in the audit event
(``admin:<who>``, default ``admin:admin-endpoint``). Changes go through the shared store
(compare-and-set, audit event queued in the same step); this replica applies them at once,
the others within one snapshot refresh.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson

from banditgate.jsontypes import JSONObject
from gateway.errors import GatewayError, InvalidInput, ModelNotFound
from router.rollout import RolloutError, status

if TYPE_CHECKING:
    from gateway.rollout_apply import RolloutApplier
    from router.rollout import Evidence

log = logging.getLogger("banditgate.admin")

ACTIONS = ("status", "promote", "rollback", "pause", "resume", "start", "admit")


async def rollout_admin(applier: RolloutApplier | None, route_name: str, action: str, method: str,
                        body: bytes) -> JSONObject:
    """One rollout admin request (`applier`: the gateway's, None without rollouts). Raises
    GatewayError subclasses for the caller's mistakes."""
    if applier is None or route_name not in applier.routes:
        raise ModelNotFound(f"route {route_name!r} has no rollout configuration")
    if action not in ACTIONS:
        raise ModelNotFound(f"unknown rollout action {action!r} ({', '.join(ACTIONS)})")
    route = applier.routes[route_name]
    store = applier.store
    if action == "status":
        return await rollout_status(applier, route_name)
    if method != "POST":
        raise InvalidInput(f"rollout {action} needs POST")
    try:
        options = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidInput("the body must be JSON: {\"who\": ..., \"reason\": ..., \"version\": ...}") from None
    if not isinstance(options, dict):
        raise InvalidInput("the body must be a JSON object")
    who = str(options.get("who") or "admin-endpoint")
    try:
        if action == "start":
            version = options.get("version")
            if not isinstance(version, int) or version < 1:
                raise InvalidInput("start needs {\"version\": N} with N >= 1")
            record = await store.begin(route, version, time.time(), actor=f"admin:{who}")
            if record is None:
                raise InvalidInput(f"route {route_name}: version {version} may not start now (a rollout is active, "
                                   "or it is not newer than the version serving or one rejected before)")
            audit_line = f"route {route_name}: {record.state.candidate_arm} none -> {record.state.stage} by admin:{who}"
        elif action == "admit":
            version = options.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise InvalidInput("admit needs {\"version\": N} with N >= 1")
            record, audit = await store.admit(route, version, who, str(options.get("reason") or ""))
            audit_line = audit.log_line()
        else:
            record, audit = await store.operate(route, action, who, str(options.get("reason") or ""))
            audit_line = audit.log_line()
    except RolloutError as exc:
        raise InvalidInput(str(exc)) from None
    except OSError as exc:
        raise GatewayError(f"rollout store unavailable: {exc}") from None
    log.info("routing change by admin endpoint: %s", audit_line)
    await applier.apply(route_name, record)
    return {"route": route_name, "action": action, "change": audit_line, **await rollout_status(applier, route_name)}


async def rollout_status(applier: RolloutApplier, route_name: str) -> JSONObject:
    """The stored state, this replica's lineup, and the feedback worker's last evidence."""
    rollout = applier.routes[route_name].rollout  # the applier's routes all have one (never None here)
    record = await applier.store.read(route_name)
    if record is None or rollout is None:
        return {"route": route_name, "rollout": None}
    out = status(record.state, _no_evidence(), rollout, time.time())
    worker = await applier.store.status(route_name)
    if worker is not None and worker.get("seq") == record.state.seq:
        out = {**out, **{k: worker[k] for k in ("next", "next_rule", "next_reason", "awaiting", "evidence")
                         if k in worker}, "evidence_age_s": round(time.time() - float(worker.get("ts", 0)), 1)}
    else:
        out.update(next=None, next_rule="unknown", next_reason="no evidence from a feedback worker yet", awaiting=[],
                   evidence={})
    out["rejected"] = dict(record.rejected)
    out["admission"] = dict(record.admission) if record.admission is not None else None
    policy = applier.dataplane.routes[route_name].policy
    out["shares"] = {name: round(float(share), 4) for name, share in zip(policy.arm_names, policy.shares)}
    out["shadows"] = list(policy.shadow_names)
    return {"route": route_name, "rollout": out}


def _no_evidence() -> Evidence:
    from router.rollout import Evidence

    return Evidence()
