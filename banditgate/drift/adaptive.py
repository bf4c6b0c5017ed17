"""Plug-in likelihood-ratio increments for binned streams (an adaptive multinomial CUSUM).

For each feature, the increment at observation t in bin b is log(q_{t-1}(b) / p(b)), where p is
the reference bin distribution and q_{t-1} an estimate of the live distribution made from
observations before t only: an exponentially weighted histogram, refreshed every
`block_size` observations and shrunk towards p. Because q is fixed before x_t is seen,
E_p[exp(increment) | past] = sum_b q(b) = 1: under no drift exp(W_t) is a martingale, so the
CUSUM on these increments is a valid sequential test for *any* change of the bin distribution
(location, scale, shape, category priors) without naming the alternative in advance
(Lorden & Pollak's non-anticipating estimation). After a change, q moves towards the new
distribution and the increments' mean tends to KL(new || reference).

State per feature: O(bins) numbers, constant in stream length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EstimatorSettings:
    """How the live distribution is estimated.

    block_size: observations between refreshes of the estimate (cost vs. reaction time).
    memory_obs: time constant, in observations, of the exponentially weighted histogram.
    shrinkage: weight of the reference in the plug-in estimate, in (0, 1]; keeps every
        increment >= log(shrinkage) and damps the noise of a short memory.
    effect_window_obs: time constant of the histogram that effect sizes (PSI, JS) are read from.
    """

    block_size: int = 32
    memory_obs: float = 150.0
    shrinkage: float = 0.15
    effect_window_obs: float = 1000.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.memory_obs >= self.block_size:
            raise ValueError(f"memory_obs must be >= block_size, got {self.memory_obs}")
        if not 0.0 < self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1], got {self.shrinkage}")
        if not self.effect_window_obs >= self.block_size:
            raise ValueError(f"effect_window_obs must be >= block_size, got {self.effect_window_obs}")


def smoothed(probabilities: np.ndarray, count: int) -> np.ndarray:
    """Reference bin probabilities with half a pseudo-count per bin, so no bin has probability 0
    (a bin never seen in training must not make one live value an infinite likelihood ratio)."""
    probabilities = np.asarray(probabilities, dtype=float)
    return (probabilities * count + 0.5) / (count + 0.5 * probabilities.size)


class AdaptiveIncrements:
    """Turns bin indices [rows, features] into CUSUM increments [rows, features].

    reference: [features, max_bins] smoothed reference probabilities; a feature with fewer bins
    is padded with 1.0 (padding bins are never indexed).
    """

    def __init__(self, reference: np.ndarray, settings: EstimatorSettings) -> None:
        self.settings = settings
        self.reference = np.ascontiguousarray(reference, dtype=float)
        self.log_reference = np.log(self.reference)
        self.features, self.max_bins = self.reference.shape
        self.estimate = self.reference.copy()
        self.recent = self.reference.copy()
        self.pending = np.zeros_like(self.reference)
        self.fill = 0
        self._decay = math.exp(-settings.block_size / settings.memory_obs)
        self._effect_decay = math.exp(-settings.block_size / settings.effect_window_obs)

    @property
    def state_bytes(self) -> int:
        """Bytes of per-feature state held by this estimator (all features)."""
        return sum(array.nbytes for array in (self.reference, self.log_reference, self.estimate,
                                               self.recent, self.pending))

    def increments(self, bins: np.ndarray) -> np.ndarray:
        """Increments [rows, features] for bins [rows, features] (int), advancing the estimate."""
        rows = bins.shape[0]
        # the closed-form weighted sums below grow like exp(rows / memory_obs): keep them finite
        limit = max(self.settings.block_size, min(16_384, int(200 * self.settings.memory_obs)))
        if rows <= limit:
            return self._increments(bins)
        return np.concatenate([self._increments(bins[start:start + limit]) for start in range(0, rows, limit)])

    def _increments(self, bins: np.ndarray) -> np.ndarray:
        rows, features = bins.shape
        size = self.settings.block_size
        if rows == 0:
            return np.zeros((0, features))
        first = self.fill
        segment = (first + np.arange(rows)) // size
        segments = int(segment[-1]) + 1
        width = self.max_bins
        # cell of (segment, feature, bin); a row's lookups then fall in one contiguous slab
        flat = (segment * (features * width))[:, None] + (np.arange(features) * width)[None, :]
        flat += bins
        counts = np.bincount(flat.ravel(), minlength=segments * features * width).reshape(
            segments, features, width).astype(float)
        counts[0] += self.pending
        complete = segments if (first + rows) % size == 0 else segments - 1
        shares = counts[:complete]
        shares /= size
        plug_in = np.empty((segments + 1, features, width))
        keep = self._decay
        plug_in[0] = self.estimate
        step = shares * (1.0 - keep)
        for index in range(complete):
            np.multiply(plug_in[index], keep, out=plug_in[index + 1])
            plug_in[index + 1] += step[index]
        self.estimate = plug_in[complete].copy()
        effect_keep = self._effect_decay
        weights = (1.0 - effect_keep) * effect_keep ** np.arange(complete - 1, -1, -1, dtype=float)
        self.recent = effect_keep ** complete * self.recent + (shares * weights[:, None, None]).sum(axis=0)
        self.pending = counts[-1] if complete < segments else np.zeros_like(self.reference)
        self.fill = (first + rows) % size
        shrink = self.settings.shrinkage
        table = plug_in[:segments]
        table *= 1.0 - shrink
        table += shrink * self.reference
        np.log(table, out=table)
        table -= self.log_reference
        return table.ravel()[flat]
