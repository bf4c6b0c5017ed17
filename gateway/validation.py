"""Validate inputs against a model's metadata and build its feeds (pure numpy): the one place
every transport's values are checked — REST and gRPC tensors (`check_shape`, `numbers_for`,
`validate_arrays`) and Kafka rows (`validate_batch`).

Nothing is ever cast silently: an integer the target dtype cannot hold (INT8 300, UINT8 -1,
INT32 2**40) is `out_of_range`, so is a finite float beyond the target's largest (1e300 into
FP32); NaN and infinity are `not_finite`; a fraction for an integer input is `wrong_type`. Shapes
are multiplied out in Python integers (np.prod on int64 wraps: [2**32, 2**32] has 0 "elements").

The fast path converts a whole batch per input in one `np.array` call; only when that fails
(a wrong shape or type somewhere) does it fall back to row by row, to name the bad rows.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from banditgate.events import MAX_ID_CHARS
from banditgate.jsontypes import JSONValue
from gateway.errors import InvalidInput
from gateway.models.onnx_runtime import OIP_DATATYPES, OnnxModel, TensorSpec

_NUMERIC_KINDS = {"f": "fiub", "i": "iub", "u": "iub", "b": "b", "O": "UO"}
MAX_DIMS = 32
"""More dimensions than any model here takes (numpy's own limit is 64)."""


def check_request_id(request_id: str, rows: int = 1) -> None:
    """Raise InvalidInput (``bad_id``) unless every prediction id an OIP request of `rows` rows
    makes (its ``id``; ``<id>/<row>`` for several rows) has 1..MAX_ID_CHARS characters, the bound
    of the events contract (a Kafka request's request_id has it too): a longer id would make
    predictions the feedback worker refuses and unbounded CloudEvents ids.

    >>> check_request_id("r" * 256)
    >>> check_request_id("r" * 255, rows=10)
    Traceback (most recent call last):
    gateway.errors.InvalidInput: the request id has 255 characters; with 10 rows each prediction's id is '<id>/<row>', which may have at most 256 characters: send a shorter 'id'
    """
    longest = len(request_id) + (len(str(rows - 1)) + 1 if rows > 1 else 0)
    if not request_id or longest > MAX_ID_CHARS:
        if rows > 1:
            raise InvalidInput(f"the request id has {len(request_id)} characters; with {rows} rows each prediction's "
                               f"id is '<id>/<row>', which may have at most {MAX_ID_CHARS} characters: send a "
                               "shorter 'id'", "bad_id")
        raise InvalidInput(f"the request id has {len(request_id)} characters; it may have 1..{MAX_ID_CHARS}: "
                           "send a shorter 'id'", "bad_id")


def check_shape(shape: JSONValue, name: str, max_elements: int) -> int:
    """The element count of a tensor shape sent by a client; raise InvalidInput for anything but
    a short list of non-negative integers whose product is at most `max_elements`.

    Python integers, not np.prod: on int64 the product of [2**32, 2**32] wraps to 0. Every
    dimension is bounded too, so [0, 2**62] (no elements, an absurd dimension) is refused."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions, over the limit of {MAX_DIMS}")
    elements = 1
    for d in shape:
        if d < 0:
            raise InvalidInput(f"input {name!r}: negative dimension in shape {list(shape)}")
        if d > max_elements:
            raise InvalidInput(f"input {name!r}: dimension {d} is over the limit of {max_elements} elements")
        elements *= d  # at most 32 factors of at most max_elements: a few hundred bits, exact
    if elements > max_elements:
        raise InvalidInput(f"input {name!r} has shape {list(shape)}: {elements} elements, over the limit of "
                           f"{max_elements} (server.max_tensor_elements)")
    return elements


def _datatype(dtype: np.dtype) -> str:
    return OIP_DATATYPES.get(dtype) or dtype.name.upper()


def _limits(dtype: np.dtype) -> tuple[int | float, int | float]:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    info_f = np.finfo(dtype)
    return float(info_f.min), float(info_f.max)


def _outside(what: str, value: JSONValue, dtype: np.dtype) -> InvalidInput:
    low, high = _limits(dtype)
    bounds = f"[{low}, {high}]" if dtype.kind in "iu" else f"[{low:.6g}, {high:.6g}]"
    shown = value.item() if isinstance(value, np.generic) else value
    return InvalidInput(f"{what}: {shown!r} is outside the {_datatype(dtype)} range {bounds}", reason="out_of_range")


def checked_cast(array: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """`array` cast to `dtype`, and the element mask of values that cast could not hold (None when
    none can be out of range): integers beyond an integer dtype's bounds, finite numbers beyond a
    float dtype's largest (they would become infinity). NaN and infinity are not flagged (they are
    `not_finite`). Values under the mask are garbage in the cast: the caller refuses them."""
    source = array.dtype
    if source == dtype or source.kind == "b" or dtype.kind not in "iuf" or source.kind not in "iuf":
        return array.astype(dtype, copy=False), None
    if dtype.kind in "iu":
        if source.kind == "f":
            return array.astype(dtype, copy=False), None  # float into int is a type error, refused before
        have, want = np.iinfo(source), np.iinfo(dtype)
        mask = None
        # each bound is compared only when the source can pass it, so it is representable there
        if want.max < have.max:
            mask = array > source.type(want.max)
        if want.min > have.min:
            below = array < source.type(want.min)
            mask = below if mask is None else mask | below
        if mask is None:
            return array.astype(dtype, copy=False), None
        with np.errstate(over="ignore", invalid="ignore"):
            return array.astype(dtype, copy=False), mask
    if _widening(source, dtype):
        return array.astype(dtype, copy=False), None  # nothing can overflow (and nothing warns)
    if source.kind == "f" and array.size:
        largest = _largest(dtype)
        # the usual narrowing (JSON's float64 into FP32): two reductions instead of errstate and a mask
        # (NaN fails both comparisons and takes the long way)
        if -largest <= array.min() and array.max() <= largest:
            return array.astype(dtype, copy=False), None
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(dtype, copy=False)
    overflowed = np.isinf(cast)
    if not overflowed.any():
        return cast, None  # the usual case, without the second pass over the source
    return cast, (overflowed & ~np.isinf(array)) if source.kind == "f" else overflowed


@functools.cache
def _largest(dtype: np.dtype) -> float:
    """The largest finite value of the float `dtype` (cached: np.finfo is slow on a request's path)."""
    return float(np.finfo(dtype).max)


@functools.cache
def _widening(source: np.dtype, dtype: np.dtype) -> bool:
    """Whether every finite `source` number (integer or float) fits the float `dtype`'s range.
    Cached: the numeric dtypes are a handful, and np.finfo is slow on a request's path."""
    return float(np.finfo(dtype).max) >= float(np.finfo(source).max if source.kind == "f" else np.iinfo(source).max)


def _exact_integers(values: object) -> np.ndarray | None:
    """`values` as an object array of Python ints when every element is an integer (JSON ints
    beyond int64 make np.asarray give float64 or objects), else None."""
    try:
        array = np.array(values, dtype=object)
    except (ValueError, TypeError):
        return None
    flat = array.reshape(-1)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in flat):
        return array
    return None


def numbers_for(values: object, dtype: np.dtype, what: str) -> np.ndarray:
    """`values` (nested lists of JSON numbers, or an array) as an array of `dtype`, exactly:
    raise InvalidInput `wrong_type` for values of the wrong kind (a fraction for an integer
    input, a string for a number), `out_of_range` for numbers the dtype cannot hold, `bad_input`
    for ragged rows. `what` names the input in the message ("input 'x'")."""
    target = np.dtype(dtype)
    try:
        array = values if isinstance(values, np.ndarray) else np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidInput(f"{what} is ragged (rows of different lengths)") from None
    if target.kind in "iu" and array.dtype.kind in "fO":
        exact = _exact_integers(values)  # integers past int64: checked as Python ints
        if exact is not None:
            low, high = _limits(target)
            flat = exact.reshape(-1)
            for value in flat:
                if not low <= int(value) <= high:
                    raise _outside(what, int(value), target)
            return np.array([int(v) for v in flat], dtype=target).reshape(exact.shape)
    elif target.kind == "f" and array.dtype.kind == "O":
        exact = _exact_integers(values)
        if exact is not None:  # huge Python ints: a float input can hold many of them
            try:
                array = np.array([float(v) for v in exact.reshape(-1)], dtype=np.float64).reshape(exact.shape)
            except OverflowError:
                raise _outside(what, "an integer past 1e308", target) from None
    if array.dtype.kind not in _NUMERIC_KINDS.get(target.kind, "fiub"):
        kinds = {"f": "floats", "i": "integers", "u": "integers", "b": "booleans", "U": "strings", "S": "bytes",
                 "O": "mixed or non-numeric values"}
        raise InvalidInput(f"{what} must hold {_datatype(target)} values, got {kinds.get(array.dtype.kind, array.dtype.name)}",
                           reason="wrong_type")
    cast, bad = checked_cast(array, target)
    if bad is not None and bad.any():
        raise _outside(what, array.reshape(-1)[int(np.flatnonzero(bad.reshape(-1))[0])], target)
    return cast


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


def _convert(values: Sequence[JSONValue], spec: TensorSpec) -> np.ndarray | None:
    """Whole-batch conversion, or None if any row is off (then the slow path names it)."""
    try:
        array = np.array(values) if spec.dtype != np.dtype(object) else np.array(values, dtype=object)
    except (ValueError, TypeError):
        return None
    if array.dtype.kind not in _NUMERIC_KINDS.get(spec.dtype.kind, "fiub") and spec.dtype.kind != "O":
        return None
    if not _row_shape_matches(array.shape[1:], spec.row_shape) or array.shape[0] != len(values):
        return None
    return array  # in its own dtype: validate_batch checks the range before casting


def _check_row(value: JSONValue, spec: TensorSpec) -> tuple[str, str] | None:
    if value is None:
        return ("missing_field", f"input {spec.name!r} is missing")
    if spec.dtype.kind == "O":
        try:
            array = np.array(value, dtype=object)
        except (ValueError, TypeError):
            return ("bad_input", f"input {spec.name!r} is ragged (rows of different lengths)")
    else:
        try:
            array = numbers_for(value, spec.dtype, f"input {spec.name!r}")
        except InvalidInput as exc:
            return (exc.reason, str(exc))
    if not _row_shape_matches(array.shape, spec.row_shape):
        want = "x".join("?" if d is None else str(d) for d in spec.row_shape) or "scalar"
        got = "x".join(str(d) for d in array.shape) or "scalar"
        return ("bad_input", f"input {spec.name!r} has shape {got}, the model expects {want}")
    return None


def validate_batch(model: OnnxModel, rows: Sequence[Mapping[str, JSONValue]]) -> ValidatedBatch:
    """Check each row's inputs (names, dtype, shape, finiteness, configured ranges); build feeds."""
    n = len(rows)
    ok = np.ones(n, dtype=bool)
    errors: dict[int, tuple[str, str]] = {}
    names = {spec.name for spec in model.inputs}
    for index, row in enumerate(rows):
        unknown = [k for k in row if k not in names]
        if unknown:
            ok[index] = False
            errors[index] = ("bad_input", (f"unknown input {unknown[0]!r} for model {model.key} "
                                           f"(it takes {sorted(names)})"))
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
            if array is None and spec.dtype.kind != "O":
                # every row passed alone, but numpy made floats of them together (a row of ints
                # past int64 beside small ones): stack the rows as each was checked
                try:
                    array = np.stack([numbers_for(v, spec.dtype, spec.name) for v in good])
                except ValueError:
                    array = None
            if array is None:  # every row passed alone but they do not stack: dynamic dims differ
                for bad_row in np.flatnonzero(ok):
                    ok[bad_row] = False
                    errors[int(bad_row)] = ("bad_input", f"input {spec.name!r} rows have different shapes in one batch")
                array = np.empty((0,), dtype=spec.dtype)
            arrays[spec.name] = _expand(array, ok)
        else:
            arrays[spec.name] = array
    # the dtype's range (never wrapped), vectorized over the batch; then cast
    for spec in model.inputs:
        array = arrays[spec.name]
        if spec.dtype.kind == "O":
            continue
        cast, outside = checked_cast(array, spec.dtype)  # rows refused here may hold garbage: dropped
        if outside is not None and array.size:
            outside = outside.reshape(array.shape[0], -1)
            for bad_row in np.flatnonzero(ok & outside.any(axis=1)):
                column = int(np.flatnonzero(outside[bad_row])[0])
                refused = _outside(f"input {spec.name!r}", array.reshape(array.shape[0], -1)[bad_row, column],
                                   spec.dtype)
                ok[bad_row] = False
                errors[int(bad_row)] = (refused.reason, str(refused))
        arrays[spec.name] = cast
    # finiteness and configured ranges, vectorized over the batch
    for spec in model.inputs:
        array = arrays[spec.name]
        if spec.dtype.kind != "f" or array.size == 0:
            continue
        flat = array.reshape(array.shape[0], -1)
        bad = ok & ~np.isfinite(flat).all(axis=1)
        for bad_row in np.flatnonzero(bad):
            ok[bad_row] = False
            errors[int(bad_row)] = ("not_finite", f"input {spec.name!r} holds NaN or infinity")
        if spec.name in model.ranges:
            low, high = model.ranges[spec.name]
            outside = (flat < low) | (flat > high)
            bad = ok & outside.any(axis=1)
            for bad_row in np.flatnonzero(bad):
                column = int(np.flatnonzero(outside[bad_row])[0])
                ok[bad_row] = False
                errors[int(bad_row)] = ("out_of_range",
                                        (f"{model.feature_name(spec.name, column)} = {flat[bad_row, column]:g} is "
                                         f"outside the model's range [{low[column]:g}, {high[column]:g}]"))
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

    Raises InvalidInput naming the first problem (names, dtype, shape, the dtype's range,
    finiteness, configured ranges).
    """
    expected = {spec.name: spec for spec in model.inputs}
    if feeds.keys() != expected.keys():
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
            raise InvalidInput(f"input {name!r} is {_datatype(array.dtype)}, the model takes {spec.datatype}",
                               reason="wrong_type")
        if array.dtype != spec.dtype:  # numbers_for is the identity on an array of the model's dtype already
            array = numbers_for(array, spec.dtype, f"input {name!r}")  # INT64 2**40 into INT32: out_of_range
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
