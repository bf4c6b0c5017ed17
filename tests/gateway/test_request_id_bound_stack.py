"""A request id is bounded at every edge (MAX_ID_CHARS, the events contract's bound), so it never
makes a prediction the feedback worker refuses or an unbounded CloudEvents ``ce_id``: over REST
(OIP ``id``) and gRPC (``ModelInferRequest.id``) an id over the bound, or one whose rows' ids
(``<id>/<row>``) would be, is refused as ``bad_id`` (400 / INVALID_ARGUMENT, one line, nothing
published); over Kafka the request is dead-lettered as ``bad_id``. Before, REST and gRPC took
any length and published it."""

from __future__ import annotations

import grpc
import httpx
import orjson
import pytest

from banditgate.events import MAX_ID_CHARS
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_records, request_event

pytestmark = pytest.mark.stack

ROW = [0.5] * N_FEATURES
LONGEST = "r" * MAX_ID_CHARS
OVER = "o" * (MAX_ID_CHARS + 1)


def body(request_id: str, rows: int = 1) -> dict:
    return {"id": request_id, "inputs": [{"name": "input", "shape": [rows, N_FEATURES], "datatype": "FP32",
                                          "data": ROW * rows}]}


async def test_an_id_over_the_bound_is_refused_on_rest_grpc_and_kafka(stack, topics, repository,
                                                                      redis_prefix) -> None:  # type: ignore[no-untyped-def]
    t = topics.topics
    running = await start_gateway(gateway_config(stack, topics, repository, redis_prefix))
    gateway = running.gateway
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30) as http:
            accepted = await http.post("/v2/models/fixed-route/infer", json=body(LONGEST))
            assert accepted.status_code == 200, accepted.text
            refused = await http.post("/v2/models/fixed-route/infer", json=body(OVER))
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert f"{MAX_ID_CHARS + 1} characters" in error and "\n" not in error and OVER not in error
            # two rows: the second row's prediction id would be <id>/1, one character over
            rows = await http.post("/v2/models/fixed-route/infer", json=body("w" * (MAX_ID_CHARS - 1), rows=2))
            assert rows.status_code == 400 and "'<id>/<row>'" in rows.json()["error"], rows.text
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb2.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[1, N_FEATURES],
                contents=pb2.InferTensorContents(fp32_contents=ROW))
            answer = await stub.ModelInfer(pb2.ModelInferRequest(model_name="fixed-route", id="g" * MAX_ID_CHARS,
                                                                 inputs=[tensor]))
            assert answer.id == "g" * MAX_ID_CHARS
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(pb2.ModelInferRequest(model_name="fixed-route", id="G" * (MAX_ID_CHARS + 1),
                                                            inputs=[tensor]))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{MAX_ID_CHARS + 1} characters" in (info.value.details() or "")
        await produce(stack.kafka, t.requests, [(b"k", request_event("K" * (MAX_ID_CHARS + 1), "fixed-route", ROW)),
                                                (b"k-ok", request_event("k-ok", "fixed-route", ROW))])
        dead = await read_records(stack.kafka, t.deadletter, lambda rs: len(rs) >= 1)
        predictions = await read_records(stack.kafka, t.predictions, lambda rs: {
            LONGEST.encode(), b"g" * MAX_ID_CHARS, b"k-ok"} <= {r.key for r in rs})
    finally:
        assert await running.stop() == 0
    assert [orjson.loads(d.value)["reason"] for d in dead] == ["bad_id"]
    keys = {r.key for r in predictions}
    assert {LONGEST.encode(), b"g" * MAX_ID_CHARS, b"k-ok"} <= keys
    assert all(len(key) <= MAX_ID_CHARS for key in keys)  # nothing over the bound was published
    errors = gateway.metrics.errors
    assert errors.labels("fixed-route", "bad_id", "rest")._value.get() == 2
    assert errors.labels("fixed-route", "bad_id", "grpc")._value.get() == 1
