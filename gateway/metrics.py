"""Every gateway metric, defined once (Prometheus naming: banditgate_ prefix, base units, _total).

Histograms that see every request are observed per batch with numpy (`BulkHistogram`), so the
hot path pays one call per batch, not one per request. Labels are bounded: route, arm, model,
version, reason, transport, topic — never request ids.
"""

from __future__ import annotations

import contextlib
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# seconds; chosen around the measured latencies (sub-millisecond inference, ms-scale end to end)
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class BulkHistogram(Collector):
    """A Prometheus histogram that takes whole arrays of observations at once."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry | None = REGISTRY) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.edges = np.asarray(buckets, dtype=float)
        self._edge_list = [float(b) for b in buckets]
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: np.ndarray | Iterable[float], *labels: str) -> None:
        """Add every value of `values` under the label values `labels` (in labelnames order)."""
        array = np.asarray(values, dtype=float).ravel()
        if array.size == 0:
            return
        # bucket i counts values <= edges[i]; the last slot is +Inf
        per_bucket = np.bincount(np.searchsorted(self.edges, array, side="left"), minlength=len(self.edges) + 1)
        with self._lock:
            if labels not in self._counts:
                self._counts[labels] = np.zeros(len(self.edges) + 1, dtype=np.int64)
                self._sums[labels] = 0.0
            self._counts[labels] += per_bucket
            self._sums[labels] += float(array.sum())

    def observe(self, value: float, *labels: str) -> None:
        """One value (no numpy: a batch of one row is common on the sidecar path)."""
        index = bisect_left(self._edge_list, value)  # same bucket as searchsorted(side="left")
        with self._lock:
            counts = self._counts.get(labels)
            if counts is None:
                counts = self._counts[labels] = np.zeros(len(self.edges) + 1, dtype=np.int64)
                self._sums[labels] = 0.0
            counts[index] += 1
            self._sums[labels] += float(value)

    def remove(self, *labels: str) -> None:
        """Forget one label set (a model version that was unloaded); absent is fine."""
        with self._lock:
            self._counts.pop(labels, None)
            self._sums.pop(labels, None)

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            items = [(k, v.copy(), self._sums[k]) for k, v in self._counts.items()]
        for labels, counts, total in items:
            cumulative = np.cumsum(counts)
            buckets = [(_le(edge), float(c)) for edge, c in zip(self.edges, cumulative[:-1])]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(labels), buckets, total)
        yield family


def _le(edge: float) -> str:
    return repr(float(edge)) if edge != int(edge) else f"{edge:.1f}"


class GatewayMetrics:
    """The gateway's metrics, registered in `registry` (the default one unless tests pass their own)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.requests = Counter("banditgate_requests_total", "Requests answered or failed, by route, arm and status.",
                                ["route", "arm", "status", "transport"], registry=registry)
        self.errors = Counter("banditgate_request_errors_total", "Requests that could not be answered, by reason.",
                              ["route", "reason", "transport"], registry=registry)
        self.shadow_predictions = Counter("banditgate_shadow_predictions_total",
                                          "Shadow predictions published, by route and shadow arm.",
                                          ["route", "arm"], registry=registry)
        self.deadletters = Counter("banditgate_deadletters_total", "Events sent to the dead-letter topic, by reason.",
                                   ["topic", "reason"], registry=registry)
        self.batch_rows = BulkHistogram("banditgate_batch_size_rows", "Rows per ONNX Runtime call.",
                                        ["model", "version"], BATCH_BUCKETS_ROWS, registry)
        self.queue_seconds = BulkHistogram("banditgate_queue_seconds", "Time a batch's oldest row waited in the queue.",
                                           ["model", "version"], LATENCY_BUCKETS_S, registry)
        self.inference_seconds = BulkHistogram("banditgate_inference_seconds", "ONNX Runtime time per batch.",
                                               ["model", "version"], LATENCY_BUCKETS_S, registry)
        self.end_to_end_seconds = BulkHistogram("banditgate_end_to_end_seconds",
                                                "From receiving a request to its prediction being built.",
                                                ["route", "transport"], LATENCY_BUCKETS_S, registry)
        self.queue_depth = Gauge("banditgate_queue_depth_rows", "Rows queued or being inferred, per model version.",
                                 ["model", "version"], registry=registry)
        self.model_circuit_state = Gauge("banditgate_model_circuit_state",
                                         "0 available, 1 being probed, 2 unavailable (a batch outlived the "
                                         "inference timeout), per model version.", ["model", "version"],
                                         registry=registry)
        self.model_threads = Gauge("banditgate_model_threads",
                                   "Inference pool threads running a model version's batches now (a hung run "
                                   "counts until it ends).", ["model", "version"], registry=registry)
        self.inference_timeouts = Counter("banditgate_inference_timeouts_total",
                                          "Batches and probes that outlived models.inference_timeout_s.",
                                          ["model", "version"], registry=registry)
        self.consumer_lag = Gauge("banditgate_consumer_lag_messages", "Requests not yet consumed, per partition.",
                                  ["topic", "partition"], registry=registry)
        self.model_loaded = Gauge("banditgate_model_loaded", "1 while a model version is loaded and serving.",
                                  ["model", "version"], registry=registry)
        self.model_load_failures = Counter("banditgate_model_load_failures_total",
                                           "Model versions that failed to load (bad file, checksum, config).",
                                           ["model"], registry=registry)
        self.redis_up = Gauge("banditgate_redis_up", "1 if the last arm-statistics snapshot read from Redis worked.",
                              registry=registry)
        self.redis_errors = Counter("banditgate_redis_errors_total",
                                    "Failed Redis calls of the gateway's background writers (call_counts, guardrail), "
                                    "by kind: transient, operator, refused, bug (banditgate.redis_errors).",
                                    ["writer", "kind"], registry=registry)
        self.arm_stats_unusable = Gauge("banditgate_arm_stats_unusable",
                                        "Arms whose statistics in Redis are not numbers (drained in this gateway's "
                                        "view until fixed).", ["route"], registry=registry)
        self.kafka_up = Gauge("banditgate_kafka_up", "1 while the Kafka consumer and producer are connected.",
                              registry=registry)
        self.ready = Gauge("banditgate_ready", "1 while the gateway reports ready.", registry=registry)
        self.paused = Counter("banditgate_backpressure_pauses_total",
                              "Times the Kafka loop paused fetching because queues were full.", registry=registry)
        self.arm_share = Gauge("banditgate_arm_traffic_share", "Probability the route's policy gives each arm now.",
                               ["route", "arm"], registry=registry)
        self.arm_policy_share = Gauge("banditgate_arm_policy_share",
                                      "Share the route's policy alone would give each arm (before the exploration "
                                      "floor, max_share caps and drains).", ["route", "arm"], registry=registry)
        self.arm_posterior_mean = Gauge("banditgate_arm_posterior_mean",
                                        "Posterior mean of the arm's reward (Thompson routes), reward units.",
                                        ["route", "arm"], registry=registry)
        self.arm_posterior_lower = Gauge("banditgate_arm_posterior_lower",
                                         "Lower end of the arm's 95% posterior interval of the mean reward "
                                         "(mean - 1.96 posterior scale, clipped to the reward's support).",
                                         ["route", "arm"], registry=registry)
        self.arm_posterior_upper = Gauge("banditgate_arm_posterior_upper",
                                         "Upper end of the arm's 95% posterior interval of the mean reward.",
                                         ["route", "arm"], registry=registry)
        self.arm_drained = Gauge("banditgate_arm_drained",
                                 "1 while the arm is drained (by the guardrail or an admin): it gets only the "
                                 "exploration floor.", ["route", "arm"], registry=registry)
        self.arm_info = Gauge("banditgate_arm_info",
                              "1 per arm and the model version serving it now (role primary or shadow).",
                              ["route", "arm", "role", "model", "version"], registry=registry)

        self.drift_statistic = Gauge("banditgate_drift_statistic",
                                     "Sequential drift statistic per model version and feature (alarm above threshold).",
                                     ["model", "version", "feature"], registry=registry)
        self.drift_threshold = Gauge("banditgate_drift_threshold",
                                     "Alarm threshold of the drift statistic, calibrated to the configured ARL0.",
                                     ["model", "version", "feature"], registry=registry)
        self.drift_alarms = Counter("banditgate_drift_alarms_total", "Drift alarms raised, per model version and feature.",
                                    ["model", "version", "feature"], registry=registry)
        self.drift_episodes_open = Gauge("banditgate_drift_episodes_open",
                                         "Drift alarm episodes open in this replica (one alert each), per model "
                                         "version and feature (score: the prediction score).",
                                         ["model", "version", "feature"], registry=registry)
        self.drift_skipped = Counter("banditgate_drift_batches_skipped_total",
                                     "Served batches the drift monitors skipped because they were behind.",
                                     ["model", "version"], registry=registry)
        self.output_refusals = Counter("banditgate_output_refusals_total",
                                       "Outputs the broker refuses for good (too large for the topic, invalid, not "
                                       "authorized), found before sending or by the broker; their requests are "
                                       "dead-lettered.", ["topic", "reason"], registry=registry)
        self.deadletter_failures = Counter("banditgate_deadletter_failures_total",
                                           "Dead letters that could not be written (refused for good); the event is "
                                           "dropped, counted here and logged once per topic.", ["topic", "reason"],
                                           registry=registry)
        self.replies_skipped = Counter("banditgate_replies_skipped_total",
                                       "Predictions not also sent to a request's reply topic (it is unknown to the "
                                       "broker, or refused for good); the predictions topic has them.", ["reason"],
                                       registry=registry)
        self.sidecar_dropped = Counter("banditgate_sidecar_events_dropped_total",
                                       "Sidecar (REST/gRPC) prediction, shadow and alert events not published: "
                                       "queue full while Kafka was away, or refused for good.", ["topic", "reason"],
                                       registry=registry)
        self.trace_spans_dropped = Counter("banditgate_trace_spans_dropped_total",
                                           "Per-request spans not made (rate_limited, batch_limited: over "
                                           "tracing.max_request_spans_per_s / _per_batch) or whose start or end "
                                           "raised (failed); only with tracing enabled.", ["reason"], registry=registry)
        self.producer_replacements = Counter("banditgate_producer_replacements_total",
                                             "Times the shared idempotent producer was replaced after a failed "
                                             "publication (a new producer id).", registry=registry)
        self.transaction_failures = Counter("banditgate_transaction_failures_total",
                                            "Exactly-once transactions that failed and were redone from the committed "
                                            "offset with a new transactional producer, by cause (failed, fenced, "
                                            "refused).", ["reason"], registry=registry)

        # the admission gate's figures (gateway/admission.py), per model version measured: the
        # candidate and the incumbent it was compared with; every replica exports the stored ones
        admission = ["route", "model", "version"]
        self.admission_latency_p50 = Gauge("banditgate_admission_latency_p50_seconds",
                                           "Admission benchmark: median time per run (CPU time), at batch 1 or "
                                           "at the max batch.", [*admission, "batch"], registry=registry)
        self.admission_latency_p99 = Gauge("banditgate_admission_latency_p99_seconds",
                                           "Admission benchmark: p99 time per run (CPU time), at batch 1 or at "
                                           "the max batch.", [*admission, "batch"], registry=registry)
        self.admission_throughput = Gauge("banditgate_admission_throughput_rows_per_second",
                                          "Admission benchmark: rows per second at the max batch.", admission,
                                          registry=registry)
        self.admission_memory = Gauge("banditgate_admission_memory_bytes",
                                      "Admission benchmark: resident memory added by loading the model version "
                                      "(session and a max-batch warm-up).", admission, registry=registry)
        self.admission_file = Gauge("banditgate_admission_file_bytes", "Admission benchmark: model file size.",
                                    admission, registry=registry)
        self.admission_admitted = Gauge("banditgate_admission_admitted",
                                        "Admission verdict of a new model version: 1 admitted, 0 refused.",
                                        admission, registry=registry)
        self.admission_retries = Counter("banditgate_admission_retries_total",
                                         "Admission benchmark runs that gave no verdict (not the candidate's "
                                         "fault) and are tried again, by route and reason (timeout, "
                                         "infrastructure).", ["route", "reason"], registry=registry)

    def export_admission(self, route: str, model: str, version: int, incumbent_model: str,
                         incumbent_version: object, result: dict[str, object]) -> None:
        """Set the admission gauges from a stored result (router.rollout_admission.AdmissionResult)."""
        self.admission_admitted.labels(route, model, str(version)).set(1.0 if result.get("admitted") else 0.0)
        for figures, (m, v) in ((result.get("candidate"), (model, version)),
                                (result.get("incumbent"), (incumbent_model, incumbent_version))):
            if not isinstance(figures, dict):
                continue
            labels = (route, m, str(v))
            with contextlib.suppress(TypeError, ValueError, KeyError):
                for batch, p50, p99 in (("1", "p50_ms", "p99_ms"), ("max", "batch_p50_ms", "batch_p99_ms")):
                    self.admission_latency_p50.labels(*labels, batch).set(float(figures[p50]) / 1000.0)
                    self.admission_latency_p99.labels(*labels, batch).set(float(figures[p99]) / 1000.0)
                self.admission_throughput.labels(*labels).set(float(figures["rows_per_s"]))
                self.admission_memory.labels(*labels).set(float(figures["memory_mb"]) * 2**20)
                self.admission_file.labels(*labels).set(float(figures["size_mb"]) * 2**20)
        checks = result.get("checks")
        if not isinstance(result.get("candidate"), dict) and isinstance(checks, list):
            # refused on its file size alone (nothing loaded): the size is the one figure there is
            for check in checks:
                if isinstance(check, dict) and check.get("name") == "size":
                    with contextlib.suppress(TypeError, ValueError):
                        self.admission_file.labels(route, model, str(version)).set(float(check["value"]) * 2**20)

    def forget_version(self, model_name: str, version: str) -> None:
        """Remove the series of one model version that was unloaded: loaded, batch histograms, circuit,
        threads and timeouts, and drift series without a feature label (the drift watch removes those
        with one)."""
        for histogram in (self.batch_rows, self.queue_seconds, self.inference_seconds):
            histogram.remove(model_name, version)
        for gauge in (self.model_loaded, self.queue_depth, self.drift_skipped, self.model_circuit_state,
                      self.model_threads, self.inference_timeouts):
            with contextlib.suppress(KeyError):
                gauge.remove(model_name, version)

    def observe_batch(self, model_name: str, version: int, rows: int, queue_s: float, inference_s: float) -> None:
        labels = (model_name, str(version))
        self.batch_rows.observe(rows, *labels)
        self.queue_seconds.observe(queue_s, *labels)
        self.inference_seconds.observe(inference_s, *labels)
