"""Live drift monitors: input features and prediction scores against a model's reference profile.

Per feature, an adaptive multinomial CUSUM (see adaptive.py) on the profile's bins, evaluated at
every observation, with its threshold calibrated to the target ARL0 (see calibration.py).
At a crossing, `update` returns a DriftAlarm for that observation and restarts that feature's
statistic from zero — the alarm is never swallowed by a later reset. The estimate of the live
distribution is kept across the restart, so a drift that persists alarms again after roughly
threshold / KL observations, a heartbeat an alerting rule can de-duplicate.

Multiplicity: `arl0` is per feature. Expected false alarms add up across features whatever
their dependence, so giving `family_arl0` sets each feature's ARL0 to family_arl0 × features
(Bonferroni on rates): the monitor as a whole then raises one false alarm per family_arl0
observations on average.

    >>> import numpy as np
    >>> from banditgate.drift.reference import ReferenceProfile
    >>> rng = np.random.default_rng(0)
    >>> profile = ReferenceProfile.build(rng.normal(size=(5000, 2)), ["age", "income"])
    >>> monitor = FeatureDriftMonitor(profile, arl0=10_000)
    >>> monitor.update(rng.normal(size=(1000, 2)))
    []
    >>> [alarm.feature for alarm in monitor.update(rng.normal(size=(1000, 2)) + [0, 1.0])][:1]
    ['income']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from banditgate.drift.adaptive import AdaptiveIncrements, EstimatorSettings, smoothed
from banditgate.drift.binning import Binner, DriftInputError
from banditgate.drift.calibration import feature_key, feature_threshold
from banditgate.drift.cusum import cusum_batch
from banditgate.drift.effect import jensen_shannon, population_stability_index
from banditgate.drift.reference import FeatureProfile, ProfileError, ReferenceProfile

__all__ = [
    "DriftAlarm",
    "DriftInputError",
    "EffectSize",
    "FeatureDriftMonitor",
    "ScoreDriftMonitor",
    "profile_thresholds",
]

MAX_CHUNK_ROWS = 16_384


@dataclass(frozen=True)
class DriftAlarm:
    """One detection. index: 0-based position in the monitor's stream of the observation at
    which the statistic crossed; effect sizes are over the recent window at the end of that batch."""

    feature: str
    index: int
    statistic: float
    threshold: float
    effect_size_psi: float
    effect_size_js: float


@dataclass(frozen=True)
class EffectSize:
    """Per-feature effect sizes of the recent window against the reference."""

    psi: np.ndarray
    js: np.ndarray


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class BinnedDriftMonitor:
    """The engine shared by the feature and score monitors: one CUSUM per profiled column.

    arl0: target in-control observations between false alarms, per feature. family_arl0: the
    same for the monitor as a whole (overrides arl0, see the module docstring). settings: how
    the live distribution is estimated (defaults suit most streams). calibration_seed: seeds
    the calibration simulation (thresholds are deterministic given it). thresholds: one per
    feature, overriding calibration. stored: calibrated thresholds by calibration key (a
    profile's `thresholds`); a feature whose key is there is not simulated. Raises ValueError
    for a per-feature ARL0 below 10 or bad thresholds, ProfileError for an empty feature list.
    """

    def __init__(self, features: Sequence[FeatureProfile], arl0: float = 10_000, *,
                 family_arl0: float | None = None, settings: EstimatorSettings | None = None,
                 calibration_seed: int = 0, thresholds: Sequence[float] | None = None,
                 stored: Mapping[str, float] | None = None) -> None:
        if not features:
            raise ProfileError("a drift monitor needs at least one profiled feature")
        self.settings = settings or EstimatorSettings()
        self.feature_arl0 = per_feature_arl0(len(features), arl0, family_arl0)
        if not self.feature_arl0 >= 10:
            raise ValueError(f"arl0 must be at least 10 observations per feature, got {self.feature_arl0}")
        self._binner = Binner(features)
        max_bins = int(self._binner.bin_counts.max())
        self._mask = np.arange(max_bins)[None, :] < self._binner.bin_counts[:, None]
        reference = np.ones((len(features), max_bins))
        for index, feature in enumerate(features):
            frequencies = np.asarray(feature.probabilities + (feature.missing_probability,))
            reference[index, :frequencies.size] = smoothed(frequencies, feature.count)
        self._estimator = AdaptiveIncrements(reference, self.settings)
        if thresholds is None:
            thresholds = [feature_threshold(_frequencies(f), f.count, self.feature_arl0, self.settings,
                                            calibration_seed, stored)
                          for f in features]
        self._threshold = np.asarray(thresholds, dtype=float)
        if self._threshold.shape != (len(features),) or not np.all(self._threshold > 0):
            raise ValueError(f"thresholds must be {len(features)} positive numbers")
        self._statistic = np.zeros(len(features))
        self._alarms_total = np.zeros(len(features), dtype=np.int64)
        self._observations = 0

    @property
    def feature_names(self) -> list[str]:
        return list(self._binner.names)

    @property
    def statistic(self) -> np.ndarray:
        """Current CUSUM statistic per feature (nats of log-likelihood ratio), read-only."""
        return _readonly(self._statistic)

    @property
    def threshold(self) -> np.ndarray:
        """Calibrated threshold per feature, read-only."""
        return _readonly(self._threshold)

    @property
    def alarms_total(self) -> np.ndarray:
        """Alarms raised per feature since construction, read-only."""
        return _readonly(self._alarms_total)

    @property
    def observations(self) -> int:
        """Rows seen since construction."""
        return self._observations

    @property
    def effect_size(self) -> EffectSize:
        """PSI and Jensen–Shannon divergence (bits) per feature of the recent window (an
        exponentially weighted histogram, time constant settings.effect_window_obs) vs reference."""
        reference, recent = self._estimator.reference, self._estimator.recent
        return EffectSize(psi=population_stability_index(reference, recent, self._mask),
                          js=jensen_shannon(reference, recent, self._mask))

    @property
    def state_bytes_per_feature(self) -> float:
        """Bytes of numeric state per feature (estimator arrays, statistic, threshold, counts, edges)."""
        total = self._estimator.state_bytes + self._statistic.nbytes + self._threshold.nbytes
        total += self._alarms_total.nbytes + self._mask.nbytes
        total += self._binner.state_bytes
        return total / len(self._statistic)

    def _update_bins(self, bins: np.ndarray) -> list[DriftAlarm]:
        if bins.shape[0] <= MAX_CHUNK_ROWS:
            return self._update_chunk(bins)
        # bounded working memory (a few arrays of rows x features floats) for any batch size
        return [alarm for start in range(0, bins.shape[0], MAX_CHUNK_ROWS)
                for alarm in self._update_chunk(bins[start:start + MAX_CHUNK_ROWS])]

    def _update_chunk(self, bins: np.ndarray) -> list[DriftAlarm]:
        start = self._observations
        self._observations += bins.shape[0]
        if bins.shape[0] == 0:
            return []
        increments = self._estimator.increments(bins)
        self._statistic, crossings = cusum_batch(increments, self._statistic, self._threshold)
        if not crossings:
            return []
        effect = self.effect_size
        alarms = []
        for crossing in crossings:
            feature = crossing.series
            self._alarms_total[feature] += 1
            alarms.append(DriftAlarm(feature=self._binner.names[feature], index=start + crossing.row,
                                     statistic=crossing.statistic, threshold=float(self._threshold[feature]),
                                     effect_size_psi=float(effect.psi[feature]),
                                     effect_size_js=float(effect.js[feature])))
        return alarms


def _frequencies(feature: FeatureProfile) -> np.ndarray:
    return np.asarray(feature.probabilities + (feature.missing_probability,))


def per_feature_arl0(features: int, arl0: float, family_arl0: float | None) -> float:
    """The per-feature ARL0 a monitor of `features` columns calibrates to (see the module docstring)."""
    return float(arl0) if family_arl0 is None else float(family_arl0) * features


def profile_keys(profile: ReferenceProfile, family_arl0: float, settings: EstimatorSettings | None = None,
                 calibration_seed: int = 0) -> dict[str, tuple[FeatureProfile, float]]:
    """The calibrations the gateway's monitors of `profile` need at `drift.arl0` = family_arl0
    (FeatureDriftMonitor(profile, family_arl0=...) and ScoreDriftMonitor(profile, arl0=...)):
    calibration key -> (a feature with that key, its per-feature ARL0)."""
    settings = settings or EstimatorSettings()
    wanted: dict[str, tuple[FeatureProfile, float]] = {}
    columns = [(f, per_feature_arl0(len(profile.features), 0, family_arl0)) for f in profile.features]
    if profile.score is not None:
        columns.append((profile.score, float(family_arl0)))
    for feature, arl0 in columns:
        wanted.setdefault(feature_key(_frequencies(feature), feature.count, arl0, settings, calibration_seed),
                          (feature, arl0))
    return wanted


def profile_thresholds(profile: ReferenceProfile, family_arl0: float, settings: EstimatorSettings | None = None,
                       calibration_seed: int = 0) -> dict[str, float]:
    """Calibrate (or take from the profile, or this process's memo) every threshold the monitors
    of `profile` need at `drift.arl0` = family_arl0; returns them by key, ready for
    `profile.with_thresholds`. Seconds per distinct key (profiles with the same bin shares
    share one). Raises CalibrationError / ValueError for an ARL0 below 10."""
    settings = settings or EstimatorSettings()
    return {key: feature_threshold(_frequencies(feature), feature.count, arl0, settings, calibration_seed,
                                   profile.thresholds)
            for key, (feature, arl0) in profile_keys(profile, family_arl0, settings, calibration_seed).items()}


class FeatureDriftMonitor(BinnedDriftMonitor):
    """Drift of a model's input features against `profile.features` (see the module docstring).
    Thresholds stored in the profile under the matching calibration key are used as they are."""

    def __init__(self, profile: ReferenceProfile, arl0: float = 10_000, *, family_arl0: float | None = None,
                 settings: EstimatorSettings | None = None, calibration_seed: int = 0,
                 thresholds: Sequence[float] | None = None) -> None:
        self.profile = profile
        super().__init__(profile.features, arl0, family_arl0=family_arl0, settings=settings,
                         calibration_seed=calibration_seed, thresholds=thresholds, stored=profile.thresholds)

    def update(self, rows: np.ndarray | Mapping[str, np.ndarray]) -> list[DriftAlarm]:
        """Feed a batch: [rows, features] in profile order (numbers; categorical features as their
        numeric codes) or a mapping name -> column (any dtype). Every row is tested in order.
        Returns the alarms raised in this batch, ordered by index. Raises DriftInputError on a
        wrong shape or missing feature."""
        return self._update_bins(self._binner.assign(rows))


class ScoreDriftMonitor(BinnedDriftMonitor):
    """Drift of the prediction-score distribution against `profile.score`.
    Raises ProfileError if the profile has no score distribution."""

    def __init__(self, profile: ReferenceProfile, arl0: float = 10_000, *,
                 settings: EstimatorSettings | None = None, calibration_seed: int = 0,
                 threshold: float | None = None) -> None:
        if profile.score is None:
            raise ProfileError("the reference profile has no prediction-score distribution")
        self.profile = profile
        super().__init__([profile.score], arl0, settings=settings, calibration_seed=calibration_seed,
                         thresholds=None if threshold is None else [threshold], stored=profile.thresholds)

    def update(self, scores: np.ndarray) -> list[DriftAlarm]:
        """Feed a batch of prediction scores (1-D). Returns the alarms raised, ordered by index."""
        scores = np.asarray(scores, dtype=float)
        if scores.ndim != 1:
            raise DriftInputError(f"scores must be 1-D, got shape {scores.shape}")
        return self._update_bins(self._binner.assign(scores[:, None]))
