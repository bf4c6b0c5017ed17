"""banditgate.client over OIP gRPC: against a real `banditgate serve` sidecar (routes, binary
tensors both ways, the prediction published with the caller's trace, the gateway's refusals, a
bearer token over mTLS), and the retry policy against a scripted grpc.aio server speaking the same
contract (a real gateway cannot be made to answer RESOURCE_EXHAUSTED on cue)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from banditgate.client import ClientError, GatewayRejected, InvalidRequest, SyncGrpcClient
from banditgate.client.grpc import GrpcClient, decode_output, encode_tensor, retry_hint
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc
from banditgate.tracecontext import new_traceparent, parse_traceparent, trace_id_of
from tests.client.conftest import N_FEATURES
from tests.kafka_helpers import read_records
from tests.processes import start_serve

ROW = [0.5] * N_FEATURES
TOKEN = "grpc-client-tok-0f3a"  # noqa: S105 - a test token


# -- pure ----------------------------------------------------------------------------------------


def test_the_client_and_the_gateway_share_one_copy_of_the_stubs() -> None:
    from gateway.transport import grpc_server

    assert grpc_server.pb2 is pb2 and grpc_server.pb2_grpc is pb2_grpc
    root = Path(__file__).resolve().parents[2]
    copies = sorted(str(p.relative_to(root)) for package in ("banditgate", "gateway", "router", "feedback", "loadtests")
                    for p in (root / package).rglob("*_pb2*.py"))
    assert copies == sorted(f"banditgate/proto/{name}_pb2{grpc}.py" for name in (
        "grpc_predict_v2", "banditgate_service", "health") for grpc in ("", "_grpc"))


def test_importing_the_client_loads_no_grpc_until_asked() -> None:
    code = ("import sys, banditgate.client as c; a = 'grpc' in sys.modules; c.GrpcClient; "
            "print(a, 'grpc' in sys.modules, 'gateway' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: S603 - fixed argv
                         check=True).stdout
    assert out == "False True False\n"


@pytest.mark.parametrize("value", [np.arange(6, dtype=np.int8).reshape(2, 3), np.float16([1.5, -2]),
                                   np.array([True, False]), [0.25, 0.5], np.uint64([2**64 - 1]),
                                   np.array(["a", "bé"])])
def test_binary_tensors_round_trip(value: Any) -> None:
    tensor, raw = encode_tensor("x", value)
    assert list(tensor.shape) == [1, *np.shape(value)]
    out = pb2.ModelInferResponse.InferOutputTensor(name="x", datatype=tensor.datatype, shape=tensor.shape)
    back = decode_output(out, raw)[0]
    expected = np.asarray(value)
    if expected.dtype.kind == "U":
        expected = np.array([v.encode() for v in expected.reshape(-1)], dtype=object).reshape(expected.shape)
    assert back.dtype == expected.dtype or expected.dtype.kind == "O"
    assert back.tolist() == expected.tolist()


def test_non_finite_and_uncarried_values_fail_in_the_client() -> None:
    with pytest.raises(InvalidRequest) as caught:
        encode_tensor("x", [0.5, float("inf")])
    assert caught.value.reason == "not_finite"
    with pytest.raises(InvalidRequest) as wrong:
        encode_tensor("x", np.array([1 + 2j]))
    assert wrong.value.reason == "wrong_type"


def test_retry_hint_prefers_the_pushback_and_ignores_nonsense() -> None:
    assert retry_hint((("retry-after", "2"), ("grpc-retry-pushback-ms", "250"))) == 0.25
    assert retry_hint((("retry-after", "3"),)) == 3.0
    assert retry_hint((("grpc-retry-pushback-ms", "-1"), ("retry-after", "x"))) is None
    assert retry_hint(None) is None


# -- retries against a scripted server -----------------------------------------------------------


class Scripted(pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with the scripted statuses in turn (then an answer), recording when each
    call arrived and its metadata."""

    def __init__(self, script: list[tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]]) -> None:
        self.script = list(script)
        self.calls: list[tuple[float, dict[str, str]]] = []

    async def ModelInfer(self, request: pb2.ModelInferRequest,  # noqa: N802 - the proto's name
                         context: grpc.aio.ServicerContext) -> pb2.ModelInferResponse:
        self.calls.append((time.monotonic(), dict(context.invocation_metadata() or ())))
        if self.script:
            code, trailers = self.script.pop(0)
            await context.abort(code, f"scripted {code.name}", trailing_metadata=trailers)
        out = np.float32([[0.75]])
        return pb2.ModelInferResponse(
            model_name=request.model_name, parameters={"arm": pb2.InferParameter(string_param="a"),
                                                       "propensity": pb2.InferParameter(string_param="0.5"),
                                                       "request_id": pb2.InferParameter(string_param=request.id)},
            outputs=[pb2.ModelInferResponse.InferOutputTensor(name="p", datatype="FP32", shape=[1, 1])],
            raw_output_contents=[out.tobytes()])


async def _serve_scripted(servicer: Scripted) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_retries_wait_what_the_server_says_and_stop_at_final_statuses() -> None:
    pushback = (("retry-after", "1"), ("grpc-retry-pushback-ms", "300"))
    servicer = Scripted([(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback), (grpc.StatusCode.UNAVAILABLE, pushback),
                         (grpc.StatusCode.INVALID_ARGUMENT, ())])
    server, port = await _serve_scripted(servicer)
    try:
        async with GrpcClient(f"127.0.0.1:{port}", token=TOKEN, check_inputs=False, retries=3) as client:
            with pytest.raises(GatewayRejected) as caught:
                await client.predict("r", {"x": [1.0]}, request_id="q1")
            assert caught.value.reason == "bad_input"  # INVALID_ARGUMENT is final
            assert len(servicer.calls) == 3
            # each retry came no sooner than the server's pushback (a lower bound: the client slept it)
            assert servicer.calls[1][0] - servicer.calls[0][0] >= 0.29
            assert servicer.calls[2][0] - servicer.calls[1][0] >= 0.29
            assert servicer.calls[0][1]["authorization"] == f"Bearer {TOKEN}"
            assert parse_traceparent(servicer.calls[0][1]["traceparent"]) is not None

            answer = await client.predict("r", {"x": [1.0]}, request_id="q2")
            assert answer.arm == "a" and answer.propensity == 0.5 and answer.outputs["p"].tolist() == [0.75]

            servicer.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback)] * 2
            client.retries = 1
            with pytest.raises(GatewayRejected) as exhausted:
                await client.predict("r", {"x": [1.0]})
            assert exhausted.value.reason == "overloaded"
    finally:
        await server.stop(None)


async def test_no_server_is_unreachable_after_the_retries() -> None:
    from tests.processes import free_port

    async with GrpcClient(f"127.0.0.1:{free_port()}", check_inputs=False, retries=1, max_backoff_s=0.05,
                          timeout_s=5) as client:
        with pytest.raises(ClientError) as caught:
            await client.predict("r", {"x": [1.0]})
    assert caught.value.reason == "unreachable"


# -- a real gateway ------------------------------------------------------------------------------


@pytest.mark.stack
async def test_predict_over_grpc_against_the_sidecar(stack, topics, gateway) -> None:  # type: ignore[no-untyped-def]
    parent = new_traceparent()
    async with GrpcClient(f"grpc://127.0.0.1:{gateway.grpc_port}") as client:
        as32 = await client.predict("churn", {"input": np.full(N_FEATURES, 0.5, dtype=np.float32)},
                                    request_id="g1", unit="u1", traceparent=parent)
        as64 = await client.predict("churn", {"input": ROW}, request_id="g2")  # a list: FP64, cast by the gateway
        direct = await client.predict("m-b", {"input": ROW}, request_id="g3", version=1)
        with pytest.raises(InvalidRequest) as shape:
            await client.predict("churn", {"input": [0.5, 0.5]})  # the model's metadata, in the client
        assert shape.value.reason == "bad_input"
        with pytest.raises(GatewayRejected) as unknown:
            await client.predict("nope", {"input": ROW})
        assert unknown.value.reason == "unknown_route"
    for answer, rid in ((as32, "g1"), (as64, "g2")):
        assert answer.request_id == rid and answer.route == "churn" and answer.arm in ("a", "b")
        assert answer.model in ("m-a", "m-b") and answer.model_version == 1 and 0 < answer.propensity <= 1
        assert answer.policy == "thompson"
        assert answer.outputs["probability"].dtype == np.float32 and answer.outputs["probability"].shape == (1,)
    assert direct.model == "m-b" and direct.policy == "direct"
    assert as32.traceparent == parent

    async with GrpcClient(f"127.0.0.1:{gateway.grpc_port}", check_inputs=False) as unchecked:
        with pytest.raises(GatewayRejected) as refused:
            await unchecked.predict("churn", {"input": [0.5, 0.5]})  # the gateway's own check
        assert refused.value.reason == "bad_input"

    def by_id(records: list[Any]) -> dict[str, Any]:
        return {orjson.loads(r.value)["request_id"]: r for r in records}

    published = by_id(await read_records(stack.kafka, topics.topics.predictions,
                                         lambda rs: {"g1", "g2", "g3"} <= set(by_id(rs))))
    event = orjson.loads(published["g1"].value)
    assert (event["arm"], event["model"], event["propensity"]) == (as32.arm, as32.model, as32.propensity)
    traced = dict(published["g1"].headers)["traceparent"]
    assert trace_id_of(parse_traceparent(traced) or "") == trace_id_of(parent)


@pytest.fixture
def tls_gateway(config, tmp_path: Path):  # type: ignore[no-untyped-def]
    import ssl

    from tests.security.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    config["server"] = {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key),
                        "client_ca_file": str(pki.ca)}
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    served = start_serve(config, tmp_path, env={"BANDITGATE_INFER_TOKENS": TOKEN}, scheme="https",
                         ssl_context=context)
    yield served, pki
    served.stop()


@pytest.mark.stack
def test_bearer_token_over_mtls_with_the_blocking_client(tls_gateway) -> None:  # type: ignore[no-untyped-def]
    served, pki = tls_gateway
    target = f"grpcs://127.0.0.1:{served.grpc_port}"
    pems = {"root_certificates": pki.ca.read_bytes(), "private_key": pki.client_key.read_bytes(),
            "certificate_chain": pki.client_cert.read_bytes()}
    with SyncGrpcClient(target, token=TOKEN, **pems) as client:
        answer = client.predict("churn", {"input": ROW}, request_id="tls1")
        assert answer.request_id == "tls1" and answer.outputs["probability"].shape == (1,)
    with SyncGrpcClient(target, **pems) as anonymous, pytest.raises(GatewayRejected) as caught:
        anonymous.predict("churn", {"input": ROW})
    assert caught.value.reason == "not_authorized"
    with SyncGrpcClient(target, token=TOKEN, root_certificates=pki.ca.read_bytes(), retries=0) as no_cert, \
            pytest.raises(ClientError) as handshake:
        no_cert.predict("churn", {"input": ROW})  # mTLS: no client certificate, no call
    assert handshake.value.reason == "unreachable"
