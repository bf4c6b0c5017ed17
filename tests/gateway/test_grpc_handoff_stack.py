"""ModelInfer's hand-off to the loop in bursts (gateway/transport/grpc_handoff.py), over a real
in-process gateway on the real stack: many calls at once each get their own row's answer (the
same as REST's) and their prediction events; a call that times out, or that its client cancels,
gives its in-flight slot back at once and exactly once (its row's later result is dropped); a
full gateway answers RESOURCE_EXHAUSTED with when to retry; a bad tensor is INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from tests.gateway.support import N_FEATURES, RunningGateway, gateway_config, start_gateway
from tests.gateway.test_delivery_refusals import read_ids

pytestmark = pytest.mark.stack

ROUTE = [{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "m-a", "version": 1}]}]


def infer_request(row: np.ndarray, request_id: str, model: str = "r") -> pb2.ModelInferRequest:
    tensor = pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, N_FEATURES])
    return pb2.ModelInferRequest(model_name=model, id=request_id, inputs=[tensor],
                                 raw_input_contents=[row.astype(np.float32).tobytes()])


def in_flight(running: RunningGateway) -> int:
    server = running.gateway.grpc
    assert server is not None and server.infer_queue is not None
    return server.infer_queue.ctx.in_flight


async def test_a_burst_of_calls_each_gets_its_own_answer_and_event(stack, topics, repository,  # type: ignore[no-untyped-def]
                                                                    redis_prefix) -> None:
    running = await start_gateway(gateway_config(stack, topics, repository, redis_prefix, routes=ROUTE))
    gateway = running.gateway
    rows = np.random.default_rng(3).uniform(0, 5, (24, N_FEATURES)).astype(np.float32)
    ids = [f"burst-{i}" for i in range(len(rows))]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            answers = await asyncio.gather(*(stub.ModelInfer(infer_request(row, i), timeout=20)
                                             for row, i in zip(rows, ids, strict=True)))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as client:
            expected = []
            for row in rows:
                response = await client.post("/v2/models/r/infer", json={"inputs": [
                    {"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": row.tolist()}]})
                assert response.status_code == 200, response.text
                expected.append(response.json()["outputs"][0]["data"][0])
        for answer, request_id, want in zip(answers, ids, expected, strict=True):
            assert answer.id == request_id
            assert answer.parameters["route"].string_param == "r" and answer.parameters["arm"].string_param == "a"
            assert answer.parameters["request_id"].string_param == request_id
            got = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)[0]
            assert got == pytest.approx(want, rel=1e-6)
        assert in_flight(running) == 0
        events = await read_ids(stack.kafka, topics.topics.predictions, set(ids))
        assert {e["request_id"] for e in events} >= set(ids)
    finally:
        assert await running.stop() == 0


async def _slow_gateway(stack, topics, repository: Path, redis_prefix: str, **server: object) -> RunningGateway:  # type: ignore[no-untyped-def]
    # a lone row waits 0.6 s for company (idle_flush off): past the calls' ends below
    return await start_gateway(gateway_config(
        stack, topics, repository, redis_prefix, routes=ROUTE,
        batching={"max_batch_size": 64, "max_delay_us": 600_000, "idle_flush": False},
        server={"http_port": 0, "grpc_port": 0, **server}))


async def test_a_timed_out_or_cancelled_call_gives_its_slot_back_once(stack, topics, repository,  # type: ignore[no-untyped-def]
                                                                       redis_prefix) -> None:
    running = await _slow_gateway(stack, topics, repository, redis_prefix, request_timeout_s=0.05)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            row = np.ones(N_FEATURES, dtype=np.float32)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(infer_request(row, "late"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "0.05" in (raised.value.details() or "")
            assert in_flight(running) == 0  # at once: its row is still queued
            await asyncio.sleep(0.8)  # the row's batch ran: its result is dropped, the slot not given back twice
            assert in_flight(running) == 0

        await running.stop()
        running = await _slow_gateway(stack, topics, repository, redis_prefix, request_timeout_s=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer(infer_request(row, "gone"), timeout=10)
            for _ in range(100):
                if in_flight(running) == 1:
                    break
                await asyncio.sleep(0.01)
            assert in_flight(running) == 1
            call.cancel()
            for _ in range(100):
                if in_flight(running) == 0:
                    break
                await asyncio.sleep(0.01)
            assert in_flight(running) == 0  # before its batch ran (0.6 s)
            await asyncio.sleep(0.8)
            assert in_flight(running) == 0
            # the gateway still answers
            answer = await stub.ModelInfer(infer_request(row, "after"), timeout=10)
            assert answer.id == "after"
    finally:
        if not running.task.done():
            assert await running.stop() == 0


async def test_overload_and_bad_input_over_grpc(stack, topics, repository, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    running = await _slow_gateway(stack, topics, repository, redis_prefix, max_in_flight_requests=1)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.gateway.grpc_port}") as channel:
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            row = np.ones(N_FEATURES, dtype=np.float32)
            first = stub.ModelInfer(infer_request(row, "first"), timeout=10)
            for _ in range(100):
                if in_flight(running) == 1:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(infer_request(row, "second"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(raised.value.trailing_metadata() or ())
            assert trailers.get("retry-after") == "1" and trailers.get("grpc-retry-pushback-ms") == "1000"
            assert (await first).id == "first"
            bad = infer_request(np.full(N_FEATURES, np.nan, dtype=np.float32), "nan")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(bad, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert in_flight(running) == 0
    finally:
        assert await running.stop() == 0
