"""What a Redis error means for the caller: wait and retry, fix the deployment, drop one item, or a
bug (pure: looks at the exception only; the feedback worker and the gateway share it).

Redis answers an operating condition with an error reply of a well-known code, and redis-py turns
some of them into exception classes of their own (``ReadOnlyError``, ``OutOfMemoryError``...)
and leaves the rest as a plain ``ResponseError`` whose message starts with the code (``BUSY``,
``MISCONF``, ``WRONGTYPE``...). A script that hits one inside ``redis.call`` returns it with the
same code, plus ``script: <sha>, on @user_script:<line>.``. So the class is looked up first, then
the message's first word.

* :data:`TRANSIENT` — the server cannot take this now but will: the connection, a timeout,
  ``LOADING``, ``READONLY`` (a failover: the old primary is a replica now), ``OOM`` (maxmemory with
  ``noeviction``), ``BUSY`` (a long script), ``TRYAGAIN``, ``MASTERDOWN``, ``CLUSTERDOWN``,
  ``MISCONF`` (persistence failing), ``NOREPLICAS``, ``NOSCRIPT`` (a flushed script cache: the
  client loads it again on the retry), and too many clients. Retry with backoff, nothing lost.
* :data:`OPERATOR` — the deployment refuses us: ``NOPERM`` (an ACL without a key or command we
  need), ``NOAUTH`` / ``WRONGPASS``. Nothing we could send would succeed, but nothing about the
  *data* is wrong either: dead-lettering every outcome because an operator broke an ACL would lose
  them all. So it is retried like an outage (nothing acknowledged meanwhile, nothing lost) and
  logged at error level, so that someone fixes it.
* :data:`REFUSED` — this call's own data can never succeed: our scripts' argument checks
  (``BGREFUSED``, see :data:`REFUSAL_CODE`), ``WRONGTYPE`` (a key of ours holds another type), a
  stored field that is not a number. Every script that writes checks these before its first write,
  so a refused call changed nothing: find the item(s) that cause it and drop exactly those.
* :data:`BUG` — anything else (a script syntax or runtime error, a wrong number of arguments):
  our own defect; the caller stops rather than guess.

>>> from redis.exceptions import ReadOnlyError, ResponseError
>>> classify(ReadOnlyError("You can't write against a read only replica."))
'transient'
>>> classify(ResponseError("BUSY Redis is busy running a script."))
'transient'
>>> classify(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
'refused'
>>> classify(ResponseError("user_script:3: attempt to perform arithmetic on a nil value"))
'bug'
"""

from __future__ import annotations

import asyncio
from typing import Final, Literal

from redis import exceptions as rex

Kind = Literal["transient", "operator", "refused", "bug"]
TRANSIENT: Final = "transient"
OPERATOR: Final = "operator"
REFUSED: Final = "refused"
BUG: Final = "bug"
KINDS: tuple[Kind, ...] = (TRANSIENT, OPERATOR, REFUSED, BUG)

REFUSAL_CODE = "BGREFUSED"
"""The error code our Lua scripts reply with when they refuse their arguments (before any write)."""

_TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.OutOfMemoryError, rex.TryAgainError,
    rex.ClusterDownError, rex.NoScriptError, OSError, asyncio.TimeoutError, TimeoutError,
)
"""ConnectionError covers BusyLoadingError (LOADING) and too many clients; ClusterDownError
covers MasterDownError. Authentication and authorization errors are ConnectionErrors too, so
they are looked up first (:data:`_OPERATOR_CLASSES`)."""

_OPERATOR_CLASSES: tuple[type[BaseException], ...] = (
    rex.NoPermissionError, rex.AuthenticationError, rex.AuthorizationError,
)

_TRANSIENT_CODES = frozenset({"LOADING", "READONLY", "OOM", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN",
                              "MISCONF", "NOREPLICAS", "NOSCRIPT"})
_OPERATOR_CODES = frozenset({"NOPERM", "NOAUTH", "WRONGPASS"})
_REFUSED_CODES = frozenset({REFUSAL_CODE, "WRONGTYPE"})
_REFUSED_MESSAGES = ("hash value is not a float", "value is not a valid float", "hash value is not an integer",
                     "value is not an integer or out of range", "increment would produce NaN or Infinity")
"""``ERR`` replies (redis-py drops the ``ERR``) about a stored value we cannot add to."""


_PIPELINE_NOTE = " of pipeline caused error: "


def reply_text(exc: BaseException) -> str:
    """The error reply's text, without the note redis-py puts in front of an error raised from a
    pipeline (``Command # 3 (EVALSHA ...) of pipeline caused error: <reply>``)."""
    text = str(exc.args[0]) if exc.args else ""
    if text.startswith("Command # ") and _PIPELINE_NOTE in text:
        text = text.split(_PIPELINE_NOTE, 1)[1]
    return text


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of an error reply (``READONLY``, ``WRONGTYPE``...), None for others."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, str) and status:
        return status
    if not isinstance(exc, rex.ResponseError):
        return None
    word = reply_text(exc).split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() else None


def classify(exc: BaseException) -> Kind:
    """Which of :data:`KINDS` `exc` is (see the module docstring). Never raises."""
    if isinstance(exc, _OPERATOR_CLASSES):
        return OPERATOR
    if isinstance(exc, _TRANSIENT_CLASSES):
        return TRANSIENT
    if not isinstance(exc, rex.RedisError):
        return BUG
    code = error_code(exc)
    if code in _OPERATOR_CODES:
        return OPERATOR
    if code in _TRANSIENT_CODES:
        return TRANSIENT
    if code in _REFUSED_CODES:
        return REFUSED
    if isinstance(exc, rex.ResponseError):
        message = reply_text(exc)
        if any(message.startswith(text) for text in _REFUSED_MESSAGES):
            return REFUSED
    return BUG


def retryable(exc: BaseException) -> bool:
    """Whether waiting and trying again can succeed (TRANSIENT or OPERATOR)."""
    return classify(exc) in (TRANSIENT, OPERATOR)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for a log line or a dead letter's error."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["BUG", "KINDS", "OPERATOR", "REFUSAL_CODE", "REFUSED", "TRANSIENT", "Kind", "classify", "error_code",
           "one_line", "reply_text", "retryable"]
