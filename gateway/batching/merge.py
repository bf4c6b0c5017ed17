"""Merge queued requests into one model batch and split the results back (pure numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Feeds = dict[str, np.ndarray]


def concat_feeds(items: Sequence[Feeds]) -> Feeds:
    """Concatenate several requests' inputs along the batch axis (all must have the same names)."""
    if len(items) == 1:
        return items[0]
    names = items[0].keys()
    return {name: np.concatenate([item[name] for item in items], axis=0) for name in names}


def slice_feeds(feeds: Feeds, start: int, stop: int) -> Feeds:
    return {name: array[start:stop] for name, array in feeds.items()}


def concat_outputs(parts: Sequence[Feeds]) -> Feeds:
    if len(parts) == 1:
        return parts[0]
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split_results(outputs: Feeds, ok: np.ndarray, sizes: Sequence[int]) -> list[tuple[Feeds, np.ndarray]]:
    """Split a batch's outputs back into per-item pieces.

    `ok` marks, for each input row of the batch, whether it produced an output row; `outputs`
    holds rows only for ok rows, in order. Each piece is (outputs for that item's ok rows,
    that item's ok mask).
    """
    if int(sum(sizes)) != len(ok):
        raise ValueError(f"sizes add up to {sum(sizes)} but the batch has {len(ok)} rows")
    pieces = []
    row = 0
    out_row = 0
    for size in sizes:
        mask = ok[row:row + size]
        good = int(mask.sum())
        pieces.append(({name: array[out_row:out_row + good] for name, array in outputs.items()}, mask))
        row += size
        out_row += good
    return pieces
