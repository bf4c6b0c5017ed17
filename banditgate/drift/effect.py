"""Effect sizes between binned distributions: PSI and Jensen–Shannon divergence.

Both take [features, bins] arrays whose rows are distributions; `mask` marks the bins that
exist (features with fewer bins are padded). They say how large a drift is, not whether it is
real: the sequential test decides that.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-4  # PSI needs every bin non-empty; the usual practice is a small floor like this


def _normalized(distribution: np.ndarray, mask: np.ndarray) -> np.ndarray:
    clipped = np.where(mask, np.maximum(distribution, FLOOR), 0.0)
    return clipped / clipped.sum(axis=-1, keepdims=True)


def population_stability_index(reference: np.ndarray, live: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PSI = sum_b (q_b - p_b) * ln(q_b / p_b) per row, bins floored at 1e-4 then renormalized.
    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift."""
    p, q = _normalized(reference, mask), _normalized(live, mask)
    ratio = np.where(mask, q / np.where(mask, p, 1.0), 1.0)
    return np.sum((q - p) * np.log(ratio), axis=-1)


def jensen_shannon(reference: np.ndarray, live: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence in bits per row: 0 for identical, 1 for disjoint distributions.
    (Its square root is the Jensen–Shannon distance that scipy reports.)"""
    p = np.where(mask, reference, 0.0)
    q = np.where(mask, live, 0.0)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    log_middle = np.log2(np.where(p + q > 0, 0.5 * (p + q), 1.0))

    def part(x: np.ndarray) -> np.ndarray:
        # x > 0 implies middle >= x / 2 > 0; logs of each (not of their ratio) cannot overflow
        return np.sum(np.where(x > 0, x * (np.log2(np.where(x > 0, x, 1.0)) - log_middle), 0.0), axis=-1)

    return np.maximum(0.5 * part(p) + 0.5 * part(q), 0.0)
