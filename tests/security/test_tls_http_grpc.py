"""HTTPS and gRPC over TLS with client certificates (mTLS), bearer tokens from a file and from the
environment (several: rotation; infer and admin apart), and the limits of each surface — all
against a real `banditgate serve` with real TLS clients."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.processes import start_serve
from tests.security.conftest import N_FEATURES

pytestmark = pytest.mark.stack

INFER_TOKENS = ("infer-tok-SECRET-0a1b", "infer-tok-SECRET-rotated-2c3d")
ADMIN_TOKEN = "admin-tok-SECRET-4e5f"
MAX_BODY = 65536
MAX_ELEMENTS = 1000
MAX_HEADER = 8192


def _client_context(pki, with_certificate: bool = True) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    context = ssl.create_default_context(cafile=str(pki.ca))
    if with_certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def _call(url: str, context: ssl.SSLContext, token: str | None = None, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=all_headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310 - loopback
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read() or b"{}")


def _infer_body(rows: int = 1, inputs: int = 1) -> bytes:
    tensors = [{"name": "input" if i == 0 else f"extra{i}", "shape": [rows, N_FEATURES], "datatype": "FP32",
                "data": [0.25] * (rows * N_FEATURES)} for i in range(inputs)]
    return orjson.dumps({"inputs": tensors})


@pytest.fixture
def tls_served(stack, topics, pki, security_repository, redis_prefix, tmp_path: Path):  # type: ignore[no-untyped-def]
    tokens_file = tmp_path / "infer.tokens"
    tokens_file.write_text("\n".join(INFER_TOKENS) + "\n")
    config = {
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"tls-{topics.prefix}",
                  "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "models": {"repository": str(security_repository), "poll_interval_s": 0, "warmup_rows": 1},
        "batching": {"max_batch_size": 32, "max_delay_us": 500},
        "server": {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
                   "client_ca_file": str(pki.ca), "infer_tokens_file": str(tokens_file),
                   "max_body_bytes": MAX_BODY, "max_tensor_elements": MAX_ELEMENTS, "max_inputs": 2,
                   "max_header_bytes": MAX_HEADER},
        "routes": [{"name": "churn", "policy": "thompson", "exploration_floor": 0.1,
                    "arms": [{"name": "a", "model": "m-a", "version": 1}, {"name": "b", "model": "m-b", "version": 1}]}],
    }
    served = start_serve(config, tmp_path, env={"BANDITGATE_ADMIN_TOKENS": ADMIN_TOKEN}, scheme="https",
                         ssl_context=_client_context(pki))
    yield served
    assert served.stop() == 0, served.log()[-3000:]


def test_tls_https_mtls_tokens_and_limits(tls_served, pki) -> None:  # type: ignore[no-untyped-def]
    base = f"https://127.0.0.1:{tls_served.http_port}"
    context = _client_context(pki)
    infer = f"{base}/v2/models/churn/infer"
    for token in INFER_TOKENS:  # both tokens work: rotation
        status, doc = _call(infer, context, token, _infer_body())
        assert status == 200 and doc["parameters"]["arm"] in ("a", "b"), doc
    assert _call(infer, context, None, _infer_body())[0] == 401
    assert _call(infer, context, "not-a-token", _infer_body())[0] == 403
    assert _call(infer, context, ADMIN_TOKEN, _infer_body())[0] == 403  # admin tokens are not infer tokens
    assert _call(f"{base}/v2/admin/config", context, INFER_TOKENS[0])[0] == 403
    status, served_config = _call(f"{base}/v2/admin/config", context, ADMIN_TOKEN)
    assert status == 200 and served_config["server"]["infer_tokens"] == ["**********"] * 2
    assert served_config["server"]["admin_tokens"] == ["**********"]

    # limits: each a clear 4xx with the limit in the message
    status, doc = _call(infer, context, INFER_TOKENS[0], b" " * (MAX_BODY + 1))
    assert status == 413 and str(MAX_BODY) in doc["error"]
    status, doc = _call(infer, context, INFER_TOKENS[0], _infer_body(rows=MAX_ELEMENTS // N_FEATURES + 1))
    assert status == 400 and "over the limit" in doc["error"], doc
    status, doc = _call(infer, context, INFER_TOKENS[0], _infer_body(inputs=3))
    assert status == 400 and "over the limit of 2" in doc["error"], doc
    status, doc = _call(infer, context, INFER_TOKENS[0], _infer_body(), headers={"X-Pad": "p" * MAX_HEADER})
    assert status == 431 and "max_header_bytes" in doc["error"], doc

    # TLS is required, and so is a client certificate from the trusted CA
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _call(f"{base}/v2/health/live", _client_context(pki, with_certificate=False))
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    rogue.load_cert_chain(str(pki.rogue_client_cert), str(pki.rogue_client_key))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _call(f"{base}/v2/health/live", rogue)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_served.http_port}/v2/health/live", timeout=5)  # noqa: S310
    with pytest.raises((ssl.SSLError, urllib.error.URLError)):  # a server certificate we do not trust
        _call(f"{base}/v2/health/live", ssl.create_default_context(cafile=str(pki.rogue_ca)))
    assert not any(secret in tls_served.log() for secret in (*INFER_TOKENS, ADMIN_TOKEN))


def test_tls_grpc_mtls_tokens_and_limits(tls_served, pki) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = f"127.0.0.1:{tls_served.grpc_port}"
    client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(pki.ca),
                                              private_key=str(pki.client_key), certificate_chain=str(pki.client_cert))
    rows = np.full((2, N_FEATURES), 0.25, dtype=np.float32)

    def request(array: np.ndarray, token: str | None, extra_inputs: int = 0, headers: dict | None = None):  # type: ignore[no-untyped-def]
        inputs = [grpcclient.InferInput("input", list(array.shape), "FP32")]
        inputs[0].set_data_from_numpy(array)
        for i in range(extra_inputs):
            inputs.append(grpcclient.InferInput(f"extra{i}", list(array.shape), "FP32"))
            inputs[-1].set_data_from_numpy(array)
        all_headers = {**({"authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        return client.infer("churn", inputs, headers=all_headers)

    for token in INFER_TOKENS:
        assert request(rows, token).as_numpy("probability").shape == (2, 1)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|missing bearer"):
        request(rows, None)
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED|not valid"):
        request(rows, ADMIN_TOKEN)
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED|larger than max"):
        request(np.zeros((MAX_BODY // (4 * N_FEATURES) + 8, N_FEATURES), dtype=np.float32), INFER_TOKENS[0])
    with pytest.raises(InferenceServerException, match="over the limit of 2"):
        request(rows, INFER_TOKENS[0], extra_inputs=2)
    with pytest.raises(InferenceServerException, match=f"over the limit of {MAX_ELEMENTS}"):
        request(np.zeros((MAX_ELEMENTS // N_FEATURES + 1, N_FEATURES), dtype=np.float32), INFER_TOKENS[0])
    assert request(rows, INFER_TOKENS[0], headers={"x-pad": "p" * (MAX_HEADER // 2)}) is not None
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED.*metadata"):  # over max_header_bytes
        request(rows, INFER_TOKENS[0], headers={"x-pad": "p" * (MAX_HEADER + 100)})
    client.close()

    # no client certificate: the TLS handshake fails, the call never reaches the service
    no_certificate = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(pki.ca))
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        no_certificate.get_model_metadata("churn", headers={"authorization": f"Bearer {INFER_TOKENS[0]}"})
    no_certificate.close()
