"""Hiding secrets in text we print: one helper for every URL that may carry a password (the
Redis URL in logs, `banditgate config` output, configuration errors and the local stack's state).
Imports nothing of ours, so `config.py`, `connections.py`, `stack.py` and the gateway all use it."""

from __future__ import annotations


def redact_url(url: str) -> str:
    """`url` with any password in it replaced by ``***`` (user names are kept: they are not secret).

    The credentials end at the last ``@`` of the whole text, not of the host part, so a password
    holding an unescaped ``/``, ``?`` or ``#`` is hidden too (at worst more than the password is).
    Text that is not a URL with credentials comes back unchanged.

    >>> redact_url("redis://user:s3cret@h:1/0"), redact_url("rediss://:s3cret@h:1")
    ('redis://user:***@h:1/0', 'rediss://:***@h:1')
    >>> redact_url("redis://user@h:1"), redact_url("redis://h:1/0"), redact_url("not a url")
    ('redis://user@h:1', 'redis://h:1/0', 'not a url')
    >>> redact_url("redis://:pa/ss@[::1]:6379/0")
    'redis://:***@[::1]:6379/0'
    """
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    credentials, host = rest.rsplit("@", 1)
    user, has_password, _password = credentials.partition(":")
    return f"{scheme}://{user}:***@{host}" if has_password else url
