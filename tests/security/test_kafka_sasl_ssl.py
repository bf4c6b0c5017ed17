"""Kafka security against a real broker: SASL_SSL with PLAIN and SCRAM (users made by kafka-configs),
an SSL listener that requires client certificates, and one-line start-up failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from banditgate.config import parse_config
from banditgate.connections import ConnectionCheckError, check_kafka, kafka_client_kwargs, redis_client
from gateway.app import Gateway
from router.stats_store import ArmStatsStore, ArmUpdate
from tests.security.conftest import (
    CLIENT_KEY_PASSWORD,
    KAFKA_PASSWORD,
    KAFKA_PLAIN_PASSWORD,
    KAFKA_PLAIN_USER,
    KAFKA_USER,
    N_FEATURES,
    REDIS_PASSWORD,
    assert_one_line_failure,
    gateway_data,
    kafka_security,
    produce_values,
    read_json,
    redis_section,
    run_serve_until_exit,
)

pytestmark = pytest.mark.stack

SECRETS_ENV = {"BANDITGATE_KAFKA_PASSWORD": KAFKA_PASSWORD, "BANDITGATE_REDIS_PASSWORD": REDIS_PASSWORD}


def _event(request_id: str, **extra: object) -> bytes:
    return orjson.dumps({"request_id": request_id, "route": "churn", "inputs": {"input": [0.5] * N_FEATURES}, **extra})


async def test_sasl_ssl_scram_request_through_gateway_over_tls_acl_redis(
        secure_kafka, secure_redis, secure_topics, pki, security_repository, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SCRAM-SHA-512 over TLS with a client certificate (encrypted key) for the consumer and the
    producer; arm snapshots from the TLS-only Redis as the ACL user; requests in, predictions and
    dead-letters out, all over SASL_SSL."""
    key_password_file = tmp_path / "client-key.pass"
    key_password_file.write_text(CLIENT_KEY_PASSWORD + "\n")
    security = kafka_security(pki, cert_file=str(pki.client_cert), key_file=str(pki.client_key_encrypted),
                              key_password_file=str(key_password_file))
    data = gateway_data(secure_kafka.sasl_ssl, secure_topics, security_repository,
                        redis_section(secure_redis, pki), security, enable_http=False, enable_grpc=False)
    config = parse_config(data, env=SECRETS_ENV)
    assert config.kafka.security.key_password is not None
    assert config.kafka.security.key_password.get_secret_value() == CLIENT_KEY_PASSWORD

    # arm statistics written as the ACL user before the gateway starts: its first snapshot must see them
    seed_client = redis_client(config.redis)
    try:
        await ArmStatsStore(seed_client, prefix="bg").apply("churn", [ArmUpdate(f"seed-{i}", "a", 1.0) for i in range(7)])
    finally:
        await seed_client.aclose()

    gateway = Gateway(config, registry=CollectorRegistry())
    await gateway.start()
    task = asyncio.get_running_loop().create_task(gateway.run())
    try:
        assert gateway.refresher is not None and gateway.refresher.redis_ok
        assert gateway.store is not None
        snapshot = await gateway.store.snapshot("churn")
        assert snapshot.arm("a").stats.weight == pytest.approx(7.0)

        client = kafka_client_kwargs(config.kafka)
        values = [(f"r-{i}".encode(), _event(f"r-{i}")) for i in range(20)]
        values.append((b"too-big", _event("too-big", pad="x" * (config.max_event_bytes + 10))))
        values.append((b"not-json", b"{nope"))
        await produce_values(client, secure_topics.requests, values)
        predictions = await read_json(client, secure_topics.predictions, 20)
        dead = await read_json(client, secure_topics.deadletter, 2)
    finally:
        gateway.stopping.set()
        assert await asyncio.wait_for(task, 30) == 0
    assert sorted(p["request_id"] for p in predictions) == sorted(f"r-{i}" for i in range(20))
    assert {p["arm"] for p in predictions} <= {"a", "b"}
    assert sorted(d["reason"] for d in dead) == ["not_json", "oversize"]
    assert "over the limit" in next(d["error"] for d in dead if d["reason"] == "oversize")


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_ssl_each_mechanism_logs_in(secure_kafka, pki, mechanism: str) -> None:  # type: ignore[no-untyped-def]
    plain = mechanism == "PLAIN"
    data = gateway_data(secure_kafka.sasl_ssl, _topics(), Path("models"), {"url": "redis://127.0.0.1:1/0"},
                        kafka_security(pki, mechanism=mechanism, user=KAFKA_PLAIN_USER if plain else KAFKA_USER))
    config = parse_config(data, env={"BANDITGATE_KAFKA_PASSWORD": KAFKA_PLAIN_PASSWORD if plain else KAFKA_PASSWORD})
    await check_kafka(config.kafka)
    wrong = parse_config(data, env={"BANDITGATE_KAFKA_PASSWORD": "not-the-password"})
    with pytest.raises(ConnectionCheckError, match=f"{mechanism} as user .*authentication failed"):
        await check_kafka(wrong.kafka)


async def test_tls_client_certificate_required_listener(secure_kafka, pki) -> None:  # type: ignore[no-untyped-def]
    """protocol SSL against a listener with ssl.client.auth=required: the client certificate (its key
    encrypted, key_password from the config) is the credential; without one, or with one from
    another CA, the broker hangs up and the error says what to check."""
    base = {"protocol": "SSL", "ca_file": str(pki.ca)}

    def config(**security: str):  # type: ignore[no-untyped-def]
        return parse_config(gateway_data(secure_kafka.mtls, _topics(), Path("models"), {"url": "redis://127.0.0.1:1/0"},
                                         {**base, **security}), env={}).kafka

    await check_kafka(config(cert_file=str(pki.client_cert), key_file=str(pki.client_key_encrypted),
                             key_password=CLIENT_KEY_PASSWORD))
    for security in ({}, {"cert_file": str(pki.rogue_client_cert), "key_file": str(pki.rogue_client_key)}):
        with pytest.raises(ConnectionCheckError, match="client certificate") as info:
            await check_kafka(config(**security))
        assert f"kafka {secure_kafka.mtls} (SSL, CA {pki.ca}" in str(info.value)


async def test_sasl_ssl_feedback_worker_credentials_log_in(secure_kafka, pki) -> None:  # type: ignore[no-untyped-def]
    """The feedback worker hands faust a SASLCredentials built from the same config; faust turns it
    into aiokafka arguments (credentials_to_aiokafka_auth). Those arguments log in to the broker."""
    feedback_app = pytest.importorskip("feedback.app")
    from aiokafka.conn import create_conn
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    data = gateway_data(secure_kafka.sasl_ssl, _topics(), Path("models"), {"url": "redis://127.0.0.1:1/0"},
                        kafka_security(pki, mechanism="SCRAM-SHA-256"))
    config = parse_config(data, env={"BANDITGATE_KAFKA_PASSWORD": KAFKA_PASSWORD})
    auth = credentials_to_aiokafka_auth(feedback_app._credentials(config))
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-256"
    assert KAFKA_PASSWORD not in repr(feedback_app._credentials(config))
    host, port = secure_kafka.sasl_ssl.split(":")
    connection = await create_conn(host, int(port), request_timeout_ms=10_000, **auth)
    connection.close()


def test_sasl_ssl_wrong_password_fails_startup_with_one_line(secure_kafka, stack, pki, security_repository,  # type: ignore[no-untyped-def]
                                                            tmp_path: Path) -> None:
    data = gateway_data(secure_kafka.sasl_ssl, _topics(), security_repository, {"url": stack.redis},
                        kafka_security(pki, sasl_password="${BG_TEST_KAFKA_PASSWORD}"))
    run = run_serve_until_exit(data, tmp_path, env={"BG_TEST_KAFKA_PASSWORD": "wrong-" + KAFKA_PASSWORD})
    line = assert_one_line_failure(run, f"kafka {secure_kafka.sasl_ssl}", "SASL_SSL", "SCRAM-SHA-512",
                                   f"user '{KAFKA_USER}'", "authentication failed", "sasl_password")
    assert KAFKA_PASSWORD not in run.output, line


def test_sasl_ssl_untrusted_certificate_fails_startup_with_one_line(secure_kafka, stack, pki,  # type: ignore[no-untyped-def]
                                                                   security_repository, tmp_path: Path) -> None:
    data = gateway_data(secure_kafka.sasl_ssl, _topics(), security_repository, {"url": stack.redis},
                        kafka_security(pki, ca=pki.rogue_ca))
    run = run_serve_until_exit(data, tmp_path, env={"BANDITGATE_KAFKA_PASSWORD": KAFKA_PASSWORD})
    assert_one_line_failure(run, f"kafka {secure_kafka.sasl_ssl}", f"CA {pki.rogue_ca}",
                            "certificate is not trusted", "kafka.security.ca_file")
    assert KAFKA_PASSWORD not in run.output


def _topics():  # type: ignore[no-untyped-def]
    from tests.security.conftest import topic_names

    return topic_names("unused")
