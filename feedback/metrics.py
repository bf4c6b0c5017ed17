"""Every Prometheus metric of the feedback worker, defined once (counters, histograms, and the
collector that serves the latest quality snapshot as gauges). Names are listed in docs/feedback.md."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from feedback.join import Count

if TYPE_CHECKING:
    from feedback.quality_drift_tracker import SeriesState


class FeedbackMetrics:
    """Every Prometheus metric of the feedback worker, defined once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.outcomes = Counter("banditgate_feedback_outcomes_total",
                                "Outcomes by what the join made of them (joined, duplicate, late, orphan, invalid); "
                                "counted once per outcome across restarts (Redis-deduplicated)",
                                ["route", "result"], registry=registry)
        self.defaults = Counter("banditgate_feedback_defaults_applied_total",
                                "Predictions scored with the route's default_reward after reward_wait_s",
                                ["route"], registry=registry)
        self.unanswered = Counter("banditgate_feedback_predictions_unanswered_total",
                                  "Predictions that expired without an outcome (routes without a default)",
                                  ["route"], registry=registry)
        self.prediction_duplicates = Counter("banditgate_feedback_prediction_duplicates_total",
                                             "Predictions seen again with another offset (ignored)",
                                             ["route"], registry=registry)
        self.events = Counter("banditgate_feedback_events_total", "Events consumed, by source",
                              ["source"], registry=registry)
        self.dead_letters = Counter("banditgate_feedback_dead_letters_total",
                                    "Events sent to the dead-letter topic, by source and reason",
                                    ["source", "reason"], registry=registry)
        self.arm_updates = Counter("banditgate_feedback_arm_updates_total",
                                   "Arm statistic updates sent to Redis (applied, duplicate)",
                                   ["route", "result"], registry=registry)
        self.retries = Counter("banditgate_feedback_sink_retries_total",
                               "Failed writes that were retried (nothing acknowledged meanwhile)",
                               ["sink"], registry=registry)
        self.alerts = Counter("banditgate_feedback_alerts_total", "Alerts sent", ["route", "kind"],
                              registry=registry)
        self.batch_seconds = Histogram("banditgate_feedback_batch_seconds",
                                       "Time to join, apply and persist one batch of events",
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=registry)
        self.batch_events = Histogram("banditgate_feedback_batch_events", "Events per batch",
                                      buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 4000), registry=registry)
        self.join_entries = Gauge("banditgate_feedback_join_entries",
                                  "Requests held in this worker's join table (pending and recently joined)",
                                  registry=registry)
        self.join_bytes = Gauge("banditgate_feedback_join_bytes",
                                "Estimated size of this worker's join table (memory store: its Python objects; "
                                "rocksdb store: keys and values on disk before compression)", registry=registry)
        self.join_budget_bytes = Gauge("banditgate_feedback_join_budget_bytes",
                                       "feedback.join_max_bytes: the whole table's budget (a worker holds its "
                                       "partitions' share)", registry=registry)
        self.trace_spans_dropped = Counter("banditgate_feedback_trace_spans_dropped_total",
                                           "Per-event spans not made (rate_limited, batch_limited: over "
                                           "tracing.max_request_spans_per_s / _per_batch) or whose start or end "
                                           "raised (failed); only with tracing enabled", ["reason"], registry=registry)
        self.join_evictions = Counter("banditgate_feedback_join_evictions_total",
                                      "Join entries evicted because the table was over its budget, by what they held "
                                      "(settled, unanswered, default, orphan, shadow); counted once per evicted entry "
                                      "(Redis-deduplicated)", ["route", "reason"], registry=registry)
        self.webhook_deliveries = Counter("banditgate_feedback_webhook_deliveries_total",
                                          "Alerts for a route's webhook by result (delivered, failed after "
                                          "retries, dropped: queue full or stopping)",
                                          ["route", "result"], registry=registry)
        self.output_refusals = Counter("banditgate_feedback_output_refusals_total",
                                       "Dead letters and alerts the broker refused for good (too large, not "
                                       "authorized, invalid), dropped instead of retried forever",
                                       ["topic", "reason"], registry=registry)
        self.producer_replacements = Counter("banditgate_feedback_producer_replacements_total",
                                             "Producers replaced after a failure that breaks them (refused batch, "
                                             "broken sequence, fenced, closed)", registry=registry)
        self.redis_up = Gauge("banditgate_feedback_redis_up", "1 while Redis writes succeed", registry=registry)
        self.redis_errors = Counter("banditgate_feedback_redis_errors_total",
                                    "Redis errors the worker retried, by kind: transient (connection, READONLY, OOM, "
                                    "LOADING, BUSY...) or operator (NOPERM, authentication)",
                                    ["kind"], registry=registry)
        self.quality = QualityCollector()
        registry.register(self.quality)
        self.interleave = InterleaveCollector()
        registry.register(self.interleave)
        self.quality_drift = QualityDriftCollector()
        registry.register(self.quality_drift)

    def count_all(self, effects: Iterable[Count]) -> None:
        """Count effects that the ledger applied, one counter increment per route and kind."""
        totals: dict[tuple[str, str], int] = {}
        for effect in effects:
            # an eviction's reason is in its token (evicted:<reason>:<offset>)
            key = (effect.route, effect.token.rsplit(":", 1)[0] if effect.kind == "evicted" else effect.kind)
            totals[key] = totals.get(key, 0) + 1
        for (route, kind), amount in totals.items():
            if kind.startswith("evicted:"):
                self.join_evictions.labels(route, kind[8:]).inc(amount)
            elif kind == "default":
                self.defaults.labels(route).inc(amount)
            elif kind == "unanswered":
                self.unanswered.labels(route).inc(amount)
            elif kind == "prediction_duplicate":
                self.prediction_duplicates.labels(route).inc(amount)
            else:
                self.outcomes.labels(route, kind).inc(amount)

    def count(self, effect: Count) -> None:
        """A Count effect that the ledger applied (first time for its token)."""
        if effect.kind == "evicted":
            self.join_evictions.labels(effect.route, effect.token.split(":", 2)[1]).inc()
        elif effect.kind == "default":
            self.defaults.labels(effect.route).inc()
        elif effect.kind == "unanswered":
            self.unanswered.labels(effect.route).inc()
        elif effect.kind == "prediction_duplicate":
            self.prediction_duplicates.labels(effect.route).inc()
        else:
            self.outcomes.labels(effect.route, effect.kind).inc()


_QUALITY_GAUGES = {
    "accuracy": ("banditgate_quality_accuracy_ratio", "Share of labelled predictions that were right"),
    "precision": ("banditgate_quality_precision_ratio", "Precision on binary labels (positive class 1)"),
    "recall": ("banditgate_quality_recall_ratio", "Recall on binary labels (positive class 1)"),
    "f1": ("banditgate_quality_f1_ratio", "F1 on binary labels (positive class 1)"),
    "log_loss": ("banditgate_quality_log_loss", "Mean log loss of the predicted probability"),
    "brier": ("banditgate_quality_brier_score", "Mean Brier score of the predicted probability"),
    "mae": ("banditgate_quality_mae", "Mean absolute error (regressors, label units)"),
    "rmse": ("banditgate_quality_rmse", "Root mean squared error (regressors, label units)"),
    "agreement": ("banditgate_quality_agreement_ratio", "Share of requests where a shadow's label equals the primary's"),
    "labelled": ("banditgate_quality_labelled_outcomes", "Labelled outcomes in the window"),
    "reward_mean": ("banditgate_quality_reward_mean", "Mean reward in the window"),
    "reward_low": ("banditgate_quality_reward_mean_lower", "Lower bound of the mean reward's confidence interval"),
    "reward_high": ("banditgate_quality_reward_mean_upper", "Upper bound of the mean reward's confidence interval"),
    "rewards": ("banditgate_quality_rewards", "Rewards in the window"),
    "advantage": ("banditgate_quality_shadow_advantage", "All-time mean loss(primary) - loss(shadow) on paired labels"),
    "advantage_low": ("banditgate_quality_shadow_advantage_lower", "Lower bound of the always-valid confidence sequence"),
    "advantage_high": ("banditgate_quality_shadow_advantage_upper", "Upper bound of the always-valid confidence sequence"),
    "pairs": ("banditgate_quality_shadow_pairs", "All-time paired labelled requests (shadow and primary)"),
}
_LABELS = ["route", "arm", "model", "version", "role"]


class QualityCollector:
    """Prometheus collector serving the latest quality snapshot (no stale label sets linger)."""

    def __init__(self) -> None:
        self._rows: list[tuple[tuple[str, ...], Mapping[str, float]]] = []

    def update(self, rows: list[tuple[tuple[str, ...], Mapping[str, float]]]) -> None:
        self._rows = rows

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {key: GaugeMetricFamily(name, text, labels=_LABELS) for key, (name, text) in _QUALITY_GAUGES.items()}
        for labels, values in self._rows:
            for key, value in values.items():
                family = families.get(key)
                if family is not None:
                    family.add_metric(list(labels), float(value))
        return list(families.values())

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text, labels=_LABELS) for name, text in _QUALITY_GAUGES.values()]


_PAIR_GAUGES = {
    "wins": ("banditgate_interleave_pair_wins",
             "Impressions where arm_a's team got more clicks than arm_b's (all time, every worker)"),
    "losses": ("banditgate_interleave_pair_losses", "Impressions where arm_a's team got fewer clicks than arm_b's"),
    "ties": ("banditgate_interleave_pair_ties", "Impressions where both teams got as many clicks (none included)"),
    "log_evidence": ("banditgate_interleave_pair_log_evidence",
                     "ln M of the always-valid preference test, arm_a against arm_b (mixture SPRT)"),
    "threshold": ("banditgate_interleave_pair_evidence_threshold",
                  "ln M at which the pair is decided: ln(pairs / (1 - promote_confidence))"),
}
_PAIR_LABELS = ["route", "arm_a", "arm_b"]
_VERDICT = ("banditgate_interleave_verdict", "Interleaving verdict per ranker: 1 promote, -1 reject, 0 undecided")


class InterleaveCollector:
    """Prometheus collector serving the latest interleaving snapshot (pair counts and the test)."""

    def __init__(self) -> None:
        self._pairs: Sequence[tuple[tuple[str, str, str], Mapping[str, float]]] = []
        self._verdicts: Sequence[tuple[tuple[str, str], float]] = []

    def update(self, pairs: Sequence[tuple[tuple[str, str, str], Mapping[str, float]]],
               verdicts: Sequence[tuple[tuple[str, str], float]]) -> None:
        """`pairs`: ((route, arm_a, arm_b), values by key of _PAIR_GAUGES); `verdicts`: ((route, arm), value)."""
        self._pairs, self._verdicts = pairs, verdicts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {key: GaugeMetricFamily(name, text, labels=_PAIR_LABELS) for key, (name, text) in _PAIR_GAUGES.items()}
        for labels, values in self._pairs:
            for key, value in values.items():
                families[key].add_metric(list(labels), float(value))
        verdict = GaugeMetricFamily(*_VERDICT, labels=["route", "arm"])
        for arm_labels, value in self._verdicts:
            verdict.add_metric(list(arm_labels), float(value))
        return [*families.values(), verdict]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [*(GaugeMetricFamily(name, text, labels=_PAIR_LABELS) for name, text in _PAIR_GAUGES.values()),
                GaugeMetricFamily(*_VERDICT, labels=["route", "arm"])]


_DRIFT_GAUGES = {
    "statistic": ("banditgate_quality_drift_statistic", "Quality-drift CUSUM statistic of the error stream"),
    "threshold": ("banditgate_quality_drift_threshold", "Quality-drift CUSUM threshold (calibrated to the ARL0)"),
    "alarm": ("banditgate_quality_drift_alarm", "1 during a quality-drift alarm episode, else 0"),
    "p0": ("banditgate_quality_drift_reference_error_rate", "In-control error rate learned from the reference window"),
    "alarms": ("banditgate_quality_drift_alarms", "Quality-drift CUSUM crossings in this process (episodes alert once)"),
    "outcomes": ("banditgate_quality_drift_outcomes", "Outcomes this process fed to the series (reference included)"),
}
_DRIFT_LABELS = ["route", "arm", "model", "version", "role", "signal"]


class QualityDriftCollector:
    """Prometheus collector serving the quality-drift series' latest state (one snapshot per batch)."""

    def __init__(self) -> None:
        self._states: list[SeriesState] = []

    def update(self, states: list[SeriesState]) -> None:
        """`states`: feedback.quality_drift_tracker.SeriesState rows (replaced as a whole)."""
        self._states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {key: GaugeMetricFamily(name, text, labels=_DRIFT_LABELS) for key, (name, text) in _DRIFT_GAUGES.items()}
        for state in self._states:
            key = state.key
            labels = [key.route, key.arm, key.model, str(key.version), key.role, key.signal]
            families["alarm"].add_metric(labels, 1.0 if state.in_alarm else 0.0)
            families["alarms"].add_metric(labels, float(state.alarms_total))
            families["outcomes"].add_metric(labels, float(state.outcomes))
            for name, value in (("statistic", state.statistic), ("threshold", state.threshold), ("p0", state.p0)):
                if value is not None:
                    families[name].add_metric(labels, float(value))
        return list(families.values())

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text, labels=_DRIFT_LABELS) for name, text in _DRIFT_GAUGES.values()]
