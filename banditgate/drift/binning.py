"""Maps live values to the reference profile's bins, a column at a time.

Bin layout per feature, shared with the monitors: the value bins first (numeric quantile bins,
or top-k categories then "other"), then one "missing" bin last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from banditgate.drift.reference import FeatureProfile, is_missing


class DriftInputError(ValueError):
    """A batch handed to a drift monitor has the wrong shape or names; one line saying which."""

    user_facing = True


class Binner:
    """Assigns bin indices for a fixed list of features (vectorized over the whole batch)."""

    def __init__(self, features: Sequence[FeatureProfile]) -> None:
        self.features = list(features)
        self.names = [feature.name for feature in self.features]
        self.bin_counts = np.array([feature.bin_count for feature in self.features], dtype=np.int64)
        self._numeric = np.array([f.kind == "numeric" for f in self.features])
        numeric = [f for f in self.features if f.kind == "numeric"]
        # edges [edge, numeric feature], NaN-padded: x >= NaN is False, so padding never counts
        self._edges = np.full((max((len(f.edges) for f in numeric), default=0), len(numeric)), np.nan)
        for column, feature in enumerate(numeric):
            self._edges[:len(feature.edges), column] = feature.edges
        self._numeric_missing_bin = np.array([f.bin_count - 1 for f in numeric], dtype=np.int64)
        self._numeric_codes: list[tuple[np.ndarray, np.ndarray] | None] = []
        self._text_lookup: list[dict[str, int]] = []
        for feature in self.features:
            self._text_lookup.append({str(category): index for index, category in enumerate(feature.categories)})
            codes = [c for c in feature.categories if isinstance(c, (int, float))]
            if feature.kind == "categorical" and len(codes) == len(feature.categories):
                # numeric category codes match numeric input with one searchsorted, no Python loop
                order = np.argsort(np.asarray(codes, dtype=float), kind="stable")
                self._numeric_codes.append((np.asarray(codes, dtype=float)[order], order))
            else:
                self._numeric_codes.append(None)

    @property
    def state_bytes(self) -> int:
        return int(self._edges.nbytes)

    def assign(self, rows: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """Bin indices [rows, features] (small ints). `rows` is [rows, features] in profile order or a
        mapping name -> column. Raises DriftInputError on a wrong shape or missing names."""
        if isinstance(rows, Mapping):
            columns = self._mapping_columns(rows)
            length = len(columns[0])
            numeric_block = (np.column_stack([columns[i] for i in np.flatnonzero(self._numeric)]).astype(float)
                             if self._numeric.any() else np.zeros((length, 0)))
        else:
            array = np.asarray(rows)
            if array.ndim == 1 and len(self.features) == 1:
                array = array[:, None]
            if array.ndim != 2 or array.shape[1] != len(self.features):
                raise DriftInputError(f"batch must be [rows, {len(self.features)}], got shape {array.shape}")
            length = array.shape[0]
            columns = [array[:, index] for index in range(array.shape[1])]
            block = array if self._numeric.all() else array[:, self._numeric]
            try:
                numeric_block = block.astype(float, copy=False)
            except (TypeError, ValueError):
                raise DriftInputError("numeric features got values that are not numbers") from None
        if self._numeric.all():
            return self._assign_numeric(numeric_block)
        bins = np.empty((length, len(self.features)), dtype=np.int16)
        if self._numeric.any():
            bins[:, self._numeric] = self._assign_numeric(numeric_block)
        for index in np.flatnonzero(~self._numeric).tolist():
            bins[:, index] = self._assign_categorical(index, np.asarray(columns[index]))
        return bins

    def _mapping_columns(self, rows: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        absent = [name for name in self.names if name not in rows]
        if absent:
            raise DriftInputError(f"batch lacks features {absent}")
        columns = [np.asarray(rows[name]).ravel() for name in self.names]
        if len({len(column) for column in columns}) > 1:
            raise DriftInputError("batch columns have different lengths")
        for index in np.flatnonzero(self._numeric).tolist():
            if columns[index].dtype.kind not in "iufb":
                raise DriftInputError(f"feature {self.names[index]!r}: values are not numeric")
        return columns

    def _assign_numeric(self, values: np.ndarray) -> np.ndarray:
        # bin = number of edges <= x: one compare-and-add pass per edge over the whole batch beats
        # a binary search per column (branch-free, no per-column Python call)
        small = self._edges.shape[0] < 127
        bins = np.zeros(values.shape, dtype=np.int8 if small else np.int16)
        above = np.empty(values.shape, dtype=bool)
        step = above.view(np.int8) if small else above  # adding int8 to int8 skips a cast
        for edge in self._edges:
            np.greater_equal(values, edge, out=above)
            bins += step
        # NaN is missing; one column sum finds the columns that may hold one
        suspect = np.flatnonzero(np.isnan(values.sum(axis=0)))
        for column in suspect.tolist():
            missing = np.isnan(values[:, column])
            bins[missing, column] = self._numeric_missing_bin[column]
        return bins

    def _assign_categorical(self, index: int, column: np.ndarray) -> np.ndarray:
        feature = self.features[index]
        missing_bin = feature.bin_count - 1
        other_bin = missing_bin - 1
        codes = self._numeric_codes[index]
        if codes is not None and column.dtype.kind in "iufb":
            values = column.astype(float, copy=False)
            sorted_codes, order = codes
            if sorted_codes.size == 0:
                bins = np.full(values.shape, other_bin, dtype=np.int64)
            else:
                position = np.minimum(np.searchsorted(sorted_codes, values), sorted_codes.size - 1)
                bins = np.where(sorted_codes[position] == values, order[position], other_bin)
            bins[np.isnan(values)] = missing_bin
            return bins
        # text or mixed categories: map the few distinct values through a dict
        missing = is_missing(column)
        if column.dtype.kind == "O":
            text = np.array([str(value) for value in column.tolist()], dtype=str)
        else:
            text = column.astype(str)
        uniques, inverse = np.unique(text, return_inverse=True)
        lookup = self._text_lookup[index]
        mapped = np.array([lookup.get(u, other_bin) for u in uniques.tolist()], dtype=np.int64)
        bins = mapped[inverse.ravel()] if mapped.size else np.zeros(0, dtype=np.int64)
        bins[missing] = missing_bin
        return bins
