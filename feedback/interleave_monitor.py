"""Interleave routes: read the pair counts every worker added to Redis, serve them and the
sequential test as gauges, and send a promote or reject alert once per verdict.

The counts are all-time sums over every worker (``P:{R}:fb:pairs``, written through the ledger,
see feedback/ledger.py), so any worker may run the test; an alert is marked in
``P:{R}:fb:alerted`` (field ``interleave|<kind>|<arm>``) after it is sent, so it is sent once, or
(rarely, when two workers decide in the same refresh or a worker dies between the two steps)
twice — as the shadow promote/reject alerts. The verdict is the test's first crossing; to start a
new experiment on the same route (a ranker's model changed), delete the route's pair hash and
those alert marks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import orjson

from banditgate.config import Route
from banditgate.events import Alert
from banditgate.jsontypes import JSONObject
from feedback.ledger import FeedbackKeys
from feedback.metrics import FeedbackMetrics
from feedback.pairs import RouteVerdicts, parse_pairs, route_verdicts
from feedback.sinks import KafkaOut
from router.preference import PreferenceTest

if TYPE_CHECKING:
    from redis import asyncio as aredis

log = logging.getLogger("banditgate.feedback.interleave")

_VERDICT_VALUE = {"promote": 1.0, "reject": -1.0, "undecided": 0.0}
TEST_NAME = ("mixture sequential probability ratio test on non-tied impressions (Robbins 1970; Johari et al. "
             "2017), Beta(a, a) mixture, Bonferroni over pairs; valid under continuous monitoring (Ville)")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


class InterleaveMonitor:
    """Refreshes the interleaving gauges and sends promote/reject alerts (see the module docstring)."""

    def __init__(self, client: aredis.Redis, keys: FeedbackKeys, routes: Sequence[Route], confidence: float, out: KafkaOut,
                 metrics: FeedbackMetrics, prior_strength: float = 100.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._keys = keys
        self._routes = [route for route in routes if route.policy == "interleave"]
        self._test = PreferenceTest(confidence=confidence, prior_strength=prior_strength)
        self._out = out
        self._metrics = metrics
        self._clock = clock

    async def refresh(self) -> list[Alert]:
        """One refresh (one pipelined read); returns the alerts sent. Raises RedisError / KafkaError."""
        if not self._routes:
            return []
        pipe = self._client.pipeline(transaction=False)
        for route in self._routes:
            pipe.hgetall(self._keys.pairs(route.name))
            pipe.hgetall(self._keys.alerted(route.name))
        replies = await pipe.execute()
        now = self._clock()
        pair_rows: list[tuple[tuple[str, str, str], dict[str, float]]] = []
        verdict_rows: list[tuple[tuple[str, str], float]] = []
        alerts: list[Alert] = []
        for position, route in enumerate(self._routes):
            verdicts = route_verdicts([arm.name for arm in route.arms], parse_pairs(replies[2 * position]), self._test)
            alerted = {_text(name) for name in replies[2 * position + 1]}
            for (a, b), (counts, evidence, _decision) in verdicts.pairs.items():
                pair_rows.append(((route.name, a, b), {"wins": counts.wins, "losses": counts.losses,
                                                       "ties": counts.ties, "log_evidence": evidence,
                                                       "threshold": verdicts.threshold}))
            for arm, verdict in verdicts.arms.items():
                verdict_rows.append(((route.name, arm), _VERDICT_VALUE[verdict]))
                if verdict != "undecided" and f"interleave|{verdict}|{arm}" not in alerted:
                    alerts.append(self._alert(route, arm, verdict, verdicts, now))
        self._metrics.interleave.update(pair_rows, verdict_rows)
        if alerts:
            await self._out.send_all([self._out.alert(alert) for alert in alerts])
            pipe = self._client.pipeline(transaction=False)
            for alert in alerts:
                pipe.hset(self._keys.alerted(alert.route), f"interleave|{alert.kind}|{alert.arm}",
                          orjson.dumps(alert.to_dict()))
                self._metrics.alerts.labels(alert.route, alert.kind).inc()
            await pipe.execute()
            for alert in alerts:
                log.warning("%s alert: route %s ranker %s by interleaving: ln M %.2f against threshold %.2f (%s)",
                            alert.kind, alert.route, alert.arm, alert.value, alert.threshold,
                            ", ".join(f"{other}: {vs['wins']}-{vs['losses']}-{vs['ties']}"
                                      for other, vs in alert.details["against"].items()))
        return alerts

    def _alert(self, route: Route, arm: str, verdict: str, verdicts: RouteVerdicts, now: float) -> Alert:
        """`value` is the decisive evidence: for promote the weakest of the arm's wins over every
        other ranker, for reject the strongest evidence that another ranker beats it."""
        against: dict[str, JSONObject] = {}
        decisive: list[float] = []
        for (a, b), (counts, evidence, decision) in verdicts.pairs.items():
            if arm not in (a, b):
                continue
            mine = arm == a
            other = b if mine else a
            preferred = decision if mine else -decision  # +1: this arm preferred over the other
            against[other] = {"wins": counts.wins if mine else counts.losses,
                              "losses": counts.losses if mine else counts.wins, "ties": counts.ties,
                              "log_evidence": evidence, "preferred": preferred}
            if verdict == "promote" or preferred < 0:
                decisive.append(evidence)
        value = min(decisive) if verdict == "promote" else max(decisive)
        config_arm = next((a for a in route.arms if a.name == arm), None)
        version = config_arm.version if config_arm is not None else None
        return Alert(kind=verdict, route=route.name, arm=arm, model_version=version if isinstance(version, int) else None,
                     metric="interleave_log_evidence", value=value, threshold=verdicts.threshold, ts=now,
                     details={"model": config_arm.model if config_arm is not None else None, "against": against,
                              "confidence": self._test.confidence, "prior_strength": self._test.prior_strength,
                              "test": TEST_NAME})


__all__ = ["InterleaveMonitor"]
