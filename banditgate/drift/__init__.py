"""Drift monitoring, pure numpy (no I/O): reference profiles, per-feature and prediction-score
drift monitors calibrated to a target false-alarm rate, and a quality (error-rate) CUSUM.

See docs/drift.md for the statistics, calibration and state size.
"""

from banditgate.drift.bernoulli_cusum import BernoulliCusum, QualityAlarm
from banditgate.drift.binning import DriftInputError
from banditgate.drift.monitor import DriftAlarm, EffectSize, FeatureDriftMonitor, ScoreDriftMonitor
from banditgate.drift.reference import FeatureProfile, ProfileError, ReferenceProfile

__all__ = ["BernoulliCusum", "DriftAlarm", "DriftInputError", "EffectSize", "FeatureDriftMonitor",
           "FeatureProfile", "ProfileError", "QualityAlarm", "ReferenceProfile", "ScoreDriftMonitor"]
