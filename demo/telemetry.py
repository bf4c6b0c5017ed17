"""Everything the demo saw, kept in one place for the live view, the checks and the report (pure).

Times are scenario seconds (monotonic, 0 at the first scenario request; warm-up requests are
negative). Requests are bucketed by the second they were sent in, so "traffic share at t" is
what the bandit decided for the requests of that second.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    row: int
    """Index of the held-out pool row the request carries."""
    shifted: bool
    label: int
    """Ground truth (1 = malignant)."""
    sent_s: float
    warmup: bool = False
    sent_wall: float = 0.0
    """Epoch seconds just before the request went to the producer (the `ts` it carries)."""


@dataclass(slots=True)
class PredictionRecord:
    arm: str
    model: str
    version: int
    label: int | None
    latency_ms: float
    received_s: float
    propensity: float


@dataclass(frozen=True, slots=True)
class ArmPosterior:
    """Beta posterior of an arm's success rate from the (discounted) Redis statistics."""

    weight: float
    mean_reward: float
    posterior_mean: float
    low: float
    high: float
    state: str = "active"


@dataclass
class Sample:
    """One look at the system's own state (Redis, /metrics), taken every few hundred ms."""

    t_s: float
    posteriors: dict[str, ArmPosterior] = field(default_factory=dict)
    policy_shares: dict[str, float] = field(default_factory=dict)
    """The gateway's banditgate_arm_traffic_share gauge."""
    outcome_counter: int | None = None
    """The arm statistics' outcome counter in Redis (exact count of applied outcomes)."""
    ledger_counts: dict[str, float] = field(default_factory=dict)
    """The feedback worker's ledger of counts (joined, duplicate, orphan, joined|<arm> ...)."""
    quality: dict[tuple[str, str, str, str], dict[str, float]] = field(default_factory=dict)
    """(role, arm, model, version) -> quality metrics computed by banditgate from the ledger."""
    drift: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)
    """(model, version, feature) -> (statistic, threshold) from the gateway's /metrics."""
    drift_alarms: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(model, version, feature) -> threshold crossings so far (banditgate_drift_alarms_total)."""
    batches: dict[str, tuple[float, float]] = field(default_factory=dict)
    """The gateway's per-batch histograms (queue_seconds, inference_seconds, batch_size_rows):
    name -> (sum, count) over every model version."""


STAGES = ("kafka_in", "gateway", "kafka_out")
"""Where a request's end-to-end time goes: the service's send to the gateway's receipt (producer,
broker, the gateway's fetch), the gateway (queue wait, batching delay, inference, routing,
encoding), the prediction built to the service reading it (the gateway's producer, broker, the
service's fetch)."""


@dataclass(frozen=True)
class EpisodeRow:
    """One drift or quality alarm episode as the alerts topic showed it."""

    kind: str
    route: str | None
    arm: str | None
    model: str | None
    version: int | None
    metric: str | None
    feature: str | None
    opened_s: float
    resolved_s: float | None
    alarms: int | None
    """Alarms inside the episode (from its resolved alert); None while it is open."""
    firing_alerts: int
    """`firing` alerts seen for this key (1 when every episode alerted once)."""


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values`, None when empty."""
    array = np.fromiter(values, dtype=float)
    return float(np.percentile(array, q)) if array.size else None


def beta_posterior(weight: float, mean_reward: float, state: str = "active", level: float = 0.95) -> ArmPosterior:
    """Beta(1 + successes, 1 + failures) as the router's Thompson sampler uses it (prior Beta(1, 1))."""
    from scipy.stats import beta as beta_distribution

    weight = max(0.0, weight)
    successes = min(weight, max(0.0, weight * mean_reward))
    a, b = 1.0 + successes, 1.0 + weight - successes
    tail = (1.0 - level) / 2
    return ArmPosterior(weight, mean_reward, a / (a + b), float(beta_distribution.ppf(tail, a, b)),
                        float(beta_distribution.ppf(1 - tail, a, b)), state)


class Telemetry:
    """Counts and series of one run. Not thread-safe: one asyncio loop writes and reads it."""

    def __init__(self, arms: list[str], shadows: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.arms = list(arms)
        self.shadows = list(shadows)
        self._clock = clock
        self.t0: float | None = None
        self.wall0: float | None = None
        self.requests: dict[str, RequestRecord] = {}
        self.predictions: dict[str, PredictionRecord] = {}
        self.shadow_predictions: dict[tuple[str, str], PredictionRecord] = {}
        self.prediction_duplicates = 0
        self.shadow_duplicates = 0
        self.unknown_predictions = 0
        self.outcomes_scheduled = 0
        self.outcomes_sent = 0
        self.outcomes_by_arm: Counter[str] = Counter()
        self.rewards_by_arm: Counter[str] = Counter()
        self.deadletters = 0
        self.deadletter_reasons: Counter[str] = Counter()
        self.alerts: list[dict[str, Any]] = []
        self.samples: list[Sample] = []
        self.events: list[tuple[float, str]] = []
        self.e2e_ms: list[float] = []
        """Send to prediction read, per scenario request (ms)."""
        self.stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
        """Per scenario request, the end-to-end time cut at the gateway's receipt and its prediction
        (from the prediction's ts_predicted and latency_ms; wall clocks of one machine)."""
        self.warmup_e2e_ms: list[float] = []
        # per-second buckets (by request send time) for windows and plots
        self.served_per_s: dict[int, Counter[str]] = defaultdict(Counter)
        self.outcome_log: list[tuple[float, str, float]] = []
        self._latencies: dict[str, deque[tuple[float, float]]] = defaultdict(lambda: deque(maxlen=5000))
        self.versions: dict[str, int] = {}
        """The model version each arm (or shadow) answered with most recently."""

    # -- clock -------------------------------------------------------------------------------
    def start(self) -> None:
        """Scenario time 0 is now."""
        self.t0 = self._clock()
        self.wall0 = time.time()

    def now_s(self) -> float:
        """Scenario seconds (negative or 0 before `start`)."""
        return 0.0 if self.t0 is None else self._clock() - self.t0

    def wall_of(self, t_s: float) -> float:
        """Epoch seconds of scenario time `t_s`."""
        return (self.wall0 or time.time()) + t_s

    def scenario_time_of(self, wall: float) -> float:
        return wall - (self.wall0 or wall)

    def note(self, text: str) -> None:
        self.events.append((self.now_s(), text))

    # -- events ------------------------------------------------------------------------------
    def record_sent(self, request_id: str, row: int, shifted: bool, label: int, warmup: bool = False) -> None:
        self.requests[request_id] = RequestRecord(row, shifted, label, self.now_s() if self.t0 is not None else -1.0,
                                                  warmup, time.time())

    @property
    def sent(self) -> int:
        return len(self.requests)

    def record_prediction(self, event: Mapping[str, Any], shadow: bool) -> PredictionRecord | None:
        """Store a (shadow-)prediction; return it when it is the first for its request (and arm),
        None for a duplicate or a request this run did not send (both counted)."""
        request_id = event.get("request_id")
        request = self.requests.get(request_id) if isinstance(request_id, str) else None
        if request is None:
            self.unknown_predictions += 1
            return None
        arm = str(event.get("arm"))
        key = (request_id, arm)
        if (shadow and key in self.shadow_predictions) or (not shadow and request_id in self.predictions):
            if shadow:
                self.shadow_duplicates += 1
            else:
                self.prediction_duplicates += 1
            return None
        outputs = event.get("outputs") or {}
        label = outputs.get("label")
        if isinstance(label, list):
            label = label[0] if len(label) == 1 else None
        now = self.now_s()
        record = PredictionRecord(arm, str(event.get("model")), int(event.get("model_version") or 0),
                                  int(label) if isinstance(label, (int, float)) else None,
                                  float(event.get("latency_ms") or 0.0), now, float(event.get("propensity") or 0.0))
        self.versions[arm] = record.version
        if shadow:
            self.shadow_predictions[key] = record
        else:
            self.predictions[request_id] = record
            if request.warmup:  # includes the gateway building its drift monitors: kept apart
                self.warmup_e2e_ms.append((now - request.sent_s) * 1000.0)
            else:
                self.e2e_ms.append((now - request.sent_s) * 1000.0)
                self._record_stages(event, request, record)
                self.served_per_s[math.floor(request.sent_s)][arm] += 1
                self._latencies[arm].append((now, record.latency_ms))
        return record

    def _record_stages(self, event: Mapping[str, Any], request: RequestRecord, record: PredictionRecord) -> None:
        predicted = event.get("ts_predicted")
        if not isinstance(predicted, (int, float)) or not request.sent_wall:
            return
        received = float(predicted) - record.latency_ms / 1000.0
        self.stage_ms["kafka_in"].append((received - request.sent_wall) * 1000.0)
        self.stage_ms["gateway"].append(record.latency_ms)
        self.stage_ms["kafka_out"].append((time.time() - float(predicted)) * 1000.0)

    def record_outcome(self, request_id: str, arm: str, reward: float) -> None:
        self.outcomes_sent += 1
        self.outcomes_by_arm[arm] += 1
        self.rewards_by_arm[arm] += reward
        request = self.requests[request_id]
        if not request.warmup:
            self.outcome_log.append((request.sent_s, arm, reward))

    def record_deadletter(self, event: Mapping[str, Any]) -> None:
        self.deadletters += 1
        self.deadletter_reasons[str(event.get("reason", "?"))] += 1

    def record_alert(self, event: Mapping[str, Any]) -> None:
        alert = dict(event)
        alert["received_s"] = self.now_s()
        ts = alert.get("ts")
        alert["t_s"] = self.scenario_time_of(float(ts)) if isinstance(ts, (int, float)) else alert["received_s"]
        self.alerts.append(alert)

    def add_sample(self, sample: Sample) -> None:
        self.samples.append(sample)

    # -- reading -----------------------------------------------------------------------------
    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    @property
    def drift_alerts(self) -> list[dict[str, Any]]:
        """The drift alerts that opened an episode (`firing`; alerts without a state count as firing)."""
        return [a for a in self.alerts if a.get("kind") == "drift" and a.get("state", "firing") != "resolved"]

    def episodes(self) -> list[EpisodeRow]:
        """Drift and quality episodes in the order they opened: each `firing` alert opens one, the
        next `resolved` alert of the same key (route, arm, model, version, metric, feature) closes it."""
        rows: list[EpisodeRow] = []
        open_rows: dict[tuple[Any, ...], int] = {}
        firing: Counter[tuple[Any, ...]] = Counter()
        for alert in self.alerts:
            if alert.get("kind") not in ("drift", "quality"):
                continue
            details = alert.get("details") or {}
            key = (alert.get("route"), alert.get("arm"), details.get("model"), alert.get("model_version"),
                   alert.get("metric"), details.get("feature"))
            if alert.get("state", "firing") != "resolved":
                firing[key] += 1
                open_rows[key] = len(rows)
                rows.append(EpisodeRow(str(alert.get("kind")), *key, opened_s=float(alert["t_s"]), resolved_s=None,
                                       alarms=None, firing_alerts=0))
            elif key in open_rows:
                index = open_rows.pop(key)
                alarms = details.get("alarms")
                rows[index] = replace(rows[index], resolved_s=float(alert["t_s"]),
                                      alarms=int(alarms) if isinstance(alarms, (int, float)) else None)
        return [replace(row, firing_alerts=firing[(row.route, row.arm, row.model, row.version, row.metric,
                                                    row.feature)]) for row in rows]

    def served_between(self, start_s: float, end_s: float) -> Counter[str]:
        """Primary predictions per arm for requests sent in [start_s, end_s) (whole seconds)."""
        total: Counter[str] = Counter()
        for second in range(math.floor(start_s), math.ceil(end_s)):
            total.update(self.served_per_s.get(second, {}))
        return total

    def shares_between(self, start_s: float, end_s: float) -> dict[str, float]:
        counts = self.served_between(start_s, end_s)
        n = sum(counts.values())
        return {arm: (counts[arm] / n if n else 0.0) for arm in self.arms}

    def recent_latency_p99(self, arm: str, window_s: float) -> float | None:
        horizon = self.now_s() - window_s
        return percentile((latency for t, latency in self._latencies[arm] if t >= horizon), 99)

    def reward_rate(self, arm: str) -> float | None:
        n = self.outcomes_by_arm[arm]
        return self.rewards_by_arm[arm] / n if n else None

    def local_shadow_quality(self, shadow: str) -> dict[str, float]:
        """Agreement with the primary and F1 of shadow and primary against the labels, computed
        here from the predictions this run received (a cross-check of the feedback worker)."""
        agree = n = 0
        pairs: list[tuple[int, int, int]] = []
        for (request_id, arm), record in self.shadow_predictions.items():
            primary = self.predictions.get(request_id)
            if arm != shadow or primary is None or record.label is None or primary.label is None:
                continue
            n += 1
            agree += int(record.label == primary.label)
            pairs.append((self.requests[request_id].label, record.label, primary.label))
        out: dict[str, float] = {"pairs": float(n)}
        if n:
            truth, shadow_labels, primary_labels = (np.array(column) for column in zip(*pairs))
            out["agreement"] = agree / n
            out["shadow_f1"] = _f1(truth, shadow_labels)
            out["primary_f1"] = _f1(truth, primary_labels)
        return out


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    tp = float(np.sum((truth == 1) & (predicted == 1)))
    fp = float(np.sum((truth == 0) & (predicted == 1)))
    fn = float(np.sum((truth == 1) & (predicted == 0)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
