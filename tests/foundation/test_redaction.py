"""The one URL redaction helper (banditgate.redaction), used by config errors and `banditgate
config`, the connections' start-up errors, the local stack's state and the gateway's start log."""

from __future__ import annotations

import doctest

from hypothesis import given
from hypothesis import strategies as st

import banditgate.redaction
import gateway.errors
from banditgate.redaction import redact_url


def test_docstring_examples() -> None:
    for module in (banditgate.redaction, gateway.errors):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@given(user=st.text(st.characters(blacklist_characters=":@"), max_size=8),
       password=st.text(st.characters(blacklist_characters="@"), max_size=16),
       tail=st.sampled_from(["h:1", "h:1/0", "[::1]:6379/2?ssl_cert_reqs=none", "h"]))
def test_the_password_never_survives(user: str, password: str, tail: str) -> None:
    # any password without an '@' (which a URL would have to escape), even one holding '/', '?', ':'
    assert redact_url(f"rediss://{user}:{password}@{tail}") == f"rediss://{user}:***@{tail}"


def test_urls_without_a_password_are_unchanged() -> None:
    for url in ("redis://127.0.0.1:16379/0", "redis://user@h:1", "unix:///tmp/redis.sock", "h:1", ""):
        assert redact_url(url) == url
