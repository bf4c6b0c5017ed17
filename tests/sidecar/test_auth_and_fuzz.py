"""Bearer-token auth on REST and gRPC, and property-based fuzzing of the REST surface from its OpenAPI."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import urllib.request
from hypothesis import HealthCheck, given, settings

from tests.processes import start_serve
from tests.sidecar.conftest import N_FEATURES, sidecar_config

pytestmark = pytest.mark.stack

INFER = "infer-token-one"
ADMIN = "admin-token"


def _request(url: str, token: str | None = None, body: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as error:
        assert "error" in orjson.loads(error.read())
        return int(error.code)


def test_security_tokens_enforced_on_rest_and_grpc(stack, topics, sidecar_repository, redis_prefix, tmp_path: Path) -> None:
    config = sidecar_config(stack, topics, sidecar_repository, redis_prefix)
    served = start_serve(config, tmp_path, env={"BANDITGATE_INFER_TOKENS": f"{INFER},rotated-token",
                                                "BANDITGATE_ADMIN_TOKENS": ADMIN})
    try:
        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                         "data": [0.5] * N_FEATURES}]})
        infer = f"{served.base_url}/v2/models/churn/infer"
        assert _request(infer, None, body) == 401
        assert _request(infer, "wrong", body) == 403
        assert _request(infer, ADMIN, body) == 403  # the admin token is not an infer token
        assert _request(infer, INFER, body) == 200
        assert _request(infer, "rotated-token", body) == 200  # several tokens: rotation
        assert _request(f"{served.base_url}/v2/health/ready") == 200  # probes stay open
        assert _request(f"{served.base_url}/v2/admin/reload", INFER, b"{}") == 403
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{served.grpc_port}")
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|missing bearer"):
            client.get_model_metadata("churn")
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED|not valid"):
            client.get_model_metadata("churn", headers={"authorization": "Bearer nope"})
        assert client.get_model_metadata("churn", headers={"authorization": f"Bearer {INFER}"}).name == "churn"
        assert INFER not in served.log() and ADMIN not in served.log()
    finally:
        assert served.stop() == 0


def test_rest_surface_fuzzed_from_openapi_finds_no_5xx(served) -> None:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{served.base_url}/v2/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=served.base_url)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        fuzz()
    assert failures == []


def test_admin_api_is_closed_without_admin_tokens(served) -> None:  # type: ignore[no-untyped-def]
    """A real gateway started with no admin token: every admin endpoint answers 403, inference is
    unaffected (no infer tokens configured: open, as before)."""
    assert _request(f"{served.base_url}/v2/admin/config") == 403
    assert _request(f"{served.base_url}/v2/admin/routes/churn") == 403
    assert _request(f"{served.base_url}/v2/admin/reload", None, b"{}") == 403
    assert _request(f"{served.base_url}/v2/admin/routes/churn/arms/a/drain", None, b"{}") == 403
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                     "data": [0.5] * N_FEATURES}]})
    assert _request(f"{served.base_url}/v2/models/churn/infer", None, body) == 200
