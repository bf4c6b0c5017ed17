"""The gRPC floors for `banditgate bench http`: a ModelInfer that does nothing.

    python -m loadtests.grpc_floor PORT [aio|sync]

Serves `inference.GRPCInferenceService/ModelInfer` and answers every call with one fixed
response: no decoding, routing, batching or inference. Driven by the same generator on the same
pinned core as the real servers, it measures the most requests per second a service on that
gRPC server can answer there:

- `aio` (default): grpc.aio on uvloop, the server MLServer's gRPC runs on (and banditgate's did);
- `sync`: a sync `grpc.server` on the gateway's thread count (gateway.transport.grpc_server.
  GRPC_THREADS), the server banditgate's gRPC sidecar runs on: its ceiling.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import uvloop

from gateway.transport.grpc_server import GRPC_THREADS
from banditgate.proto import grpc_predict_v2_pb2 as pb2
from banditgate.proto import grpc_predict_v2_pb2_grpc as pb2_grpc

_ANSWER = pb2.ModelInferResponse(
    model_name="floor", model_version="1",
    outputs=[pb2.ModelInferResponse.InferOutputTensor(name="probability", datatype="FP32", shape=[1, 1])],
    raw_output_contents=[b"\x00\x00\x00\x00"])


class _Floor(pb2_grpc.GRPCInferenceServiceServicer):
    async def ServerReady(self, request, context):  # noqa: N802 - names fixed by the proto
        return pb2.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request, context):  # noqa: N802
        return _ANSWER


class _SyncFloor(pb2_grpc.GRPCInferenceServiceServicer):
    def ServerReady(self, request, context):  # noqa: N802 - names fixed by the proto
        return pb2.ServerReadyResponse(ready=True)

    def ModelInfer(self, request, context):  # noqa: N802
        return _ANSWER


async def _serve(port: int) -> None:
    server = grpc.aio.server()
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Floor(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise SystemExit(f"grpc_floor: cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _serve_sync(port: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=GRPC_THREADS))
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_SyncFloor(), server)
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise SystemExit(f"grpc_floor: cannot listen on 127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or not argv[0].isdigit() or argv[1:] not in ([], ["aio"], ["sync"]):
        print("usage: python -m loadtests.grpc_floor PORT [aio|sync]", file=sys.stderr)
        return 2
    if argv[1:] == ["sync"]:
        _serve_sync(int(argv[0]))
    else:
        uvloop.run(_serve(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
