"""The guardrail, applied: every few seconds, test each route's arms against its best arm and drain
the ones that are significantly worse (router.guardrail: an mSPRT, valid under continuous checks).

Several gateway replicas run this; a `SET NX` marker per route and arm in Redis makes exactly one
of them drain the arm and publish the `guardrail` alert. An admin `restore` clears the marker, so
the arm is judged again from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from banditgate import redis_errors
from banditgate.config import Route
from router.guardrail import evaluate
from router.stats_store import ArmStatsStore

log = logging.getLogger("banditgate.guardrail")


def marker_key(store: ArmStatsStore, route: str, arm: str) -> str:
    """The Redis key that says an arm was drained by the guardrail (same hash tag as the route)."""
    return store.stats_key(route).removesuffix(":arms") + f":guardrail:{arm}"


class GuardrailWatch:
    def __init__(self, store: ArmStatsStore, client: Any, routes: Mapping[str, Route],
                 publish_alert: Callable[[dict[str, Any]], None], interval_s: float = 5.0,
                 on_failure: Callable[[str], None] | None = None) -> None:
        """`on_failure(kind)` counts each failed check (banditgate.redis_errors kinds)."""
        self.episodes = redis_errors.FailureEpisodes(log, "guardrail", on_failure)
        self.store = store
        self.client = client
        self.routes = {name: route for name, route in routes.items()
                       if route.guardrail.enabled and route.policy in ("thompson", "fixed") and len(route.arms) > 1}
        self.publish_alert = publish_alert
        self.interval_s = interval_s

    async def check_once(self) -> list[dict[str, Any]]:
        """One pass over every guarded route; returns the alerts it published."""
        if not self.routes:
            return []
        snapshots = await self.store.snapshots(self.routes)
        published = []
        for name, snapshot in snapshots.items():
            route = self.routes[name]
            for finding in evaluate(snapshot.arms, route.guardrail, reward=route.reward):
                claimed = await self.client.set(marker_key(self.store, name, finding.arm), str(time.time()), nx=True)
                if not claimed:
                    continue  # another replica drained it (or is doing so now)
                await self.store.set_arm_state(name, finding.arm, "drained")
                version = next((a.version for a in route.arms if a.name == finding.arm), None)
                alert = finding.alert_fields(name, time.time(), version if isinstance(version, int) else None)
                log.warning("guardrail: route %s arm %s drained (%s %.4f vs best arm %s %.4f, mSPRT log-LR %.1f >= %.1f)",
                            name, finding.arm, finding.metric, finding.value, finding.best_arm, finding.best_value,
                            finding.log_likelihood_ratio, finding.log_threshold)
                self.publish_alert(alert)
                published.append(alert)
        return published

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=self.interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.check_once()
            except Exception as exc:  # noqa: BLE001 - classified: an outage (READONLY, OOM...) is logged once
                self.episodes.failed(exc)
            else:
                self.episodes.succeeded()
