"""The guardrail, applied: every few seconds, test each route's arms against its best arm and drain
the ones that are significantly worse (router.guardrail: an mSPRT, valid under continuous checks).

Several gateway replicas run this; one Lua script per finding (`_DRAIN`) drains the arm and writes
a marker for it in one atomic step, so exactly one replica drains it and publishes the `guardrail`
alert, and no error between two round trips can leave a marker without a drain (an arm the
guardrail would then never drain). The marker expires (`marker_ttl_s`, 24 h); an admin `restore`
clears it, so the arm is judged again from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from banditgate import redis_errors
from banditgate.config import Route
from banditgate.jsontypes import JSONObject
from router.guardrail import evaluate
from router.stats_store import ArmStatsStore

if TYPE_CHECKING:
    from redis import asyncio as aredis

log = logging.getLogger("banditgate.guardrail")


# KEYS: the marker, the route's arm hash (same hash tag). ARGV: the arm's state field, the marker's
# value (when), its TTL in ms. Returns 1 when this call drained the arm, 0 when another replica
# did (the marker exists) or the arm was drained already (an operator). The state is written
# before the marker: if Redis refuses the first write (NOPERM, OOM) nothing is written at all;
# a script is not rolled back, so a marker written first would stay without its drain.
_DRAIN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local drained = redis.call('HGET', KEYS[2], ARGV[1]) == 'drained'
if not drained then redis.call('HSET', KEYS[2], ARGV[1], 'drained') end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if drained then return 0 end
return 1
"""
MARKER_TTL_S = 24 * 3600.0


def marker_key(store: ArmStatsStore, route: str, arm: str) -> str:
    """The Redis key that says an arm was drained by the guardrail (same hash tag as the route)."""
    return store.stats_key(route).removesuffix(":arms") + f":guardrail:{arm}"


class GuardrailWatch:
    def __init__(self, store: ArmStatsStore, client: aredis.Redis, routes: Mapping[str, Route],
                 publish_alert: Callable[[JSONObject], None], interval_s: float = 5.0,
                 marker_ttl_s: float = MARKER_TTL_S, on_failure: Callable[[str], None] | None = None) -> None:
        """`on_failure(kind)` counts each failed check (banditgate.redis_errors kinds)."""
        if marker_ttl_s <= 0:
            raise ValueError(f"marker_ttl_s must be > 0, got {marker_ttl_s}")
        self.episodes = redis_errors.FailureEpisodes(log, "guardrail", on_failure)
        self.store = store
        self.client = client
        self.marker_ttl_ms = max(1, int(marker_ttl_s * 1000))
        self._drain = client.register_script(_DRAIN)
        self.routes = {name: route for name, route in routes.items()
                       if route.guardrail.enabled and route.policy in ("thompson", "fixed") and len(route.arms) > 1}
        self.publish_alert = publish_alert
        self.interval_s = interval_s

    async def check_once(self) -> list[JSONObject]:
        """One pass over every guarded route; returns the alerts it published."""
        if not self.routes:
            return []
        snapshots = await self.store.snapshots(self.routes)
        published = []
        for name, snapshot in snapshots.items():
            route = self.routes[name]
            for finding in evaluate(snapshot.arms, route.guardrail, reward=route.reward):
                if not await self.drain(name, finding.arm):
                    continue  # another replica drained it, or an operator had
                version = next((a.version for a in route.arms if a.name == finding.arm), None)
                alert = finding.alert_fields(name, time.time(), version if isinstance(version, int) else None)
                log.warning("guardrail: route %s arm %s drained (%s %.4f vs best arm %s %.4f, mSPRT log-LR %.1f >= %.1f)",
                            name, finding.arm, finding.metric, finding.value, finding.best_arm, finding.best_value,
                            finding.log_likelihood_ratio, finding.log_threshold)
                self.publish_alert(alert)
                published.append(alert)
        return published

    async def drain(self, route: str, arm: str) -> bool:
        """Drain `arm` and write its marker atomically; True when this call drained it."""
        drained = await self._drain(keys=[marker_key(self.store, route, arm), self.store.stats_key(route)],
                                    args=[f"{arm}:state", repr(time.time()), self.marker_ttl_ms])
        return int(drained) == 1

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
