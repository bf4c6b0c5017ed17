"""banditgate.redis_errors: each Redis error reply as redis-py raises it (its own parser turns the
reply text into the exception), and as a script or a pipeline passes it on."""

from __future__ import annotations

import asyncio
import doctest
import logging

import pytest
from redis import exceptions as rex
from redis._parsers.base import BaseParser

from banditgate import redis_errors
from banditgate.redis_errors import BUG, OPERATOR, REFUSED, TRANSIENT, classify

SCRIPT = " script: 0ca79032d37852f7b9b1af3ff1a8169731d3efbd, on @user_script:12."


def reply(text: str) -> BaseException:
    """The exception redis-py raises for the error reply `text` (without the leading '-')."""
    return BaseParser.parse_error(text)


@pytest.mark.parametrize(("text", "kind"), [
    ("READONLY You can't write against a read only replica.", TRANSIENT),
    ("READONLY You can't write against a read only replica." + SCRIPT, TRANSIENT),
    ("OOM command not allowed when used memory > 'maxmemory'.", TRANSIENT),
    ("OOM command not allowed when used memory > 'maxmemory'." + SCRIPT, TRANSIENT),
    ("LOADING Redis is loading the dataset in memory", TRANSIENT),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", TRANSIENT),
    ("TRYAGAIN Multiple keys request during rehashing of slot", TRANSIENT),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", TRANSIENT),
    ("CLUSTERDOWN The cluster is down", TRANSIENT),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.", TRANSIENT),
    ("NOREPLICAS Not enough good replicas to write.", TRANSIENT),
    ("NOSCRIPT No matching script. Please use EVAL.", TRANSIENT),
    ("ERR max number of clients reached", TRANSIENT),
    ("NOPERM User bg has no permissions to run the 'evalsha' command", OPERATOR),
    ("NOPERM No permissions to access a key" + SCRIPT, OPERATOR),
    ("NOAUTH Authentication required.", OPERATOR),
    ("WRONGPASS invalid username-password pair or user is disabled.", OPERATOR),
    ("BGREFUSED item 3: reward nan is not a number in [-1e15, 1e15]", REFUSED),
    ("WRONGTYPE Operation against a key holding the wrong kind of value" + SCRIPT, REFUSED),
    ("ERR hash value is not a float", REFUSED),
    ("ERR hash value is not a float" + SCRIPT, REFUSED),
    ("ERR value is not an integer or out of range", REFUSED),
    ("ERR user_script:3: attempt to perform arithmetic on a nil value" + SCRIPT, BUG),
    ("ERR Error compiling script (new function): user_script:1: '=' expected near 'x'", BUG),
    ("ERR wrong number of arguments for 'hmget' command", BUG),
    # Redis 6.2: a command's error inside a script, raised by redis.call or returned from redis.pcall
    ("ERR Error running script (call to f_e44a100d118df6cbe073953627691bacb1dcbe14): @user_script:1: @user_script: 1: "
     "-READONLY You can't write against a read only replica.", TRANSIENT),
    ("@user_script: 1: -READONLY You can't write against a read only replica.", TRANSIENT),
    ("ERR Error running script (call to f_17de6efb9ce1aa2c904beef238f3a075e21ecd5d): @user_script:1: @user_script: 1: "
     "-OOM command not allowed when used memory > 'maxmemory'.", TRANSIENT),
    ("@user_script: 52: -OOM command not allowed when used memory > 'maxmemory'.", TRANSIENT),
    ("ERR Error running script (call to f_a74fc5e9f94f2ccf101d4770a460d9fa8eabe94e): @user_script:1: WRONGTYPE "
     "Operation against a key holding the wrong kind of value", REFUSED),
    ("ERR Error running script (call to f_8e201e9b3f4a0962305dd4065b53e81d8cefa1af): @user_script:1: ERR hash value "
     "is not a float", REFUSED),
    ("ERR Error running script (call to f_cd204846b476dfdb7c087f1a1cef2df50cc9a6e7): @user_script:1: user_script:1: "
     "attempt to perform arithmetic on a nil value", BUG),
    ("ERR unknown command 'HSETX'", BUG),
    # an operator's SCRIPT KILL (the answer to BUSY): the script had written nothing, try again
    ("ERR Script killed by user with SCRIPT KILL...", TRANSIENT),
    ("ERR Error running script (call to f_17de6efb9ce1aa2c904beef238f3a075e21ecd5d): @user_script:12: Script killed "
     "by user with SCRIPT KILL...", TRANSIENT),
])
def test_each_error_reply_has_its_kind(text: str, kind: str) -> None:
    assert classify(reply(text)) == kind


def test_an_error_raised_from_a_pipeline_keeps_its_kind() -> None:
    """redis-py puts the command in front of the first error of a pipeline it raises."""
    exc = reply("BGREFUSED item 1: arm a:b is not a name")
    exc.args = ("Command # 1 (EVALSHA 0ca7 2 k s 0.0 3600 a:b 1.0) of pipeline caused error: " + exc.args[0],)
    assert classify(exc) == REFUSED and redis_errors.error_code(exc) == "BGREFUSED"
    busy = reply("BUSY Redis is busy running a script.")
    busy.args = ("Command # 2 (EVALSHA x) of pipeline caused error: " + busy.args[0],)
    assert classify(busy) == TRANSIENT


@pytest.mark.parametrize(("exc", "kind"), [
    (rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), TRANSIENT),
    (rex.TimeoutError("Timeout reading from socket"), TRANSIENT),
    (rex.BusyLoadingError("Redis is loading the dataset in memory"), TRANSIENT),
    (ConnectionResetError(104, "Connection reset by peer"), TRANSIENT),
    (asyncio.TimeoutError(), TRANSIENT),
    (rex.AuthenticationError("invalid username-password pair"), OPERATOR),
    (rex.DataError("Invalid input of type: 'NoneType'"), BUG),
    (ValueError("not Redis at all"), BUG),
    (KeyError("x"), BUG),
])
def test_client_side_errors_have_their_kind(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_retryable_and_one_line() -> None:
    assert redis_errors.retryable(reply("OOM command not allowed"))
    assert redis_errors.retryable(reply("NOPERM no permissions"))
    assert not redis_errors.retryable(reply("WRONGTYPE Operation against a key"))
    assert redis_errors.one_line(ValueError("two\nlines")) == "ValueError: two lines"


def test_docstring_examples() -> None:
    result = doctest.testmod(redis_errors, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_failure_episodes_log_once_per_outage_and_count_every_failure(caplog) -> None:
    """The gateway's background writers (call counts, guardrail): before, a READONLY Redis was one
    debug line per attempt and no counter."""
    now = [0.0]
    kinds: list[str] = []
    episodes = redis_errors.FailureEpisodes(logging.getLogger("test.episodes"), "arm call counts", kinds.append,
                                            clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.episodes"):
        for _ in range(5):
            assert episodes.failed(reply("READONLY You can't write against a read only replica.")) == TRANSIENT
            now[0] += 1.0
        episodes.succeeded()
        episodes.succeeded()
        assert episodes.failed(reply("NOPERM no permissions to access a key")) == OPERATOR
        assert episodes.failed(reply("WRONGTYPE Operation against a key")) == REFUSED
        assert episodes.failed(reply("WRONGTYPE Operation against a key")) == REFUSED  # the same again: no line
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("WARNING", "arm call counts: Redis writes fail (ReadOnlyError: You can't write against a read "
                                   "only replica.); retrying, kept until they succeed")
    assert lines[1] == ("INFO", "arm call counts: Redis writes work again after 5.0 s")
    assert [level for level, _ in lines[2:]] == ["ERROR", "ERROR"] and "check the credentials and ACL" in lines[2][1]
    assert kinds == [TRANSIENT] * 5 + [OPERATOR, REFUSED, REFUSED]
