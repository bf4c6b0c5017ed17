"""CallBridge: a gRPC call served in grpc's thread with its work on the event loop. Over a real
sync grpc.server on loopback (no Kafka): the loop-side answer, an Abort's status and trailers,
and a client's cancellation reaching the loop-side work."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

from gateway.transport.grpc_server import Abort, CallBridge, GrpcServer

METHOD = "/test.Bridge/Call"


async def test_bridge_answers_aborts_and_cancels_on_the_loop() -> None:
    bridge = CallBridge()
    loop_thread: list[bool] = []
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def on_loop(request: bytes, metadata: dict[str, str | bytes]) -> bytes:
        loop_thread.append(asyncio.get_running_loop() is bridge.loop)
        if request == b"overload":
            raise Abort(grpc.StatusCode.UNAVAILABLE, "queue full", (("retry-after", "1"),))
        if request == b"hang":
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return b"echo:" + request + b":" + str(metadata.get("x-who")).encode()

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        return bridge.run(on_loop, request, dict(context.invocation_metadata() or ()), context)

    executor = ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor, handlers=[grpc.method_handlers_generic_handler(
        "test.Bridge", {"Call": grpc.unary_unary_rpc_method_handler(handler)})])
    port = server.add_insecure_port("127.0.0.1:0")
    wrapped = GrpcServer(server, bridge, executor)
    await wrapped.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)
            assert await call(b"hi", metadata=(("x-who", "me"),), timeout=10) == b"echo:hi:me"
            try:
                await call(b"overload", timeout=10)
                raise AssertionError("the Abort did not end the call")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert exc.details() == "queue full"
                assert ("retry-after", "1") in tuple(exc.trailing_metadata() or ())
            hanging = call(b"hang", timeout=30)
            await asyncio.wait_for(started.wait(), timeout=10)
            hanging.cancel()
            await asyncio.wait_for(cancelled.wait(), timeout=10)  # the loop-side work was cancelled
        assert loop_thread and all(loop_thread)
    finally:
        await wrapped.stop(grace=None)
