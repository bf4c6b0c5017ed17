"""Input values are refused at the edge, never wrapped (pure validation, property-based): the one
path every transport takes (gateway/validation.py) for integers outside the dtype's range, finite
floats beyond it, fractions for integer inputs, and shapes whose element count overflows."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidInput
from gateway.models.onnx_runtime import TensorSpec
from gateway.transport.oip_codec import parse_rest_infer
from gateway.validation import check_shape, numbers_for, validate_arrays, validate_batch

INT_DTYPES = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)]
FLOAT_DTYPES = [np.dtype(t) for t in (np.float16, np.float32, np.float64)]
# JSON integers as orjson decodes them (beyond uint64 they become floats), and then some
json_ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([127, 128, -128, -129, 255, 256, -1, 2**31,
                                                                          2**40, -(2**31) - 1, 2**63, 2**64 - 1]))


def _model(dtype: np.dtype, width: int = 3) -> Any:
    """What validate_batch / validate_arrays read of a model: its inputs, ranges and key."""
    return SimpleNamespace(inputs=(TensorSpec("x", dtype, (None, width)),), ranges={}, key="m:1",
                           feature_name=lambda name, column: f"{name}[{column}]")


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(INT_DTYPES), values=st.lists(json_ints, min_size=1, max_size=6))
def test_integers_are_exact_or_out_of_range_never_wrapped(dtype: np.dtype, values: list[int]) -> None:
    info = np.iinfo(dtype)
    inside = all(info.min <= v <= info.max for v in values)
    if inside:
        assert numbers_for(values, dtype, "input 'x'").tolist() == values
    else:
        with pytest.raises(InvalidInput) as caught:
            numbers_for(values, dtype, "input 'x'")
        assert caught.value.reason == "out_of_range" and f"{np.dtype(dtype).name.upper()}" in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from(INT_DTYPES), target=st.sampled_from(INT_DTYPES), data=st.data())
def test_integer_arrays_cast_between_dtypes_exactly_or_out_of_range(source: np.dtype, target: np.dtype,
                                                                    data: st.DataObject) -> None:
    """What REST binary / gRPC raw tensors go through: INT64 2**40 into an INT32 model, UINT8 into INT8..."""
    have = np.iinfo(source)
    values = data.draw(st.lists(st.integers(int(have.min), int(have.max)), min_size=1, max_size=6))
    array = np.array(values, dtype=source)
    want = np.iinfo(target)
    if all(want.min <= v <= want.max for v in values):
        assert numbers_for(array, target, "input 'x'").tolist() == values
    else:
        with pytest.raises(InvalidInput, match="is outside the"):
            numbers_for(array, target, "input 'x'")


@settings(max_examples=300, deadline=None)
@given(target=st.sampled_from(FLOAT_DTYPES),
       values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=6))
def test_finite_floats_stay_finite_or_are_out_of_range(target: np.dtype, values: list[float]) -> None:
    largest = float(np.finfo(target).max)
    try:
        out = numbers_for(values, target, "input 'x'")
    except InvalidInput as exc:
        assert exc.reason == "out_of_range"
        assert any(abs(v) > largest for v in values)
    else:
        assert np.isfinite(out).all() and out.dtype == target


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.one_of(st.integers(-3, 10), st.integers(-(2**70), 2**70)), max_size=40),
       limit=st.integers(1, 10**7))
def test_shapes_count_in_python_integers(shape: list[int], limit: int) -> None:
    try:
        count = check_shape(shape, "x", limit)
    except InvalidInput as exc:
        assert exc.http_status == 400
        assert (any(d < 0 or d > limit for d in shape) or len(shape) > 32
                or math.prod(shape) > limit)
    else:
        assert count == math.prod(shape) <= limit and all(0 <= d <= limit for d in shape)


def test_the_issue_shapes_and_values_over_rest_decoding() -> None:
    def body(**tensor: Any) -> bytes:
        return orjson.dumps({"inputs": [{"name": "x", **tensor}]})

    # np.prod([2**32, 2**32]) on int64 is 0: the old check let it through and the request failed with a 500
    with pytest.raises(InvalidInput, match="over the limit"):
        parse_rest_infer(body(shape=[4294967296, 4294967296], datatype="FP32", data=[]), None, 4_000_000, 64)
    with pytest.raises(InvalidInput, match="over the limit"):
        parse_rest_infer(body(shape=[65536, 65536, 65536, 65536], datatype="FP32", data=[]), None, 4_000_000, 64)
    with pytest.raises(InvalidInput) as caught:
        parse_rest_infer(body(shape=[1, 3], datatype="INT8", data=[1, 300, 2]), None, 4_000_000, 64)
    assert caught.value.reason == "out_of_range" and "300 is outside the INT8 range [-128, 127]" in str(caught.value)
    with pytest.raises(InvalidInput) as caught:
        parse_rest_infer(body(shape=[1, 1], datatype="UINT8", data=[-1]), None, 4_000_000, 64)
    assert caught.value.reason == "out_of_range"
    with pytest.raises(InvalidInput) as caught:
        parse_rest_infer(body(shape=[1, 1], datatype="INT32", data=[1.5]), None, 4_000_000, 64)
    assert caught.value.reason == "wrong_type"  # a fraction is not truncated into an integer input
    parsed = parse_rest_infer(body(shape=[1, 3], datatype="INT8", data=[-128, 0, 127]), None, 4_000_000, 64)
    assert parsed.inputs[0].array.tolist() == [[-128, 0, 127]] and parsed.inputs[0].array.dtype == np.int8


def test_validate_arrays_refuses_what_the_model_dtype_cannot_hold() -> None:
    model = _model(np.dtype(np.int8))
    with pytest.raises(InvalidInput) as caught:
        validate_arrays(model, {"x": np.array([[1, 300, 2]], dtype=np.int32)})
    assert caught.value.reason == "out_of_range"
    with pytest.raises(InvalidInput) as caught:
        validate_arrays(model, {"x": np.array([[1.0, 2.0, 3.0]], dtype=np.float32)})
    assert caught.value.reason == "wrong_type"
    assert validate_arrays(model, {"x": np.array([[1, -128, 127]], dtype=np.int64)})["x"].dtype == np.int8
    floats = _model(np.dtype(np.float32))
    with pytest.raises(InvalidInput) as caught:
        validate_arrays(floats, {"x": np.array([[1.0, 1e300, 2.0]])})
    assert caught.value.reason == "out_of_range"
    with pytest.raises(InvalidInput) as caught:
        validate_arrays(floats, {"x": np.array([[1.0, np.nan, 2.0]])})
    assert caught.value.reason == "not_finite"


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from([np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.int64)]),
       rows=st.lists(st.lists(json_ints, min_size=3, max_size=3), min_size=1, max_size=8))
def test_kafka_rows_out_of_range_are_refused_one_by_one(dtype: np.dtype, rows: list[list[int]]) -> None:
    info = np.iinfo(dtype)
    checked = validate_batch(_model(dtype), [{"x": row} for row in rows])
    expected_ok = [all(info.min <= v <= info.max for v in row) for row in rows]
    assert checked.ok.tolist() == expected_ok
    assert {index: reason for index, (reason, _m) in checked.errors.items()} == \
        {index: "out_of_range" for index, ok in enumerate(expected_ok) if not ok}
    good = [row for row, ok in zip(rows, expected_ok) if ok]
    if good:
        assert checked.feeds["x"].tolist() == good and checked.feeds["x"].dtype == dtype


def test_kafka_rows_with_fractions_nan_and_huge_floats() -> None:
    ints = validate_batch(_model(np.dtype(np.int32)), [{"x": [1, 2, 3]}, {"x": [1.5, 2, 3]}])
    assert ints.ok.tolist() == [True, False] and ints.errors[1][0] == "wrong_type"
    floats = validate_batch(_model(np.dtype(np.float32)),
                            [{"x": [1.0, 2.0, 3.0]}, {"x": [1e300, 0.0, 0.0]}, {"x": [float("nan"), 0.0, 0.0]}])
    assert floats.ok.tolist() == [True, False, False]
    assert floats.errors[1][0] == "out_of_range" and floats.errors[2][0] == "not_finite"
