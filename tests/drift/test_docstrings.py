"""The drift modules' docstring examples run as written."""

from __future__ import annotations

import doctest

import pytest

from banditgate.drift import bernoulli_cusum, monitor


@pytest.mark.parametrize("module", [monitor, bernoulli_cusum], ids=lambda m: m.__name__)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0
