"""The worker's quality-drift watch (no Redis, injected clock): a persisting rise of an arm's error
rate gives one `firing` alert however often its CUSUM alarms, the gauge shows the open episode,
and the quiet period closes it with one `resolved` alert; alerts are handed out by later calls."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import CollectorRegistry

from banditgate.drift.episodes import EpisodeBook
from banditgate.episode_store import Episodes
from feedback.join import Label, Served
from feedback.metrics import FeedbackMetrics
from feedback.outcome_metrics import PredictionView
from feedback.quality_drift_tracker import QualityDriftTracker
from feedback.quality_drift_watch import QualityDriftWatch

QUIET_S = 30.0


def labels(errors: np.ndarray) -> list[Label]:
    out = []
    for index, wrong in enumerate(errors):
        served = Served(arm="a", model="churn-gbm", model_version=3, view=PredictionView(score=0.8, predicted=1),
                        offset=index)
        out.append(Label(route="churn", request_id=f"r{index}", served=served, label=0 if wrong else 1, ts=0.0,
                         primary=None))
    return out


async def test_a_persisting_rise_alerts_once_then_resolves() -> None:
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    tracker = QualityDriftTracker(arl0=1000, reference_outcomes=500, threshold=lambda *args: 4.0)
    metrics = FeedbackMetrics(CollectorRegistry())
    watch = QualityDriftWatch(tracker, {"churn": "bernoulli"}, metrics, clock=clock,
                              episodes=Episodes("quality", EpisodeBook(QUIET_S), None, clock=clock, token_prefix="w:"))
    rng = np.random.default_rng(4)

    async def step(errors: np.ndarray) -> list:
        alerts = watch.observe(labels(errors))
        await asyncio.sleep(0)  # the claims and sweeps run as tasks; their alerts come out next call
        await asyncio.sleep(0)
        return alerts + watch.observe([])

    assert await step(rng.random(500) < 0.1) == []  # the reference window
    fired = []
    for _ in range(10):  # error rate 0.5 for 10 x 200 outcomes, one batch a second: many alarms
        now[0] += 1.0
        fired += await step(rng.random(200) < 0.5)
    assert tracker.states()[0].alarms_total > 3
    assert [(a.kind, a.state, a.metric, a.arm, a.details["model"], a.details["feature"]) for a in fired] == [
        ("quality", "firing", "label_error_rate", "a", "churn-gbm", None)]
    assert watch.pending_alarms["churn"] == 1 and watch.waiting
    assert alarm_gauge(metrics) == [1.0]  # the open episode
    now[0] += QUIET_S - 1
    assert await step(np.zeros(0, dtype=bool)) == []  # not quiet long enough
    now[0] += 1.0
    resolved = await step(np.zeros(0, dtype=bool))
    assert [(a.state, a.details["alarms"], a.details["episode"]) for a in resolved] == [
        ("resolved", tracker.states()[0].alarms_total, fired[0].details["episode"])]
    assert not watch.waiting and watch.pending_alarms["churn"] == 1 and alarm_gauge(metrics) == [0.0]


def alarm_gauge(metrics: FeedbackMetrics) -> list[float]:
    family = next(f for f in metrics.quality_drift.collect() if f.name == "banditgate_quality_drift_alarm")
    return [sample.value for sample in family.samples]
