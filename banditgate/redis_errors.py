"""What a Redis error means for the caller: wait and retry, fix the deployment, drop one item, or a
bug (pure: looks at the exception only; the feedback worker and the gateway share it).

Redis answers an operating condition with an error reply of a well-known code, and redis-py turns
some of them into exception classes of their own (``ReadOnlyError``, ``OutOfMemoryError``...)
and leaves the rest as a plain ``ResponseError`` whose message starts with the code (``BUSY``,
``MISCONF``, ``WRONGTYPE``...). A script that hits one inside ``redis.call`` returns it with the
same code, plus ``script: <sha>, on @user_script:<line>.``. So the class is looked up first, then
the message's first word. Redis before 7 (6.2 still ships) wraps a command's error inside a
script as ``ERR Error running script (call to f_<sha>): @user_script:12: -READONLY ...``: the code
inside is the one that counts.

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
import logging
import re
import time
from collections.abc import Callable
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
_SCRIPT_WRAPPERS = re.compile(r"^(?:Error running script \(call to f_[0-9a-f]+\): |@user_script: ?\d+: |-)+")
"""What Redis before 7 wraps around a command's error inside a script (``Error running script
(call to f_<sha>): @user_script:12: @user_script: 12: -READONLY ...``; an error table a script
returns from ``redis.pcall`` keeps the inner ``@user_script: 12: -READONLY ...``)."""


def reply_text(exc: BaseException) -> str:
    """The error reply's own text: without the note redis-py puts in front of an error raised
    from a pipeline (``Command # 3 (EVALSHA ...) of pipeline caused error: <reply>``) and without
    the script wrappers of Redis before 7."""
    text = str(exc.args[0]) if exc.args else ""
    if text.startswith("Command # ") and _PIPELINE_NOTE in text:
        text = text.split(_PIPELINE_NOTE, 1)[1]
    return _SCRIPT_WRAPPERS.sub("", text)


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of an error reply (``READONLY``, ``WRONGTYPE``...), None for others.

    The reply's first word when it is a code (a script passes a command's error on with its
    code); else the code redis-py took off the reply when it chose the exception class."""
    if isinstance(exc, rex.ResponseError):
        word = reply_text(exc).split(" ", 1)[0]
        if word.isupper() and word.isalpha() and word != "ERR":
            return word
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, str) and status else None


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
        message = reply_text(exc).removeprefix("ERR ")
        if any(message.startswith(text) for text in _REFUSED_MESSAGES):
            return REFUSED
        if "Script killed by user" in message:  # an operator's SCRIPT KILL (the answer to BUSY): nothing written
            return TRANSIENT
    return BUG


def retryable(exc: BaseException) -> bool:
    """Whether waiting and trying again can succeed (TRANSIENT or OPERATOR)."""
    return classify(exc) in (TRANSIENT, OPERATOR)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for a log line or a dead letter's error."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FailureEpisodes:
    """One log line when a background Redis writer starts failing (or fails in another way), one
    when it works again, and a callback per failure with its kind (a counter): an outage of minutes
    is two log lines, not one per attempt. A transient error is a warning; an operator error
    (someone must fix the deployment), a refusal or a bug (with its trace) are errors. The caller
    decides what to retry (the kind `failed` returns)."""

    def __init__(self, logger: logging.Logger, what: str, on_failure: Callable[[Kind], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._what = what
        self._on_failure = on_failure
        self._clock = clock
        self._kind: Kind | None = None
        self.failing_since: float | None = None
        """Clock reading of the episode's first failure; None while writes work."""

    def failed(self, exc: BaseException) -> Kind:
        kind = classify(exc)
        if self._on_failure is not None:
            self._on_failure(kind)
        if self.failing_since is None:
            self.failing_since = self._clock()
        elif kind == self._kind:
            return kind
        self._kind = kind
        if kind == TRANSIENT:
            self._log.warning("%s: Redis writes fail (%s); retrying, kept until they succeed", self._what,
                              one_line(exc))
        elif kind == OPERATOR:
            self._log.error("%s: Redis refuses us (%s): check the credentials and ACL; retrying meanwhile",
                            self._what, one_line(exc))
        else:
            self._log.error("%s: Redis refused a write for good (%s); it is dropped", self._what, one_line(exc),
                            exc_info=exc)
        return kind

    def succeeded(self) -> None:
        if self.failing_since is not None:
            self._log.info("%s: Redis writes work again after %.1f s", self._what, self._clock() - self.failing_since)
            self.failing_since = None
            self._kind = None


__all__ = [
    "BUG",
    "KINDS",
    "OPERATOR",
    "REFUSAL_CODE",
    "REFUSED",
    "TRANSIENT",
    "FailureEpisodes",
    "Kind",
    "classify",
    "error_code",
    "one_line",
    "reply_text",
    "retryable",
]
