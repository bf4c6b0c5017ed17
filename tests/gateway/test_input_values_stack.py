"""Input values refused at the edge on a real gateway, on REST, gRPC and Kafka alike: an INT8 300,
a value the model's dtype cannot hold, a shape whose element count overflows int64, NaN — 400,
INVALID_ARGUMENT or a dead-letter with its reason; never a wrapped value, a 500 or UNKNOWN."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest

from loadtests.models import write_repository
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack

WIDTH = 4


def build_int8_sum(path: Path) -> None:
    """An ONNX model with an INT8 [N, 4] input `input` and FP32 output `total` (the row's sum)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f", "axes"], ["total"], keepdims=0)]
    graph = helper.make_graph(nodes, "int8-sum", [helper.make_tensor_value_info("input", TensorProto.INT8, [None, WIDTH])],
                              [helper.make_tensor_value_info("total", TensorProto.FLOAT, [None])],
                              [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.fixture
def value_repository(tmp_path: Path) -> Path:
    repository = write_repository(tmp_path / "models", {"m-a": {1: 1}}, n_features=N_FEATURES)
    build_int8_sum(repository / "m-int8" / "1" / "model.onnx")
    return repository


def _tensor(name: str, datatype: str, shape: list[int], **contents: list) -> pb2.ModelInferRequest.InferInputTensor:  # type: ignore[type-arg]
    return pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                  contents=pb2.InferTensorContents(**contents))


async def test_out_of_range_nan_and_overflowing_shapes_refused_on_rest_grpc_and_kafka(
        stack, topics, value_repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    config = gateway_config(stack, topics, value_repository, redis_prefix, routes=[
        {"name": "small", "policy": "fixed", "arms": [{"name": "a", "model": "m-int8", "version": 1}]},
        {"name": "floats", "policy": "fixed", "arms": [{"name": "a", "model": "m-a", "version": 1}]}])
    running = await start_gateway(config)
    gateway = running.gateway
    try:
        # -- REST --------------------------------------------------------------------------------
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as http:
            async def rest(name: str, tensor: dict, binary: bytes | None = None) -> httpx.Response:  # type: ignore[type-arg]
                header = orjson.dumps({"inputs": [{"name": "input", **tensor}]})
                if binary is None:
                    return await http.post(f"/v2/models/{name}/infer", content=header)
                return await http.post(f"/v2/models/{name}/infer", content=header + binary,
                                       headers={"Inference-Header-Content-Length": str(len(header))})

            ok = await rest("small", {"shape": [1, WIDTH], "datatype": "INT8", "data": [100, 27, -128, 1]})
            assert ok.status_code == 200, ok.text
            assert ok.json()["outputs"][0]["data"] == [0.0]
            # INT8 300: wrapped to 44 before, silently
            wrapped = await rest("small", {"shape": [1, WIDTH], "datatype": "INT8", "data": [300, 0, 0, 0]})
            assert wrapped.status_code == 400 and "300 is outside the INT8 range" in wrapped.json()["error"]
            # declared INT32, fits INT32, not the model's INT8
            wider = await rest("small", {"shape": [1, WIDTH], "datatype": "INT32", "data": [2**20, 0, 0, 0]})
            assert wider.status_code == 400 and "outside the INT8 range" in wider.json()["error"], wider.text
            # the same as a binary tensor (INT64 2**40)
            raw = np.array([[2**40, 0, 0, 0]], dtype="<i8").tobytes()
            binary = await rest("small", {"shape": [1, WIDTH], "datatype": "INT64",
                                          "parameters": {"binary_data_size": len(raw)}}, raw)
            assert binary.status_code == 400 and "1099511627776 is outside the INT8 range" in binary.json()["error"]
            # np.prod([2**32, 2**32]) wraps to 0 on int64: a 500 before
            huge = await rest("floats", {"shape": [4294967296, 4294967296], "datatype": "FP32", "data": []})
            assert huge.status_code == 400 and "over the limit" in huge.json()["error"], huge.text
            negative = await rest("floats", {"shape": [-1, N_FEATURES], "datatype": "FP32", "data": [1.0]})
            assert negative.status_code == 400
            # NaN can only arrive as a binary tensor over REST (JSON has none)
            nan = np.full((1, N_FEATURES), 0.5, dtype="<f4")
            nan[0, 3] = np.nan
            refused = await rest("floats", {"shape": [1, N_FEATURES], "datatype": "FP32",
                                            "parameters": {"binary_data_size": nan.nbytes}}, nan.tobytes())
            assert refused.status_code == 400 and "NaN" in refused.json()["error"]
            too_big = await rest("floats", {"shape": [1, N_FEATURES], "datatype": "FP64",
                                            "data": [1e300] + [0.0] * (N_FEATURES - 1)})
            assert too_big.status_code == 400 and "outside the FP32 range" in too_big.json()["error"]

        # -- gRPC --------------------------------------------------------------------------------
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)

            async def infer(model: str, *tensors: pb2.ModelInferRequest.InferInputTensor,
                            raw: list[bytes] | None = None) -> grpc.StatusCode | pb2.ModelInferResponse:
                try:
                    return await stub.ModelInfer(pb2.ModelInferRequest(model_name=model, inputs=list(tensors),
                                                                       raw_input_contents=raw or []))
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            answer = await infer("small", _tensor("input", "INT8", [1, WIDTH], int_contents=[1, 2, 3, 4]))
            assert isinstance(answer, pb2.ModelInferResponse)
            assert struct.unpack("<f", answer.raw_output_contents[0]) == (10.0,)
            # INT8 300 in int_contents: numpy raised OverflowError -> StatusCode.UNKNOWN before
            assert await infer("small", _tensor("input", "INT8", [1, WIDTH], int_contents=[300, 0, 0, 0])) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("small", _tensor("input", "INT32", [1, WIDTH], int_contents=[-129, 0, 0, 0])) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("small", _tensor("input", "UINT8", [1, WIDTH], uint_contents=[256, 0, 0, 0])) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("small", pb2.ModelInferRequest.InferInputTensor(
                name="input", datatype="INT64", shape=[1, WIDTH]),
                raw=[np.array([[2**40, 0, 0, 0]], dtype="<i8").tobytes()]) == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("floats", _tensor("input", "FP32", [2**32, 2**32], fp32_contents=[1.0])) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("floats", _tensor("input", "FP32", [-1, N_FEATURES], fp32_contents=[1.0])) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("floats", _tensor("input", "FP32", [1, N_FEATURES],
                                                 fp32_contents=[float("nan")] + [0.5] * (N_FEATURES - 1))) \
                == grpc.StatusCode.INVALID_ARGUMENT
            assert await infer("floats", _tensor("input", "FP64", [1, N_FEATURES],
                                                 fp64_contents=[1e300] + [0.5] * (N_FEATURES - 1))) \
                == grpc.StatusCode.INVALID_ARGUMENT

        # -- Kafka -------------------------------------------------------------------------------
        events = [(b"k-ok", request_event("k-ok", "small", [1, 2, 3, 4])),
                  (b"k-300", request_event("k-300", "small", [300, 0, 0, 0])),
                  (b"k-neg", request_event("k-neg", "small", [-129, 0, 0, 0])),
                  (b"k-big", request_event("k-big", "small", [2**63, 0, 0, 0])),
                  (b"k-frac", request_event("k-frac", "small", [1.5, 0, 0, 0])),
                  (b"k-f32", request_event("k-f32", "floats", [1e300] + [0.5] * (N_FEATURES - 1)))]
        await produce(stack.kafka, topics.topics.requests, events)
        # the two answered REST and gRPC calls are published too
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 3, timeout_s=30)
        dead = await read_topic(stack.kafka, topics.topics.deadletter, 5, timeout_s=30)
    finally:
        assert await running.stop() == 0
    assert len(predictions) == 3
    assert [(p["request_id"], p["outputs"]["total"]) for p in predictions if p["request_id"].startswith("k-")] \
        == [("k-ok", 10.0)]
    reasons = {orjson.loads(d["payload"])["request_id"]: d["reason"] for d in dead}
    assert reasons == {"k-300": "out_of_range", "k-neg": "out_of_range", "k-big": "out_of_range",
                       "k-frac": "wrong_type", "k-f32": "out_of_range"}
    assert all("outside the" in d["error"] for d in dead if d["reason"] == "out_of_range")
