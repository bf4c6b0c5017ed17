"""Drift monitoring, pure numpy (no I/O): reference profiles, per-feature and prediction-score
drift monitors calibrated to a target false-alarm rate, and a quality (error-rate) CUSUM.

See docs/drift.md for the statistics, calibration and state size.
"""

from feedback.drift.binning import DriftInputError
from feedback.drift.monitor import DriftAlarm, EffectSize, FeatureDriftMonitor, ScoreDriftMonitor
from feedback.drift.quality import BernoulliCusum, QualityAlarm
from feedback.drift.reference import FeatureProfile, ProfileError, ReferenceProfile

__all__ = ["BernoulliCusum", "DriftAlarm", "DriftInputError", "EffectSize", "FeatureDriftMonitor",
           "FeatureProfile", "ProfileError", "QualityAlarm", "ReferenceProfile", "ScoreDriftMonitor"]
