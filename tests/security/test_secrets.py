"""Secrets never leave the process: recognisable secrets go in every place a secret can go (YAML
`${ENV}` references, BANDITGATE_* variables, *_file files, the Redis URL), every failure path we
can drive is driven (wrong passwords, refused connections, bad tokens, an invalid config, a key
that will not decrypt), and all output — logs, one-line errors, HTTP and gRPC answers, /metrics,
the served configuration — is searched for them."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.processes import free_port, start_serve
from tests.security.conftest import (
    CLIENT_KEY_PASSWORD,
    KAFKA_PASSWORD,
    N_FEATURES,
    REDIS_PASSWORD,
    REDIS_USER,
    assert_one_line_failure,
    gateway_data,
    kafka_security,
    redis_section,
    run_serve_until_exit,
)

pytestmark = pytest.mark.stack

INFER_TOKEN = "infer-tok-SECRET-77e1"
ROTATED_TOKEN = "infer-tok-SECRET-rotated-9b40"
ADMIN_TOKEN = "admin-tok-SECRET-d00d"
URL_PASSWORD = "url-pw-SECRET-6f0c"
SECRETS = (KAFKA_PASSWORD, REDIS_PASSWORD, CLIENT_KEY_PASSWORD, INFER_TOKEN, ROTATED_TOKEN, ADMIN_TOKEN, URL_PASSWORD)


def _http(url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")


def test_secrets_never_in_logs_errors_metrics_or_served_config(secure_kafka, secure_redis, secure_topics, stack, pki,  # type: ignore[no-untyped-def]
                                                                security_repository, tmp_path: Path) -> None:
    outputs: list[tuple[str, str]] = []  # (where, text) for every byte we saw
    files = tmp_path / "secrets"
    files.mkdir()
    (files / "key.pass").write_text(CLIENT_KEY_PASSWORD + "\n")
    (files / "wrong-key.pass").write_text("wrong-" + CLIENT_KEY_PASSWORD + "\n")
    (files / "redis.pass").write_text("wrong-" + REDIS_PASSWORD + "\n")
    (files / "infer.tokens").write_text(f"{INFER_TOKEN}\n{ROTATED_TOKEN}\n")
    mtls = {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key_encrypted),
            "key_password_file": str(files / "key.pass")}
    right = {"BANDITGATE_KAFKA_PASSWORD": KAFKA_PASSWORD, "BANDITGATE_REDIS_PASSWORD": REDIS_PASSWORD,
             "BANDITGATE_ADMIN_TOKENS": ADMIN_TOKEN}
    server = {"infer_tokens_file": str(files / "infer.tokens")}

    def failing(name: str, data: dict, env: dict[str, str], *expected: str) -> None:
        run = run_serve_until_exit(data, tmp_path / name, env=env)
        assert_one_line_failure(run, *expected)
        outputs.append((name, run.output))

    # a wrong Kafka password, from a ${ENV} reference in the YAML
    failing("kafka-wrong-password",
            gateway_data(secure_kafka.sasl_ssl, secure_topics, security_repository, {"url": stack.redis},
                         kafka_security(pki, sasl_password="${BG_SECRET_KAFKA}", **mtls), **server),
            {**right, "BANDITGATE_KAFKA_PASSWORD": "", "BG_SECRET_KAFKA": "wrong-" + KAFKA_PASSWORD},
            "authentication failed")
    # a refused Kafka connection, with every secret set
    failing("kafka-refused",
            gateway_data(f"127.0.0.1:{free_port()}", secure_topics, security_repository, {"url": stack.redis},
                         kafka_security(pki, **mtls), **server),
            right, "connection refused")
    # a client key whose password is wrong
    failing("kafka-wrong-key-password",
            gateway_data(secure_kafka.sasl_ssl, secure_topics, security_repository, {"url": stack.redis},
                         kafka_security(pki, **{**mtls, "key_password_file": str(files / "wrong-key.pass")}), **server),
            right, "cannot load the client certificate", "key_password")
    # a wrong Redis password, from a file
    failing("redis-wrong-password",
            gateway_data(secure_kafka.sasl_ssl, secure_topics, security_repository,
                         redis_section(secure_redis, pki, password_file=str(files / "redis.pass")),
                         kafka_security(pki, **mtls), **server),
            {**right, "BANDITGATE_REDIS_PASSWORD": ""}, "authentication failed")
    # an invalid config whose wrong value is a URL carrying a password
    failing("config-invalid",
            gateway_data(secure_kafka.sasl_ssl, secure_topics, security_repository, {"url": stack.redis}, **server),
            {**right, "BANDITGATE_REDIS": f"http://{REDIS_USER}:{URL_PASSWORD}@127.0.0.1:1/0"}, "redis.url", "***")

    # serving: Kafka over SASL_SSL with a client certificate; Redis (URL with user and password) away
    redis_away = {"url": f"rediss://{REDIS_USER}:{URL_PASSWORD}@127.0.0.1:{free_port()}/0", "ca_file": str(pki.ca)}
    data = gateway_data(secure_kafka.sasl_ssl, secure_topics, security_repository, redis_away,
                        kafka_security(pki, **mtls), **server)
    data["server"].pop("http_port")
    data["server"].pop("grpc_port")
    served = start_serve(data, tmp_path, env=right)
    try:
        base = served.base_url
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                         "data": [0.5] * N_FEATURES}]})
        calls = {
            "infer-no-token": _http(f"{base}/v2/models/churn/infer", None, body),
            "infer-bad-token": _http(f"{base}/v2/models/churn/infer", "wrong-" + INFER_TOKEN, body),
            "infer-admin-token": _http(f"{base}/v2/models/churn/infer", ADMIN_TOKEN, body),
            "infer-ok": _http(f"{base}/v2/models/churn/infer", ROTATED_TOKEN, body),
            "infer-bad-json": _http(f"{base}/v2/models/churn/infer", INFER_TOKEN, b'{"inputs": [' + INFER_TOKEN.encode()),
            "outcomes-bad-token": _http(f"{base}/v2/outcomes", ADMIN_TOKEN, b"[]"),
            "admin-infer-token": _http(f"{base}/v2/admin/config", INFER_TOKEN),
            "admin-config": _http(f"{base}/v2/admin/config", ADMIN_TOKEN),
            "admin-routes": _http(f"{base}/v2/admin/routes", ADMIN_TOKEN),
            "metrics": _http(f"{base}/metrics"),
        }
        assert [calls[k][0] for k in ("infer-no-token", "infer-bad-token", "infer-admin-token", "infer-ok",
                                      "infer-bad-json", "outcomes-bad-token", "admin-infer-token", "admin-config",
                                      "admin-routes", "metrics")] == [401, 403, 403, 200, 400, 403, 403, 200, 200, 200]
        served_config = orjson.loads(calls["admin-config"][1])
        assert served_config["kafka"]["security"]["sasl_password"] == "**********"
        assert served_config["kafka"]["security"]["key_password"] == "**********"
        assert served_config["redis"]["url"].startswith(f"rediss://{REDIS_USER}:***@")
        assert "banditgate_" in calls["metrics"][1]
        outputs.extend((f"http {name}", f"{status} {text}") for name, (status, text) in calls.items())

        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{served.grpc_port}")
        for token in (None, "wrong-" + ADMIN_TOKEN, ADMIN_TOKEN):
            with pytest.raises(InferenceServerException) as info:
                client.get_model_metadata("churn", headers={"authorization": f"Bearer {token}"} if token else {})
            outputs.append((f"grpc {token and token[:5]}", str(info.value)))
        assert client.get_model_metadata("churn", headers={"authorization": f"Bearer {INFER_TOKEN}"}).name == "churn"
        client.close()
    finally:
        code = served.stop()
    log = served.log()
    outputs.append(("serve log", log))
    assert code == 0, log[-3000:]
    assert "arm statistics unavailable" in log  # the Redis outage was reported (without its URL password)

    leaks = [(where, secret) for where, text in outputs for secret in SECRETS if secret in text]
    assert leaks == [], leaks
