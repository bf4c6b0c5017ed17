"""Live model quality from labelled outcomes: streaming, mergeable metrics, sliding windows and the
always-valid shadow-versus-primary test (pure: no I/O).

An outcome's ``label`` is ground truth for every model that predicted the request, the serving
arm and each shadow. One (prediction, label) pair becomes a :class:`QualityStats` of counts and
sums; statistics add with ``+`` (per time bucket, per worker, in Redis as ``HINCRBYFLOAT``
fields), and every metric is a read-only property of the sums:

* classifiers: accuracy, and for binary labels (0/1 or booleans, positive class 1) precision,
  recall, F1; with a probability, log loss and Brier score;
* regressors (no ``label`` output, a numeric label): MAE and RMSE;
* every arm: mean reward with a confidence interval (:mod:`feedback.reward`);
* shadows: the share of requests where the shadow's predicted label equals the primary's.

Sliding windows: statistics are kept per time bucket of ``window_s / WINDOW_BUCKETS`` seconds
(by the outcome's event time); the window at `now` is the sum of the last WINDOW_BUCKETS buckets,
the newest partly filled, so it slides in steps of one bucket.

Promote / reject: for each request both a shadow and its primary predicted and that got a label,
``d = loss(primary) - loss(shadow)`` with loss the Brier score when both gave a probability of a
binary label, else the 0/1 error (so d is in [-1, 1]). :func:`confidence_sequence` is Robbins'
normal-mixture confidence sequence for the mean of d (Howard, Ramdas, McAuliffe, Sekhon 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", with the Hoeffding sub-Gaussian
constant sigma = 1 for increments in [-1, 1]); it holds at every sample size at once with
probability >= confidence, so checking it after every refresh, forever, keeps the error rate.
:func:`shadow_verdict` says ``promote`` when its lower bound exceeds the margin and ``reject`` when
its upper bound is below zero.

>>> view = outputs_view({"probability": [0.8], "label": 1})
>>> stats = labelled(view, 1) + labelled(view, 0)
>>> stats.accuracy, stats.precision, stats.recall
(0.5, 0.5, 1.0)
>>> round(stats.brier, 3)
0.34
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

from banditgate.events import MAX_MAGNITUDE
from banditgate.jsontypes import JSONValue
from feedback.reward import RewardKind, RewardStats

WINDOW_BUCKETS = 12
_EPS = 1e-15


# ---------------------------------------------------------------------------------------------
# what a prediction said


@dataclass(frozen=True, slots=True)
class PredictionView:
    """The parts of a model's outputs that quality needs."""

    score: float | None = None
    """Probability of the positive class (classifier) or the predicted value (regressor)."""
    predicted: JSONValue = None
    """Predicted label (the ``label`` output), None for a regressor."""
    predicted_name: str | None = None
    """Class name of the predicted label (the gateway's ``class`` output), if the model has names."""


def _first_number(value: JSONValue) -> float | None:
    while isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    # a score outside the events contract's bound (banditgate.events.MAX_MAGNITUDE) is no score:
    # its squared error against a label could overflow the ledger's sums
    return float(value) if -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE else None


_PROBABILITY_OUTPUTS = ("probability", "probabilities", "output_probability")


def outputs_view(outputs: Mapping[str, JSONValue]) -> PredictionView:
    """Read score and predicted label from a prediction's ``outputs``.

    The score is the positive-class probability: the first of ``probability``, ``probabilities``,
    ``output_probability`` present (a 2-element row is [P(0), P(1)]: P(1) is taken, as from
    skl2onnx classifiers exported without zipmap), else the first number of the first other
    numeric output; the predicted label is ``label``.
    """
    if len(outputs) == 2:
        # the shape our gateway writes for a binary classifier, {"probability": [p], "label": 0/1}:
        # the same view as the general rules below give it, without walking them (hot path)
        probability, predicted = outputs.get("probability"), outputs.get("label")
        if (probability.__class__ is list and len(probability) == 1 and predicted.__class__ is int
                and (score := probability[0]).__class__ is float and -MAX_MAGNITUDE <= score <= MAX_MAGNITUDE):
            return PredictionView(score=score, predicted=predicted, predicted_name=None)
    score: float | None = None  # type: ignore[no-redef]
    for key in _PROBABILITY_OUTPUTS:
        probability = outputs.get(key)
        if probability is None:
            continue
        if isinstance(probability, list) and len(probability) == 1 and isinstance(probability[0], list):
            probability = probability[0]  # a [1, n] row
        if isinstance(probability, list) and len(probability) == 2 and not isinstance(probability[0], list):
            score = _first_number(probability[1])
        else:
            score = _first_number(probability)
        break
    if score is None:
        for name, value in outputs.items():
            if name in ("label", "class", *_PROBABILITY_OUTPUTS):
                continue
            score = _first_number(value)
            if score is not None:
                break
    predicted = outputs.get("label")
    if isinstance(predicted, list):
        predicted = predicted[0] if len(predicted) == 1 else None
    if isinstance(predicted, float) and predicted.is_integer():
        predicted = int(predicted)
    class_name = outputs.get("class")
    return PredictionView(score=score, predicted=predicted,
                          predicted_name=class_name if isinstance(class_name, str) else None)


def binary_label(label: JSONValue) -> int | None:
    """1 or 0 for labels that are booleans or the numbers 0 and 1; None for anything else."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, (int, float)) and label in (0, 1):
        return int(label)
    return None


def _predicted_label(view: PredictionView, label: JSONValue) -> JSONValue:
    """The predicted label to compare with `label`, or None when the view cannot say."""
    if view.predicted is not None:
        if isinstance(label, str) and not isinstance(view.predicted, str) and view.predicted_name is not None:
            return view.predicted_name
        return view.predicted
    if view.score is not None and binary_label(label) is not None and 0.0 <= view.score <= 1.0:
        return int(view.score >= 0.5)
    return None


def _same(predicted: JSONValue, label: JSONValue) -> bool:
    if isinstance(predicted, bool) or isinstance(label, bool):
        return binary_label(predicted) is not None and binary_label(predicted) == binary_label(label)
    if isinstance(predicted, (int, float)) and isinstance(label, (int, float)):
        return float(predicted) == float(label)
    return str(predicted) == str(label)


def label_error(view: PredictionView, label: JSONValue) -> bool | None:
    """Whether a classifier's predicted label misses `label` (the error stream the quality-drift
    CUSUM watches); None when the pair cannot be scored as a classification (regressors)."""
    predicted = view.predicted
    if label.__class__ is int and predicted.__class__ is int:
        return predicted != label  # what the general rules below give two plain ints (hot path)
    return _label_error(view, label)


def _label_error(view: PredictionView, label: JSONValue) -> bool | None:
    predicted = _predicted_label(view, label)
    if predicted is None:
        return None
    return not _same(predicted, label)


# ---------------------------------------------------------------------------------------------
# mergeable statistics


@dataclass(frozen=True, slots=True)
class QualityStats:
    """Counts and sums of one model version's labelled outcomes, rewards and agreement."""

    n: float = 0.0
    """Labelled outcomes scored as classification."""
    correct: float = 0.0
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    tn: float = 0.0
    n_prob: float = 0.0
    """Binary labels with a probability (log loss / Brier)."""
    log_loss_sum: float = 0.0
    brier_sum: float = 0.0
    n_reg: float = 0.0
    """Labelled outcomes scored as regression."""
    abs_err_sum: float = 0.0
    sq_err_sum: float = 0.0
    n_reward: float = 0.0
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    n_agree: float = 0.0
    """Requests where both this shadow and its primary predicted a label."""
    agree_sum: float = 0.0
    n_pair: float = 0.0
    """Labelled requests with a loss for both this shadow and its primary."""
    pair_primary_loss_sum: float = 0.0
    pair_shadow_loss_sum: float = 0.0

    def __add__(self, other: QualityStats) -> QualityStats:
        return QualityStats(*(getattr(self, f) + getattr(other, f) for f in FIELD_NAMES))

    def to_fields(self) -> dict[str, float]:
        """The non-zero sums by field name (what goes into Redis)."""
        return {name: value for name in FIELD_NAMES if (value := getattr(self, name))}

    @classmethod
    def from_fields(cls, values: Mapping[str, float]) -> QualityStats:
        """Inverse of to_fields; unknown names are ignored."""
        return cls(**{name: float(values[name]) for name in FIELD_NAMES if name in values})

    # -- metrics (None when there is nothing to compute them from) -------------------------
    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else None

    @property
    def log_loss(self) -> float | None:
        return self.log_loss_sum / self.n_prob if self.n_prob else None

    @property
    def brier(self) -> float | None:
        return self.brier_sum / self.n_prob if self.n_prob else None

    @property
    def mae(self) -> float | None:
        return self.abs_err_sum / self.n_reg if self.n_reg else None

    @property
    def rmse(self) -> float | None:
        return math.sqrt(self.sq_err_sum / self.n_reg) if self.n_reg else None

    @property
    def agreement(self) -> float | None:
        return self.agree_sum / self.n_agree if self.n_agree else None

    @property
    def rewards(self) -> RewardStats:
        return RewardStats(self.n_reward, self.reward_sum, self.reward_sq_sum)

    def metrics(self, reward_kind: RewardKind = "bernoulli", confidence: float = 0.95) -> dict[str, float]:
        """Every defined metric by name (the names the Prometheus gauges use)."""
        out: dict[str, float] = {}
        for name in ("accuracy", "precision", "recall", "f1", "log_loss", "brier", "mae", "rmse", "agreement"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["labelled"] = self.n + self.n_reg
        if self.n_reward:
            low, high = self.rewards.interval(confidence, reward_kind)
            out.update(reward_mean=self.rewards.mean, reward_low=low, reward_high=high, rewards=self.n_reward)
        return out


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(QualityStats))


def labelled(view: PredictionView, label: JSONValue) -> QualityStats:
    """One prediction scored against its label (empty stats if the pair cannot be scored)."""
    return QualityStats(**labelled_fields(view, label))


def labelled_fields(view: PredictionView, label: JSONValue) -> dict[str, float]:
    """:func:`labelled` as its non-zero sums by field name (the hot path's form: no objects)."""
    predicted = view.predicted
    if label.__class__ is int and (label == 0 or label == 1) and predicted.__class__ is int:
        # a binary label and a plain int prediction: what the general rules below give, without
        # walking them (hot path; a property test compares the two)
        stats = {"n": 1.0}
        if predicted == label:
            stats["correct"] = 1.0
        if predicted == 0 or predicted == 1:
            stats[("tp" if predicted else "fn") if label else ("fp" if predicted else "tn")] = 1.0
        _add_probability_fields(stats, view.score, label)
        return stats
    return _labelled_fields(view, label)


def _add_probability_fields(stats: dict[str, float], score: float | None, y: int) -> None:
    """Log loss and Brier score of a probability `score` for the 0/1 label `y` (if it is one)."""
    if score is not None and 0.0 <= score <= 1.0:
        probability = min(1.0 - _EPS, max(_EPS, score))
        stats["n_prob"] = 1.0
        stats["log_loss_sum"] = -math.log(probability if y else 1.0 - probability)
        brier = (score - y) ** 2
        if brier:
            stats["brier_sum"] = brier


def _labelled_fields(view: PredictionView, label: JSONValue) -> dict[str, float]:
    y = binary_label(label)
    predicted = _predicted_label(view, label)
    if predicted is not None:
        stats = {"n": 1.0}
        if _same(predicted, label):
            stats["correct"] = 1.0
        p = binary_label(predicted)
        if y is not None and p is not None:
            stats[("tp" if p else "fn") if y else ("fp" if p else "tn")] = 1.0
        if y is not None:
            _add_probability_fields(stats, view.score, y)
        return stats
    if view.score is not None and isinstance(label, (int, float)) and not isinstance(label, bool):
        error = view.score - float(label)
        if math.isfinite(error):
            return {k: v for k, v in (("n_reg", 1.0), ("abs_err_sum", abs(error)), ("sq_err_sum", error * error)) if v}
    return {}


def rewarded(reward: float) -> QualityStats:
    """One reward for the arm that served."""
    return QualityStats(**rewarded_fields(reward))


def rewarded_fields(reward: float) -> dict[str, float]:
    """:func:`rewarded` as its non-zero sums by field name."""
    if not reward:
        return {"n_reward": 1.0}
    return {"n_reward": 1.0, "reward_sum": reward, "reward_sq_sum": reward * reward}


def loss(view: PredictionView, label: JSONValue) -> tuple[str, float] | None:
    """("brier", value) or ("error", 0/1) for one labelled prediction; None if neither applies."""
    y = binary_label(label)
    if y is not None and view.score is not None and 0.0 <= view.score <= 1.0:
        return "brier", (view.score - y) ** 2
    predicted = _predicted_label(view, label)
    if predicted is None:
        return None
    return "error", 0.0 if _same(predicted, label) else 1.0


def shadow_observation(shadow: PredictionView, primary: PredictionView | None, label: JSONValue) -> QualityStats:
    """A shadow's comparison with the primary on one request: agreement of predicted labels and,
    with a label, the paired losses the sequential test uses (empty without a primary)."""
    return QualityStats(**shadow_fields(shadow, primary, label))


def shadow_fields(shadow: PredictionView, primary: PredictionView | None, label: JSONValue) -> dict[str, float]:
    """:func:`shadow_observation` as its non-zero sums by field name."""
    if primary is None:
        return {}
    stats: dict[str, float] = {}
    if shadow.predicted is not None and primary.predicted is not None:
        stats["n_agree"] = 1.0
        if _same(shadow.predicted, primary.predicted):
            stats["agree_sum"] = 1.0
    if label is not None:
        primary_loss, shadow_loss = loss(primary, label), loss(shadow, label)
        if primary_loss is not None and shadow_loss is not None and primary_loss[0] == shadow_loss[0]:
            stats["n_pair"] = 1.0
            if primary_loss[1]:
                stats["pair_primary_loss_sum"] = primary_loss[1]
            if shadow_loss[1]:
                stats["pair_shadow_loss_sum"] = shadow_loss[1]
    return stats


# ---------------------------------------------------------------------------------------------
# sliding windows


def bucket_seconds(window_s: float) -> float:
    """Width of one time bucket for a window of `window_s` seconds."""
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    return window_s / WINDOW_BUCKETS


def bucket_index(ts: float, bucket_s: float) -> int:
    """Which bucket an event at epoch time `ts` falls in."""
    return math.floor(ts / bucket_s)


def window_buckets(now: float, window_s: float) -> range:
    """Bucket indexes that make up the window ending at `now` (the last one partly filled)."""
    newest = bucket_index(now, bucket_seconds(window_s))
    return range(newest - WINDOW_BUCKETS + 1, newest + 1)


# ---------------------------------------------------------------------------------------------
# the sequential promote / reject test


def mixture_rho(alpha: float, target_n: float = 1000.0, sigma: float = 1.0) -> float:
    """Mixture variance that makes the boundary tightest near `target_n` observations
    (Howard et al. 2021, eq. (3.12) approximation)."""
    log_term = 2.0 * math.log(1.0 / alpha)
    return target_n * sigma * sigma / (log_term + math.log(1.0 + log_term))


def confidence_sequence(n: float, total: float, confidence: float, sigma: float = 1.0,
                        target_n: float = 1000.0, bounds: tuple[float, float] = (-1.0, 1.0)) -> tuple[float, float]:
    """Two-sided normal-mixture confidence sequence for the mean of sigma-sub-Gaussian increments
    after `n` of them summing to `total`: valid simultaneously for every n with probability
    >= `confidence`. Increments in `bounds` = [a, b] are sub-Gaussian with sigma = (b - a) / 2
    (Hoeffding's lemma); the interval is clipped to `bounds`, which is all of it when n is 0."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n <= 0:
        return bounds
    alpha = 1.0 - confidence
    rho = mixture_rho(alpha, target_n, sigma)
    v = n * sigma * sigma
    radius = math.sqrt((v + rho) * math.log((v + rho) / (rho * alpha * alpha))) / n
    mean = total / n
    return max(bounds[0], mean - radius), min(bounds[1], mean + radius)


@dataclass(frozen=True, slots=True)
class ShadowVerdict:
    """The evidence about one shadow against its primaries, and the decision it supports."""

    decision: Literal["promote", "reject"] | None
    n: float
    advantage: float
    """Mean of loss(primary) - loss(shadow): positive when the shadow is better."""
    lower: float
    upper: float
    primary_loss: float
    shadow_loss: float
    confidence: float
    margin: float


def shadow_verdict(stats: QualityStats, confidence: float, margin: float) -> ShadowVerdict:
    """Promote when the confidence sequence's lower bound on the advantage exceeds `margin`,
    reject when its upper bound is below 0, else no decision yet. The increments are in [-1, 1],
    so sigma = 1 (Hoeffding)."""
    n = stats.n_pair
    total = stats.pair_primary_loss_sum - stats.pair_shadow_loss_sum
    lower, upper = confidence_sequence(n, total, confidence, sigma=1.0)
    decision: Literal["promote", "reject"] | None = None
    if n > 0 and lower > margin:
        decision = "promote"
    elif n > 0 and upper < 0.0:
        decision = "reject"
    return ShadowVerdict(decision=decision, n=n, advantage=total / n if n else 0.0, lower=lower, upper=upper,
                         primary_loss=stats.pair_primary_loss_sum / n if n else 0.0,
                         shadow_loss=stats.pair_shadow_loss_sum / n if n else 0.0,
                         confidence=confidence, margin=margin)
