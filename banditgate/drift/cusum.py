"""One-sided CUSUM over many series at once, evaluated at every observation of a batch.

The Lindley recursion S_t = max(0, S_{t-1} + x_t) has the closed form
S_t = W_t - min(-S_0, min_{s<=t} W_s) with W the running sum of increments, so a whole batch
is a running sum and a running minimum per series, computed for all series at once (see
_chunked_paths for how that is made fast). When a series crosses its threshold the alarm is
recorded at that row and the series restarts from zero at the next row; only that series'
batch is recomputed, and alarms are rare, so that loop runs about once per alarm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Crossing:
    """A threshold crossing: series index, row within the batch, statistic at that row."""

    series: int
    row: int
    statistic: float


def _lindley(increments: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Statistic path of one series (1-D increments) from `start`."""
    running = np.cumsum(increments)
    floor = np.minimum.accumulate(running)
    np.minimum(floor, -start, out=floor)
    np.subtract(running, floor, out=running)
    return running


def _chunked_paths(increments: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Statistic paths for [rows, series] increments, laid out [row in chunk, chunk, series].

    numpy's cumulative sums run one series at a time with a dependency chain per element; here
    the batch is cut into chunks per series and all chunks of all series advance together, one
    vector operation per row of a chunk, then the chunks are stitched: with per-chunk sums W and
    running minima M, and the exact minimum P of everything before a chunk (including -S_0),
    S = W - min(M, P - offset) for the chunk's offset (sum of the chunks before it).
    Zero increments pad the last chunk; they leave the statistic unchanged.
    """
    rows, series = increments.shape
    chunks = max(1, min(rows // 64, max(1, 4096 // series)))
    length = -(-rows // chunks)
    padded = np.zeros((chunks * length, series))
    padded[:rows] = increments
    local = padded.reshape(chunks, length, series).transpose(1, 0, 2)
    running = np.empty((length, chunks, series))
    floor = np.empty((length, chunks, series))
    running[0] = local[0]
    floor[0] = local[0]
    for row in range(1, length):
        np.add(running[row - 1], local[row], out=running[row])
        np.minimum(floor[row - 1], running[row], out=floor[row])
    totals, minima = running[-1], floor[-1]
    offsets = np.zeros((chunks, series))
    np.cumsum(totals[:-1], axis=0, out=offsets[1:])
    before = np.empty((chunks, series))
    before[0] = -start
    if chunks > 1:
        np.minimum.accumulate(offsets[:-1] + minima[:-1], axis=0, out=before[1:])
        np.minimum(before[1:], -start, out=before[1:])
    np.minimum(floor, before - offsets, out=floor)
    np.subtract(running, floor, out=running)
    return running


def cusum_batch(increments: np.ndarray, start: np.ndarray, threshold: np.ndarray,
                ) -> tuple[np.ndarray, list[Crossing]]:
    """Run CUSUMs over a batch.

    increments: [rows, series]; start: statistic per series before the batch (>= 0);
    threshold: per series (> 0). Returns the statistic per series after the last row and the
    crossings sorted by row. A crossing is `statistic > threshold`; the series then restarts at 0.
    """
    rows, _ = increments.shape
    start = np.asarray(start, dtype=float)
    if rows == 0:
        return start.copy(), []
    paths = _chunked_paths(increments, start)
    end = paths[-1, -1].copy()
    crossed = np.flatnonzero(paths.max(axis=(0, 1)) > threshold)
    crossings: list[Crossing] = []
    for index in crossed.tolist():
        # rare: redo this series in stream order, restarting after each crossing
        column = np.ascontiguousarray(increments[:, index])
        limit = float(threshold[index])
        path = paths[:, :, index].T.ravel()[:rows]  # stream order: the chunk paths up to the first crossing
        offset = 0
        while True:
            row = int(np.argmax(path > limit))
            crossings.append(Crossing(index, offset + row, float(path[row])))
            offset += row + 1
            if offset >= rows:
                end[index] = 0.0
                break
            path = _lindley(column[offset:], np.zeros(()))
            if not path.max() > limit:
                end[index] = path[-1]
                break
    crossings.sort(key=lambda crossing: (crossing.row, crossing.series))
    return end, crossings


def count_crossings(increments: np.ndarray, start: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """cusum_batch with one threshold for every series, counting crossings (for calibration)."""
    end, crossings = cusum_batch(increments, start, np.full(increments.shape[1], threshold))
    return end, len(crossings)
