"""Validate a batch of requests' inputs against a model's metadata and build its feeds (pure numpy).

The fast path converts a whole batch per input in one `np.array` call; only when that fails
(a wrong shape or type somewhere) does it fall back to row by row, to name the bad rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.models.onnx_runtime import OnnxModel, TensorSpec

_NUMERIC_KINDS = {"f": "fiub", "i": "iub", "u": "iub", "b": "b", "O": "UO"}


@dataclass
class ValidatedBatch:
    """Feeds for the rows that passed (in order) and the reasons the others did not."""

    feeds: dict[str, np.ndarray]
    ok: np.ndarray  # bool per input row
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (reason, message)

    @property
    def ok_rows(self) -> int:
        return int(self.ok.sum())


def _row_shape_matches(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def _convert(values: Sequence[Any], spec: TensorSpec) -> np.ndarray | None:
    """Whole-batch conversion, or None if any row is off (then the slow path names it)."""
    try:
        array = np.array(values) if spec.dtype != np.dtype(object) else np.array(values, dtype=object)
    except (ValueError, TypeError):
        return None
    if array.dtype.kind not in _NUMERIC_KINDS.get(spec.dtype.kind, "fiub") and spec.dtype.kind != "O":
        return None
    if not _row_shape_matches(array.shape[1:], spec.row_shape) or array.shape[0] != len(values):
        return None
    if spec.dtype.kind == "O":
        return array
    return array.astype(spec.dtype, copy=False)


def _check_row(value: Any, spec: TensorSpec) -> tuple[str, str] | None:
    if value is None:
        return ("missing_field", f"input {spec.name!r} is missing")
    try:
        array = np.array(value, dtype=object if spec.dtype.kind == "O" else None)
    except (ValueError, TypeError):
        return ("bad_input", f"input {spec.name!r} is ragged (rows of different lengths)")
    if spec.dtype.kind != "O" and array.dtype.kind not in _NUMERIC_KINDS.get(spec.dtype.kind, "fiub"):
        return ("wrong_type", f"input {spec.name!r} must hold {spec.datatype} numbers, got {array.dtype.kind!r} values")
    if not _row_shape_matches(array.shape, spec.row_shape):
        want = "x".join("?" if d is None else str(d) for d in spec.row_shape) or "scalar"
        got = "x".join(str(d) for d in array.shape) or "scalar"
        return ("bad_input", f"input {spec.name!r} has shape {got}, the model expects {want}")
    return None


def validate_batch(model: OnnxModel, rows: Sequence[Mapping[str, Any]]) -> ValidatedBatch:
    """Check each row's inputs (names, dtype, shape, finiteness, configured ranges); build feeds."""
    n = len(rows)
    ok = np.ones(n, dtype=bool)
    errors: dict[int, tuple[str, str]] = {}
    names = {spec.name for spec in model.inputs}
    for index, row in enumerate(rows):
        unknown = [k for k in row if k not in names]
        if unknown:
            ok[index] = False
            errors[index] = ("bad_input", f"unknown input {unknown[0]!r} for model {model.key} "
                                          f"(it takes {sorted(names)})")
    arrays: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        values = [row.get(spec.name) for row in rows]
        array = _convert(values, spec) if ok.all() else None
        if array is None:
            for index, value in enumerate(values):
                if ok[index]:
                    problem = _check_row(value, spec)
                    if problem:
                        ok[index] = False
                        errors[index] = problem
            good = [v for v, keep in zip(values, ok) if keep]
            array = _convert(good, spec) if good else np.empty((0, *[d or 0 for d in spec.row_shape]),
                                                                dtype=spec.dtype)
            if array is None:  # every row passed alone but they do not stack: dynamic dims differ
                for index in np.flatnonzero(ok):
                    ok[index] = False
                    errors[int(index)] = ("bad_input", f"input {spec.name!r} rows have different shapes in one batch")
                array = np.empty((0,), dtype=spec.dtype)
            arrays[spec.name] = _expand(array, ok)
        else:
            arrays[spec.name] = array
    # finiteness and ranges, vectorized over the batch
    for spec in model.inputs:
        array = arrays[spec.name]
        if spec.dtype.kind != "f" or array.size == 0:
            continue
        flat = array.reshape(array.shape[0], -1)
        bad = ok & ~np.isfinite(flat).all(axis=1)
        for index in np.flatnonzero(bad):
            ok[index] = False
            errors[int(index)] = ("not_finite", f"input {spec.name!r} holds NaN or infinity")
        if spec.name in model.ranges:
            low, high = model.ranges[spec.name]
            outside = (flat < low) | (flat > high)
            bad = ok & outside.any(axis=1)
            for index in np.flatnonzero(bad):
                column = int(np.flatnonzero(outside[index])[0])
                ok[index] = False
                errors[int(index)] = ("out_of_range",
                                      f"{model.feature_name(spec.name, column)} = {flat[index, column]:g} is outside "
                                      f"the model's range [{low[column]:g}, {high[column]:g}]")
    feeds = {name: array[ok] if not ok.all() else array for name, array in arrays.items()}
    return ValidatedBatch(feeds=feeds, ok=ok, errors=errors)


def _expand(good: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Place the good rows' array back at their positions (bad rows zero-filled, masked out later)."""
    if ok.all():
        return good
    full = np.zeros((len(ok), *good.shape[1:]), dtype=good.dtype)
    if good.shape[0]:
        full[ok] = good[: int(ok.sum())]
    return full


def validate_arrays(model: OnnxModel, feeds: Mapping[str, np.ndarray], max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Check whole tensors (OIP requests) against the model; return feeds cast to the model's dtypes.

    Raises InvalidInput naming the first problem (names, dtype, shape, finiteness, ranges).
    """
    from gateway.errors import InvalidInput

    expected = {spec.name: spec for spec in model.inputs}
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r} for model {model.key} (it takes {sorted(expected)})")
    missing = sorted(set(expected) - set(feeds))
    if missing:
        raise InvalidInput(f"input {missing[0]!r} is missing for model {model.key}")
    out: dict[str, np.ndarray] = {}
    rows = None
    for name, spec in expected.items():
        array = feeds[name]
        if array.ndim == len(spec.row_shape):  # one row without its batch dimension
            array = array[np.newaxis]
        if not _row_shape_matches(array.shape[1:], spec.row_shape):
            want = "x".join("?" if d is None else str(d) for d in spec.shape)
            raise InvalidInput(f"input {name!r} has shape {list(array.shape)}, the model expects [{want}]")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidInput(f"input {name!r} has {array.shape[0]} rows, other inputs have {rows}")
        if spec.dtype.kind == "O":
            out[name] = array.astype(object)
            continue
        if array.dtype.kind not in _NUMERIC_KINDS.get(spec.dtype.kind, "fiub"):
            raise InvalidInput(f"input {name!r} is {array.dtype}, the model takes {spec.datatype}")
        array = array.astype(spec.dtype, copy=False)
        if spec.dtype.kind == "f":
            flat = array.reshape(array.shape[0], -1)
            if not np.isfinite(flat).all():
                raise InvalidInput(f"input {name!r} holds NaN or infinity", reason="not_finite")
            if name in model.ranges:
                low, high = model.ranges[name]
                outside = (flat < low) | (flat > high)
                if outside.any():
                    row, column = (int(v[0]) for v in np.nonzero(outside))
                    raise InvalidInput(f"{model.feature_name(name, column)} = {flat[row, column]:g} is outside the "
                                       f"model's range [{low[column]:g}, {high[column]:g}]", reason="out_of_range")
        out[name] = array
    if max_rows is not None and rows is not None and rows > max_rows:
        raise InvalidInput(f"request has {rows} rows, over the limit of {max_rows}")
    return out
