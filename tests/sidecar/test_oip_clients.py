"""An unmodified third-party OIP client (tritonclient, HTTP and gRPC) against a running `banditgate serve`.

tritonclient registers its own copy of the `inference` proto package, so this test process never
imports the gateway's stubs: the server runs in its own process, as in production.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import orjson
import pytest
import urllib.request

from tests.kafka_helpers import read_topic
from tests.sidecar.conftest import N_FEATURES

pytestmark = pytest.mark.stack


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, size=(n, N_FEATURES)).astype(np.float32)


def test_tritonclient_http_binary_and_json(served, stack, topics) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{served.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("churn")
    assert metadata["inputs"][0]["shape"] == [-1, N_FEATURES] and metadata["inputs"][0]["datatype"] == "FP32"
    assert client.is_model_ready("churn") and client.is_model_ready("m-a", "1")
    assert not client.is_model_ready("nope")
    arms = Counter()
    for i in range(40):
        tensor = httpclient.InferInput("input", [1, N_FEATURES], "FP32")
        tensor.set_data_from_numpy(_rows(1), binary_data=True)  # tritonclient's default
        result = client.infer("churn", [tensor], request_id=f"http-{i}",
                              outputs=[httpclient.InferRequestedOutput("probability", binary_data=True)])
        probability = result.as_numpy("probability")
        assert probability.shape == (1, 1) and 0 <= probability[0, 0] <= 1
        parameters = result.get_response()["parameters"]
        assert parameters["arm"] in ("a", "b") and parameters["model_version"] == 1
        assert 0 < parameters["propensity"] <= 1 and parameters["policy"] == "thompson"
        arms[parameters["arm"]] += 1
    assert set(arms) == {"a", "b"}
    # JSON tensors, several rows, a concrete model and version bypass the router
    tensor = httpclient.InferInput("input", [3, N_FEATURES], "FP32")
    tensor.set_data_from_numpy(_rows(3), binary_data=False)
    result = client.infer("m-b", [tensor], model_version="1", request_id="direct-1",
                          outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
    assert result.as_numpy("label").shape == (3,)
    assert result.get_response()["parameters"]["policy"] == "direct"
    # every routed request was logged as a prediction (and mirrored to the shadow)
    predictions = await_predictions(stack, topics.topics.predictions, 43)
    ids = {p["request_id"] for p in predictions}
    assert {f"http-{i}" for i in range(40)} <= ids and {"direct-1/0", "direct-1/1", "direct-1/2"} <= ids
    shadows = await_predictions(stack, topics.topics.shadow_predictions, 40)
    assert {s["request_id"] for s in shadows} >= {f"http-{i}" for i in range(40)}


def await_predictions(stack, topic: str, expected: int) -> list[dict]:  # type: ignore[no-untyped-def]
    import asyncio

    return asyncio.run(read_topic(stack.kafka, topic, expected, timeout_s=30))


def test_tritonclient_grpc(served) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{served.grpc_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("churn") and client.is_model_ready("m-c", "1")
    metadata = client.get_model_metadata("m-a", as_json=True)
    assert metadata["inputs"][0]["datatype"] == "FP32"
    tensor = grpcclient.InferInput("input", [2, N_FEATURES], "FP32")
    tensor.set_data_from_numpy(_rows(2))
    result = client.infer("churn", [tensor], request_id="grpc-1")
    assert result.as_numpy("probability").shape == (2, 1) and result.as_numpy("label").shape == (2,)
    parameters = result.get_response(as_json=True)["parameters"]
    assert parameters["arm"]["string_param"] in ("a", "b")
    with pytest.raises(Exception, match="(?i)unknown input|not found|NOT_FOUND|INVALID"):
        bad = grpcclient.InferInput("pixels", [1, N_FEATURES], "FP32")
        bad.set_data_from_numpy(_rows(1))
        client.infer("churn", [bad])


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


def test_rest_errors_are_clear_4xx(served) -> None:
    base = f"{served.base_url}/v2/models/churn/infer"
    status, body = _post(base, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = _post(base, orjson.dumps({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                                                          "data": [1, 2, 3]}]}))
    assert status == 400 and "shape" in body["error"]
    status, body = _post(base, orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES],
                                                          "datatype": "FP32", "data": [1] * (N_FEATURES - 1)}]}))
    assert status == 400 and "values of data" in body["error"]
    status, body = _post(base, b"x" * 70_000)
    assert status == 413 and "over the limit" in body["error"]
    status, body = _post(f"{served.base_url}/v2/models/nope/infer", orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": [0] * N_FEATURES}]}))
    assert status == 404 and "nope" in body["error"]
    status, body = _post(base, orjson.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                                          "data": ["hello"]}]}))
    assert status == 400


def test_outcomes_over_http_reach_the_topic(served, stack, topics) -> None:
    status, body = _post(f"{served.base_url}/v2/outcomes",
                         orjson.dumps([{"request_id": "r1", "reward": 1}, {"request_id": "r2", "label": 0}]))
    assert status == 200 and body == {"accepted": 2}
    status, body = _post(f"{served.base_url}/v2/outcomes", orjson.dumps({"request_id": "r3"}))
    assert status == 400 and "none of 'reward'" in body["error"]
    outcomes = await_predictions(stack, topics.topics.outcomes, 2)
    assert sorted(o["request_id"] for o in outcomes) == ["r1", "r2"]


def test_sidecar_requests_are_counted_per_transport(served) -> None:
    import tritonclient.grpc as grpcclient

    body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                     "data": [0.5] * N_FEATURES}]})
    assert _post(f"{served.base_url}/v2/models/churn/infer", body)[0] == 200
    assert _post(f"{served.base_url}/v2/models/nope/infer", body)[0] == 404
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{served.grpc_port}")
    tensor = grpcclient.InferInput("input", [1, N_FEATURES], "FP32")
    tensor.set_data_from_numpy(_rows(1))
    client.infer("m-a", [tensor], model_version="1")
    with urllib.request.urlopen(f"{served.base_url}/metrics", timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("banditgate_request")]
    assert any('route="churn"' in line and 'status="ok"' in line and 'transport="rest"' in line for line in lines)
    assert any('route="m-a"' in line and 'arm="-"' in line and 'transport="grpc"' in line for line in lines)
    assert any(line.startswith("banditgate_request_errors_total") and 'route="-"' in line
               and 'reason="model_unavailable"' in line for line in lines)
