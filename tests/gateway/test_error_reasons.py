"""The reason each error is counted under (banditgate_request_errors_total's `reason`): the class
attributes give the reasons the sidecar's old class-name table gave, and subclasses inherit them
along the MRO."""

from __future__ import annotations

import pytest

from gateway.errors import (
    Forbidden,
    GatewayError,
    InferenceFailed,
    InvalidInput,
    ModelError,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    error_reason,
)
from gateway.transport.http import UnsupportedMediaType, _Timeout, _TooLarge


@pytest.mark.parametrize(("error", "reason"), [
    (Overloaded("x"), "overloaded"),
    (TooManyRequests("x"), "overloaded"),
    (Unavailable("x"), "unavailable"),
    (ModelUnavailable("x"), "model_unavailable"),
    (ModelNotFound("x"), "model_unavailable"),
    (InferenceFailed("x"), "inference_failed"),
    (_Timeout("x"), "timeout"),
    (_TooLarge("x"), "oversize"),
    (TimeoutError(), "timeout"),
    (InvalidInput("x"), "bad_input"),
    (InvalidInput("x", "missing_field"), "missing_field"),
    (GatewayError("x"), "bad_input"),
    (ModelError("x"), "bad_input"),
    (Unauthorized("x"), "bad_input"),
    (Forbidden("x"), "bad_input"),
    (UnsupportedMediaType("x"), "bad_input"),
    (ValueError("x"), "bad_input"),
])
def test_each_error_has_the_reason_of_the_old_table(error: BaseException, reason: str) -> None:
    assert error_reason(error) == reason


def test_a_subclass_without_its_own_reason_answers_with_its_parents() -> None:
    class SlowDisk(InferenceFailed):
        pass

    class Deadline(TimeoutError):
        pass

    assert error_reason(SlowDisk("x")) == "inference_failed"
    assert error_reason(Deadline()) == "timeout"
    assert error_reason(KeyError("x"), default="internal") == "internal"
