"""Building blocks: the vectorized CUSUM equals the scalar recursion; effect sizes behave."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from banditgate.drift.cusum import cusum_batch
from banditgate.drift.effect import jensen_shannon, population_stability_index

# multiples of 1/8 add exactly in binary floating point and thresholds sit between them, so the
# comparison is exact: no tie can be decided differently by two correct summation orders
increments = hnp.arrays(np.float64, st.tuples(st.integers(0, 400), st.integers(1, 3)),
                        elements=st.integers(-16, 16).map(lambda k: k / 8))


@settings(max_examples=100, deadline=None)
@given(increments=increments, threshold_eighths=st.integers(0, 40), start_eighths=st.integers(0, 40))
def test_vectorized_cusum_equals_scalar_recursion(increments: np.ndarray, threshold_eighths: int,
                                                  start_eighths: int) -> None:
    threshold, start = threshold_eighths / 8 + 1 / 16, start_eighths / 8
    series = increments.shape[1]
    end, crossings = cusum_batch(increments, np.full(series, min(start, threshold)), np.full(series, threshold))
    expected = []
    for s in range(series):
        statistic = min(start, threshold)
        for row, increment in enumerate(increments[:, s]):
            statistic = max(0.0, statistic + increment)
            if statistic > threshold:
                expected.append((row, s))
                statistic = 0.0
        assert abs(end[s] - statistic) < 1e-9
    assert [(c.row, c.series) for c in crossings] == sorted(expected)


@st.composite
def distribution_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    size = draw(st.integers(2, 12))
    weights = hnp.arrays(np.float64, size, elements=st.floats(0.0, 1.0, allow_subnormal=False))
    p, q = draw(weights.filter(lambda a: a.sum() > 0.1)), draw(weights.filter(lambda a: a.sum() > 0.1))
    return (p / p.sum())[None], (q / q.sum())[None]


@settings(max_examples=100, deadline=None)
@given(pair=distribution_pairs())
def test_effect_sizes_are_zero_on_identity_and_bounded(pair: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pair
    mask = np.ones_like(p, dtype=bool)
    assert abs(population_stability_index(p, p, mask)[0]) < 1e-12
    assert jensen_shannon(p, p, mask)[0] < 1e-12
    assert population_stability_index(p, q, mask)[0] >= 0
    js = jensen_shannon(p, q, mask)[0]
    assert 0 <= js <= 1 + 1e-12 and abs(js - jensen_shannon(q, p, mask)[0]) < 1e-12
