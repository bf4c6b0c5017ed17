"""Reads banditgate's own view of the run: arm statistics and the feedback ledger in Redis, the
gateway's /metrics (traffic shares, drift statistics and thresholds).

Nothing here computes what banditgate should have computed: posteriors come from the arm
statistics the feedback worker wrote, shadow quality from its ledger, drift from the gateway's
gauges (and alarms from the alerts topic, read by the product service).
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from demo.deployment import Plan
from demo.models import ROUTE
from demo.telemetry import Sample, Telemetry, beta_posterior

try:
    from feedback.ledger import FeedbackKeys
    from feedback.outcome_metrics import QualityStats
    from feedback.sinks import parse_quality
except ImportError:  # pragma: no cover - the feedback worker's ledger is optional for the view
    FeedbackKeys = None  # type: ignore[assignment,misc]
    parse_quality = None  # type: ignore[assignment]

ALL_PRIMARIES = ("primary", "*", "*", "*")
"""Quality key of every primary arm's statistics pooled (sums added, then the metrics)."""


BATCH_HISTOGRAMS = ("banditgate_queue_seconds", "banditgate_inference_seconds", "banditgate_batch_size_rows")


def parse_metrics(text: str, into: Sample | None = None) -> tuple[dict[str, float], dict[tuple[str, str, str], tuple[float, float]]]:
    """Traffic share per arm of the demo route, and (model, version, feature) -> (statistic,
    threshold) of the drift gauges, from a Prometheus text exposition. With `into`, also its
    drift alarm counters and the per-batch histograms' sums and counts (all model versions)."""
    shares: dict[str, float] = {}
    statistic: dict[tuple[str, str, str], float] = {}
    threshold: dict[tuple[str, str, str], float] = {}
    alarms: dict[tuple[str, str, str], float] = {}
    batches: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "banditgate_arm_traffic_share" and labels.get("route") == ROUTE:
                shares[labels["arm"]] = sample.value
            elif sample.name in ("banditgate_drift_statistic", "banditgate_drift_threshold",
                                 "banditgate_drift_alarms_total"):
                key = (labels.get("model", ""), labels.get("version", ""), labels.get("feature", ""))
                target = {"banditgate_drift_statistic": statistic, "banditgate_drift_threshold": threshold,
                          "banditgate_drift_alarms_total": alarms}[sample.name]
                target[key] = sample.value
            elif sample.name.endswith(("_sum", "_count")) and sample.name.rsplit("_", 1)[0] in BATCH_HISTOGRAMS:
                name, part = sample.name.rsplit("_", 1)
                totals = batches.setdefault(name, [0.0, 0.0])
                totals[0 if part == "sum" else 1] += sample.value
    drift = {key: (value, threshold.get(key, float("nan"))) for key, value in statistic.items()}
    if into is not None:
        into.drift_alarms = alarms
        into.batches = {name: (total, count) for name, (total, count) in batches.items()}
    return shares, drift


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # nosec B310: http URL of our own loopback port
            return response.read().decode()
    except (OSError, urllib.error.URLError):
        return None


class Observer:
    """Takes a Sample every `interval_s` into the telemetry. Use start() / stop()."""

    def __init__(self, plan: Plan, telemetry: Telemetry, interval_s: float = 0.5) -> None:
        self.plan = plan
        self.telemetry = telemetry
        self.interval_s = interval_s
        self._client: Any = None
        self._store: Any = None
        self._task: asyncio.Task[None] | None = None
        self.errors = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        import redis.asyncio as aredis

        from router.stats_store import ArmStatsStore

        self._client = aredis.Redis.from_url(self.plan.redis, socket_timeout=2, socket_connect_timeout=2)
        self._store = ArmStatsStore(self._client, prefix=self.plan.redis_prefix)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="demo-observe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            try:
                self.telemetry.add_sample(await self.sample())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a missed sample is shown, never fatal
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(self.interval_s)

    async def sample(self) -> Sample:
        """One look at Redis and the gateway's /metrics."""
        sample = Sample(t_s=self.telemetry.now_s())
        snapshot = await self._store.snapshot(ROUTE)
        sample.outcome_counter = snapshot.outcome_count
        for arm, state in snapshot.arms.items():
            sample.posteriors[arm] = beta_posterior(state.stats.weight, state.stats.mean, state.state)
        if FeedbackKeys is not None and parse_quality is not None:
            keys = FeedbackKeys(self.plan.redis_prefix)
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(keys.counts(ROUTE))
            pipe.hgetall(keys.quality(ROUTE))
            counts, quality = await pipe.execute()
            sample.ledger_counts = {_text(k): float(_text(v)) for k, v in counts.items()}
            parsed = parse_quality(quality)
            sample.quality = {key: stats.metrics() for key, stats in parsed.items()}
            primaries = [stats for key, stats in parsed.items() if key[0] == "primary"]
            if primaries:
                sample.quality[ALL_PRIMARIES] = sum(primaries, QualityStats()).metrics()
        text = await asyncio.to_thread(_fetch, f"{self.plan.gateway_url}/metrics")
        if text is not None:
            sample.policy_shares, sample.drift = parse_metrics(text, into=sample)
        return sample

    async def final_accounting(self) -> Sample:
        """A last sample, taken after everything was drained (what the checks compare)."""
        return await self.sample()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
