"""ModelInfer's hand-off from grpc's threads to the gateway's event loop, in bursts.

A call's gRPC thread decodes its tensors, queues the call and waits on a lock of its own; the
loop is woken once per burst (one `call_soon_threadsafe` for all the calls that queued while it
was busy), routes, validates and queues every call of the burst in the model's batcher before
flushing it, so a burst shares one inference, and wakes each thread by releasing its lock when
the call's answer is ready. The thread then encodes the response. What touches the gateway's
state (routing, batching, admission, metrics, publication) stays on the loop; no task, no
coroutine and no concurrent future per call (the per-call hand-off they made cost more server
CPU than all of the dataplane's work: docs/sidecar.md "Where the time goes").

Every resolution (answer, failure, timeout, cancellation) happens on the loop, once per call;
only a call whose loop has stopped is released from its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import NoReturn

import numpy as np

from banditgate.jsontypes import JSONObject
from banditgate.tracecontext import TraceHeaders
from gateway.batching.batcher import RowsResult
from gateway.dataplane import Routed, TensorAnswer, TensorCall, decide_routes, finish_tensors, start_tensors
from gateway.errors import GatewayError
from gateway.models.onnx_runtime import OnnxModel
from gateway.transport.http import SidecarContext, _label_name

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The call ended (client gone, deadline passed, shutdown) before its answer, or the gateway
    is not serving (UNAVAILABLE)."""


class InferCall:
    """One ModelInfer call between its gRPC thread and the loop. The thread fills the request
    fields and waits on `done`; the loop sets `answer` or `error` and releases `done`, once."""

    __slots__ = ("answer", "decode_error", "done", "error", "feeds", "finished", "model_name", "model_version",
                 "received_s", "request_id", "tensor_call", "trace", "ts_request", "unit_id")

    def __init__(self, model_name: str, model_version: str | None, request_id: str, unit_id: str | None,
                 received_s: float, trace: TraceHeaders | None) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.request_id = request_id
        self.unit_id = unit_id
        self.received_s = received_s
        self.ts_request = time.time()
        self.trace = trace
        self.feeds: dict[str, np.ndarray] = {}
        self.decode_error: GatewayError | None = None
        self.answer: TensorAnswer | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.tensor_call: TensorCall | None = None
        self.done = threading.Lock()
        self.done.acquire()


class InferQueue:
    """Hands ModelInfer calls to the loop in bursts (module docstring). `loop` is set when the
    server starts; until then (and once it is closed) `serve` raises Cancelled."""

    def __init__(self, ctx: SidecarContext) -> None:
        self.ctx = ctx
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[InferCall] = deque()
        self._scheduled = False
        self._answered_calls: list[InferCall] = []
        self._finishing = False

    # -- the call's thread ------------------------------------------------------------------

    def serve(self, call: InferCall, on_end: Callable[[Callable[[], None]], object]) -> TensorAnswer:
        """Queue `call`, wait for its answer (in the call's gRPC thread) and return it. Raises the
        call's GatewayError, TimeoutError past `server.request_timeout_s`, Cancelled when the call
        ended first or the loop is not running, or the defect that broke it. `on_end` registers a
        callback grpc runs when the call ends (`ServicerContext.add_callback`): a call the client
        cancels is resolved at once."""
        loop = self.loop
        if loop is None or loop.is_closed():
            raise Cancelled("the gateway is not serving (starting or stopped)")
        self._queue.append(call)
        # after the append: a drain that already cleared the flag schedules nothing for this call,
        # so this thread does (a spare wake-up at worst); one that has not run yet will see it
        if not self._scheduled:
            self._scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # closed since the check above
                self._scheduled = False
                self._release_here(call)
        on_end(partial(self._ended, loop, call))
        # the deadline is kept here, not by a timer on the loop per call
        if not call.done.acquire(timeout=self.ctx.config.server.request_timeout_s):
            try:
                loop.call_soon_threadsafe(self._timed_out, call)
            except RuntimeError:  # the loop is closed: nothing else can release the thread
                self._release_here(call)
            call.done.acquire()
        if call.error is not None:
            raise call.error
        if call.answer is None:  # pragma: no cover - every resolution sets one of them
            raise AssertionError("a call resolved without an answer or an error")
        return call.answer

    def _ended(self, loop: asyncio.AbstractEventLoop, call: InferCall) -> None:
        """grpc's end-of-call callback: nothing once answered; otherwise resolve it as cancelled."""
        if call.finished:
            return
        try:
            loop.call_soon_threadsafe(self._cancel, call)
        except RuntimeError:  # the loop is closed: nothing else can release the thread
            if not call.finished:
                call.finished = True
                call.error = Cancelled("the call was cancelled (client gone or shutdown)")
                call.done.release()

    @staticmethod
    def _release_here(call: InferCall) -> NoReturn:
        """A call whose loop closed before it was answered: ended here (the loop cannot any more)."""
        call.finished = True
        raise Cancelled("the gateway stopped before the call was answered")

    # -- the event loop ---------------------------------------------------------------------

    def _drain(self) -> None:
        self._scheduled = False
        queue = self._queue
        burst = [queue.popleft() for _ in range(len(queue))]
        dataplane = self.ctx.dataplane
        routes = dataplane.routes
        by_route: dict[str, list[InferCall]] = {}
        for call in burst:
            if not call.finished and call.model_version is None and call.model_name in routes:
                by_route.setdefault(call.model_name, []).append(call)
        routed: dict[int, Routed] = {}
        for name, calls in by_route.items():  # one draw per route for the whole burst
            try:
                routed.update(zip(map(id, calls), decide_routes(dataplane, name, [c.unit_id for c in calls]),
                                  strict=True))
            except Exception:  # a defect; each call then decides alone (and fails alone)
                log.exception("routing a burst of %d calls for %r failed", len(calls), name)
        models: dict[int, OnnxModel] = {}  # by identity (a model is a dataclass: not hashable)
        for call in burst:
            if call.finished:  # cancelled before the loop saw it
                continue
            try:
                self._start(call, routed.get(id(call)), models)
            except Exception as exc:  # noqa: BLE001 - a defect: this call fails (grpc logs it), the burst goes on
                self._resolve(call, error=exc)
        for model in models.values():  # the burst's rows are queued: now flush them, together
            dataplane.batcher(model).kick()

    def _start(self, call: InferCall, routed: Routed | None, models: dict[int, OnnxModel]) -> None:
        ctx = self.ctx
        if call.decode_error is not None:
            ctx.record(_label_name(ctx, call.model_name), "grpc", error=call.decode_error)
            self._resolve(call, error=call.decode_error)
            return
        try:
            ctx.admit()
        except GatewayError as exc:
            ctx.record(_label_name(ctx, call.model_name), "grpc", error=exc)
            self._resolve(call, error=exc)
            return
        try:
            trace = call.trace
            shadows = ctx.config.kafka.topics.shadow_predictions
            tensor_call = start_tensors(
                ctx.dataplane, call.model_name, call.model_version, call.feeds, call.request_id, call.unit_id,
                call.ts_request, call.received_s,
                on_shadows=lambda events: ctx.publish(shadows, events, trace=trace), defer=True, routed=routed)
        except GatewayError as exc:
            ctx.in_flight -= 1
            ctx.record(_label_name(ctx, call.model_name), "grpc", error=exc)
            self._resolve(call, error=exc)
            return
        except BaseException:
            ctx.in_flight -= 1
            raise
        call.tensor_call = tensor_call
        models[id(tensor_call.model)] = tensor_call.model
        tensor_call.future.add_done_callback(partial(self._answered, call))

    def _answered(self, call: InferCall, _future: asyncio.Future[RowsResult]) -> None:
        if call.finished:  # timed out or cancelled: its slot was given back then
            return
        # the calls a batch answers are finished together, after its last callback
        self._answered_calls.append(call)
        if not self._finishing:
            self._finishing = True
            asyncio.get_running_loop().call_soon(self._finish)

    def _finish(self) -> None:
        """Answer the calls whose rows came back: their events published in one go (per trace
        context), their requests counted once per (route, arm), then their threads released."""
        self._finishing = False
        calls, self._answered_calls = self._answered_calls, []
        ctx = self.ctx
        labels: dict[str, str] = {}
        counts: dict[tuple[str, str | None], int] = {}
        untraced: list[JSONObject] = []
        answered: list[tuple[InferCall, TensorAnswer]] = []
        predictions = ctx.config.kafka.topics.predictions
        for call in calls:
            if call.finished or call.tensor_call is None:  # ended while its answer waited for this
                continue
            ctx.in_flight -= 1
            label = labels.get(call.model_name)
            if label is None:
                label = labels[call.model_name] = _label_name(ctx, call.model_name)
            try:
                answer = finish_tensors(call.tensor_call)
            except GatewayError as exc:
                ctx.record(label, "grpc", error=exc)
                self._resolve(call, error=exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a defect: this call fails (grpc logs it)
                self._resolve(call, error=exc)
                continue
            counts[label, answer.arm] = counts.get((label, answer.arm), 0) + 1
            if call.trace is None:
                untraced.extend(answer.events)
            else:
                ctx.publish(predictions, answer.events, trace=call.trace)
            answered.append((call, answer))
        if untraced:
            ctx.publish(predictions, untraced)
        for (label, arm), count in counts.items():
            ctx.record(label, "grpc", arm=arm, count=count)
        for call, answer in answered:
            self._resolve(call, answer=answer)

    def _timed_out(self, call: InferCall) -> None:
        if call.finished:
            return
        ctx = self.ctx
        ctx.record(_label_name(ctx, call.model_name), "grpc", error=TimeoutError("timeout"))
        self._abandon(call, TimeoutError(f"inference did not finish within {ctx.config.server.request_timeout_s}s"))

    def _cancel(self, call: InferCall) -> None:
        if not call.finished:
            self._abandon(call, Cancelled("the call was cancelled (client gone or shutdown)"))

    def _abandon(self, call: InferCall, error: Exception) -> None:
        """End a call whose rows are queued or running: its slot is free again, its rows' future
        cancelled (the batch drops their result)."""
        if call.tensor_call is not None:
            self.ctx.in_flight -= 1
            call.tensor_call.future.cancel()
        self._resolve(call, error=error)

    @staticmethod
    def _resolve(call: InferCall, answer: TensorAnswer | None = None, error: BaseException | None = None) -> None:
        if call.finished:
            return
        call.finished = True
        call.answer, call.error = answer, error
        call.done.release()


__all__ = ["Cancelled", "InferCall", "InferQueue"]
