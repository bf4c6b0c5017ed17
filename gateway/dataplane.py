"""The transport-agnostic core: route a batch of requests, validate, infer, and build predictions.

Kafka, REST and gRPC all call `Dataplane.serve`; transports only decode and encode.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from banditgate.config import Arm, Config, Route
from banditgate.events import prediction_event
from banditgate.jsontypes import JSONObject
from banditgate.tracing import AttributeValue, Stages
from gateway.batching.batcher import ModelBatcher, RowsResult
from gateway.batching.circuit import CircuitPolicy, thread_share
from gateway.batching.policy import BatchPolicy
from gateway.errors import GatewayError, InferenceFailed, ModelNotFound, ModelUnavailable, Overloaded
from gateway.models.onnx_runtime import OnnxModel
from gateway.models.repository import ModelRepository
from gateway.ranking import serve_interleave
from gateway.serving import Answer, Pending, RouteRuntime
from gateway.validation import validate_batch
from router.decision import RoutePolicy

RETIRE_POLL_S = 0.05
"""How often an unloaded model version's batcher is checked for rows still queued or running."""


def usable_cpus() -> float:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota when there is one."""
    cpus = float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else float(os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus


T = TypeVar("T")


def _retrieve(future: asyncio.Future[T]) -> None:
    """Mark the outcome of a future nobody awaits as seen (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


class Dataplane:
    """Owns the route policies, the per-model batchers, and the path from rows to predictions."""

    def __init__(self, config: Config, repository: ModelRepository, executor: Executor,
                 on_batch: Callable[[OnnxModel, int, float, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 rng: np.random.Generator | None = None) -> None:
        self.config = config
        self.repository = repository
        self.executor = executor
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_batch = on_batch
        self.policy = BatchPolicy(config.batching.max_batch_size, config.batching.max_delay_us,
                                  config.batching.max_queue_rows, config.batching.idle_flush)
        self.circuit = CircuitPolicy(thread_share(config.batching.inference_threads, config.batching.model_max_threads),
                                     config.models.unavailable_retry_s, config.models.unavailable_retry_max_s)
        seed_rng = rng or np.random.default_rng()
        self._merge_rng = np.random.default_rng(seed_rng.integers(2**63))
        self.routes = {r.name: RouteRuntime(r, RoutePolicy.from_route(r, np.random.default_rng(seed_rng.integers(2**63))))
                       for r in config.routes}
        self.batchers: dict[str, ModelBatcher] = {}
        configured = config.batching.inline_max_us
        self.inline_max_us = configured if configured is not None else (100 if usable_cpus() <= 1 else 0)
        # (route, arm) -> [rows that reached the arm's model, rows it failed on]: the guardrail's
        # error-rate test reads these from the store, so a crashing or hanging model gets drained
        self._calls: dict[tuple[str, str], list[int]] = {}
        repository.on_swap.append(self._swap)
        # called with (model, route, arm, feeds, outputs) for every served batch (drift monitors)
        self.on_served: Callable[[OnnxModel, str, str, dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None
        # called with each unloaded model version once its batches are done (metrics cleanup)
        self.on_retired: list[Callable[[OnnxModel], None]] = []
        self._retiring: set[asyncio.Task] = set()

    # -- batchers --------------------------------------------------------------------------------

    def _swap(self, model: OnnxModel) -> None:
        batcher = self.batchers.get(model.key)
        if batcher is not None:
            batcher.model = model  # queued rows run on the new version from the next flush on
            batcher.circuit.retry_now()  # a replaced file may not hang: probe it at the next batch

    def collect_retired(self) -> int:
        """Free the model versions the repository unloaded (a superseded `latest`, a released
        rollout candidate): each one's batcher - the last reference to its session - is dropped
        once the rows queued or running on it are done, then `on_retired` is told. Call on the
        event loop after a scan or a release; returns how many versions it took."""
        retired = self.repository.take_retired()
        loop = asyncio.get_running_loop()
        for model in retired:
            task = loop.create_task(self._retire_when_idle(model))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return len(retired)

    async def _retire_when_idle(self, model: OnnxModel) -> None:
        batcher = self.batchers.get(model.key)
        # the batcher's queued_rows counts rows waiting and running; a batch past its timeout no
        # longer counts (its thread may still hold the session until ONNX Runtime returns)
        while batcher is not None and batcher.model is model and batcher.queued_rows > 0:
            await asyncio.sleep(RETIRE_POLL_S)
        if batcher is not None and batcher.model is model and self.batchers.get(model.key) is batcher:
            del self.batchers[model.key]
        if any(m.key == model.key for m in self.repository.loaded()):
            return  # the same version was loaded again meanwhile (a rollout's ensure): it serves
        for callback in self.on_retired:
            callback(model)

    def batcher(self, model: OnnxModel) -> ModelBatcher:
        batcher = self.batchers.get(model.key)
        if batcher is None:
            batcher = ModelBatcher(model, self.executor, self.policy, self.config.models.inference_timeout_s,
                                   clock=self.clock, observe=self.on_batch,
                                   inline_max_us=self.inline_max_us, circuit=self.circuit)
            self.batchers[model.key] = batcher
        return batcher

    def model_available(self, model: OnnxModel) -> bool:
        """False while the model version is unavailable (a batch outlived the timeout and no probe
        has answered in time since)."""
        batcher = self.batchers.get(model.key)
        return batcher is None or batcher.healthy

    def route_available(self, route_name: str) -> bool:
        """True if at least one of the route's arms has an available model (a drained arm's model
        counts too: the route's readiness is whether it can answer, not how it routes)."""
        runtime = self.routes[route_name]
        for arm in runtime.route.arms:
            try:
                model = self.repository.get(arm.model, arm.version)
            except ModelNotFound:
                continue
            if self.model_available(model):
                return True
        return False

    def count_calls(self, route: str, arm: str, calls: int, errors: int) -> None:
        """Add `calls` rows served by the arm's model, `errors` of which it failed (not bad input)."""
        slot = self._calls.get((route, arm))
        if slot is None:
            self._calls[(route, arm)] = [calls, errors]
        else:
            slot[0] += calls
            slot[1] += errors

    def take_call_counts(self) -> dict[str, dict[str, tuple[int, int]]]:
        """The counts since the last call, per route and arm as (calls, errors); resets them."""
        taken, self._calls = self._calls, {}
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for (route, arm), (calls, errors) in taken.items():
            out.setdefault(route, {})[arm] = (calls, errors)
        return out

    def queued_rows(self) -> int:
        return sum(b.queued_rows for b in self.batchers.values())

    async def wait_for_capacity(self) -> None:
        """Wait until every model's queue has room (Kafka backpressure)."""
        for batcher in list(self.batchers.values()):
            await batcher.wait_for_capacity(1)

    # -- serving ---------------------------------------------------------------------------------

    async def serve(self, route_name: str, requests: Sequence[Pending], reject_when_full: bool = False,
                    keep_outputs: bool = False, stages: Stages | None = None) -> list[Answer]:
        """Route, validate, infer and build prediction events for requests of one route.

        Raises Overloaded only when `reject_when_full` (HTTP/gRPC); every other problem is an
        Answer.error for the requests it concerns. `stages` (only when traced) gets the times of
        the decision and of each arm's queueing and inference.
        """
        runtime = self.routes[route_name]
        route = runtime.route
        if route.policy == "interleave":
            return await serve_interleave(self, runtime, requests, self._merge_rng)
        n = len(requests)
        decided_at = self.clock() if stages is not None else 0.0
        decision = runtime.policy.decide(n, [r.unit_id for r in requests] if route.sticky_key else None)
        if stages is not None:
            stages.add("gateway.decide", decided_at, self.clock(), {"banditgate.route": route.name,
                                                                    "banditgate.requests": n})
        answers = [Answer() for _ in range(n)]
        primary_jobs = []
        for arm_index, arm in enumerate(route.arms):
            rows = np.flatnonzero(decision.arm_index == arm_index)
            if rows.size:
                primary_jobs.append(self._start(route.name, arm_index, arm, rows, requests, answers, reject_when_full,
                                                record_errors=True, stages=stages))
        shadow_jobs = []
        for shadow_index, shadow in enumerate(route.shadows):
            rows = np.flatnonzero(decision.shadow_mask[:, shadow_index]) if decision.shadow_mask.size else np.empty(0, int)
            if rows.size:
                shadow_jobs.append(self._start(route.name, shadow_index, shadow, rows, requests, answers, False,
                                               record_errors=False, stages=stages))
        # shadows run beside the primaries, not after them: the answers wait for both (they are
        # published together), so running them one after the other only added the shadow's
        # queueing and inference to every answer's latency
        primary_running = asyncio.gather(*primary_jobs)  # started first: the answer's own model queues first
        shadows_running = asyncio.gather(*shadow_jobs, return_exceptions=True) if shadow_jobs else None
        try:
            primary = await primary_running
        except BaseException:
            if shadows_running is not None:
                shadows_running.cancel()
                # retrieved when it ends: nobody awaits it any more, and an unretrieved
                # CancelledError would be logged as an error pointing at the shadows
                shadows_running.add_done_callback(_retrieve)
            raise
        shadows = await shadows_running if shadows_running is not None else []
        now_wall = self.wall_clock()
        now = self.clock()
        for arm_index, model, rows, result in primary:
            if result is None or model is None:
                continue
            self._emit(route, route.arms[arm_index].name, model, rows, result, requests, answers, decision.propensity,
                       now_wall, now, None, keep_outputs)
        primary_names = (np.array([a.name for a in route.arms], dtype=object)[decision.arm_index].tolist()
                         if shadow_jobs else [])
        for job in shadows:
            if isinstance(job, BaseException):
                continue  # a shadow never affects the answer
            shadow_index, model, rows, result = job
            if result is None or model is None:
                continue
            self._emit(route, route.shadows[shadow_index].name, model, rows, result, requests, answers,
                       None, now_wall, now, primary_names, False)
        return answers

    async def _start(self, route_name: str, arm_position: int, arm: Arm, rows: np.ndarray, requests: Sequence[Pending],
                     answers: list[Answer], reject_when_full: bool, record_errors: bool, stages: Stages | None = None
                     ) -> tuple[int, OnnxModel | None, np.ndarray, RowsResult | None]:
        try:
            model = self.repository.get(arm.model, arm.version)
        except ModelNotFound as exc:
            if record_errors:
                self.count_calls(route_name, arm.name, int(rows.size), int(rows.size))
                for row in rows:
                    answers[row].error = ("model_unavailable", str(exc))
            return arm_position, None, rows, None
        checked = validate_batch(model, [requests[i].inputs for i in rows])
        if record_errors:
            for local, (reason, message) in checked.errors.items():
                answers[rows[local]].error = (reason, f"request {requests[rows[local]].request_id!r}: {message}")
        good_rows = rows[checked.ok]
        if good_rows.size == 0:
            return arm_position, model, good_rows, None
        batcher = self.batcher(model)
        queued_at = self.clock() if stages is not None else 0.0
        if not reject_when_full:
            await batcher.wait_for_capacity(int(good_rows.size))
        try:
            # a model that is unavailable refuses at once (never queues); a full queue with
            # reject_when_full raises Overloaded to the caller (HTTP/gRPC 503)
            submitted_at = self.clock() if stages is not None else 0.0
            future = batcher.submit(checked.feeds, int(good_rows.size), reject_when_full=reject_when_full)
            result: RowsResult = await future
        except (ModelUnavailable, InferenceFailed) as exc:
            if record_errors:
                self.count_calls(route_name, arm.name, int(good_rows.size), int(good_rows.size))
                reason = "model_unavailable" if isinstance(exc, ModelUnavailable) else "inference_failed"
                for row in good_rows:
                    answers[row].error = (reason, str(exc))
            return arm_position, model, good_rows, None
        if stages is not None:
            record_stages(stages, route_name, arm.name, model, int(good_rows.size), queued_at, submitted_at, result,
                          self.clock(), shadow=not record_errors)
        if record_errors:
            self.count_calls(route_name, arm.name, int(good_rows.size), len(result.errors))
            for local, message in result.errors.items():
                answers[good_rows[local]].error = ("inference_failed",
                                                   f"model {model.key} failed on this row: {message}")
        if self.on_served is not None and result.ok.any():
            served = checked.feeds if result.ok.all() else {k: v[result.ok] for k, v in checked.feeds.items()}
            self.on_served(model, route_name, arm.name, served, result.outputs)
        return arm_position, model, good_rows, result

    def _emit(self, route: Route, arm_name: str, model: OnnxModel, rows: np.ndarray, result: RowsResult,
              requests: Sequence[Pending], answers: list[Answer], propensity: np.ndarray | None, now_wall: float,
              now: float, primary_names: list[str] | None, keep_outputs: bool) -> None:
        ok_rows = rows[result.ok].tolist()
        names = list(result.outputs)
        columns = [array.tolist() for array in result.outputs.values()]
        labels = model.config.labels
        if labels and "label" in result.outputs:
            label_column = result.outputs["label"].reshape(-1)
            names.append("class")
            columns.append([labels[v] if 0 <= v < len(labels) else None for v in label_column.tolist()])
        propensities = propensity.tolist() if propensity is not None else None
        route_name, policy, model_name, version = route.name, route.policy, model.name, model.version
        for position, row in enumerate(ok_rows):
            request = requests[row]
            event = prediction_event(request.request_id, route_name, arm_name, model_name, version, policy,
                                     1.0 if propensities is None else propensities[row],
                                     {name: column[position] for name, column in zip(names, columns)},
                                     request.ts_request, now_wall, round((now - request.received_s) * 1000.0, 3))
            answer = answers[row]
            if primary_names is None:
                answer.prediction = event
                if keep_outputs:
                    answer.outputs = {name: array[position] for name, array in result.outputs.items()}
            else:
                event["shadow"] = True
                event["primary_arm"] = primary_names[row]
                if answer.shadows is None:
                    answer.shadows = [event]
                else:
                    answer.shadows.append(event)


def record_stages(stages: Stages, route: str, arm: str, model: OnnxModel, rows: int, queued_at: float,
                  submitted_at: float, result: RowsResult, done: float, shadow: bool = False) -> None:
    """Add an arm's ``gateway.queue`` (waiting for room, then in the batcher's queue until its
    batch started) and ``gateway.infer`` (its batch's run, until the answer is back on the loop)."""
    started = min(submitted_at + result.queue_s, done)
    attributes: dict[str, AttributeValue] = {"banditgate.route": route, "banditgate.arm": arm,
                                             "banditgate.model": model.key, "banditgate.rows": rows}
    if shadow:
        attributes["banditgate.shadow"] = True
    stages.add("gateway.queue", queued_at, started, attributes)
    stages.add("gateway.infer", started, done, {**attributes, "banditgate.batch_rows": result.batch_rows})


@dataclass
class TensorAnswer:
    """The answer to one OIP request: outputs, who answered, and the prediction events to publish."""

    model: OnnxModel
    arm: str | None
    propensity: float
    policy: str
    outputs: dict[str, np.ndarray]
    events: list[JSONObject]
    shadow_events: list[JSONObject] = field(default_factory=list)


@dataclass
class TensorCall:
    """One OIP request between its submission to the model's batcher (`start_tensors`) and its
    answer (`finish_tensors`): who serves it and what its events will say."""

    dataplane: Dataplane
    model: OnnxModel
    arm_name: str | None
    propensity: float
    policy: str
    route_name: str
    shadows: list[tuple[Arm, int]]
    checked: dict[str, np.ndarray]
    rows: int
    request_id: str
    ts_request: float
    received_s: float
    on_shadows: Callable[[list[JSONObject]], None] | None
    stages: Stages | None
    submitted_at: float
    future: asyncio.Future[RowsResult]


def _count_failure(dataplane: Dataplane, route_name: str, arm_name: str | None, rows: int, exc: GatewayError) -> None:
    """Count a failure of a request's arm (not a full queue: that is not the model's fault)."""
    if arm_name is not None and (isinstance(exc, ModelUnavailable) or not isinstance(exc, Overloaded)):
        dataplane.count_calls(route_name, arm_name, rows, rows)


Routed = tuple[int, float, list[bool]]
"""A route's decision for one request: (arm index, propensity, which shadows run)."""


def decide_routes(dataplane: Dataplane, name: str, unit_ids: list[str | None]) -> list[Routed]:
    """Route `len(unit_ids)` requests for the route `name` in one draw of its policy (as many
    independent decisions as separate draws, for one call's numpy work). Raises KeyError when
    `name` is not a route."""
    runtime = dataplane.routes[name]
    decision = runtime.policy.decide(len(unit_ids), unit_ids if runtime.route.sticky_key else None)
    masks: list[list[bool]] = decision.shadow_mask.tolist() if decision.shadow_mask.size else [[]] * len(unit_ids)
    return list(zip(decision.arm_index.tolist(), decision.propensity.tolist(), masks, strict=True))


def start_tensors(dataplane: Dataplane, name: str, version: str | None, feeds: dict[str, np.ndarray],
                  request_id: str, unit_id: str | None, ts_request: float, received_s: float,
                  on_shadows: Callable[[list[JSONObject]], None] | None = None,
                  stages: Stages | None = None, defer: bool = False, routed: Routed | None = None) -> TensorCall:
    """Route, validate and queue one OIP request (on the event loop): a route name picks an arm
    through its policy; a model name (with an optional version) bypasses the router. Its rows
    are in the batcher when this returns (`defer`: not flushed yet, `ModelBatcher.submit`);
    `finish_tensors` answers it once `TensorCall.future` is done. Raises GatewayError subclasses
    (→ 4xx/5xx). `stages` (only when traced) gets the times of the decision, the queueing and
    the inference. `routed`: the route's decision for this request, already drawn with others
    (`decide_routes`); the route decides here without it."""
    from gateway.validation import check_request_id, validate_arrays

    check_request_id(request_id)  # before anything is decided for it
    shadows: list[tuple[Arm, int]] = []
    policy: str  # the route's policy, or "direct" for a model named without a route
    runtime = dataplane.routes.get(name) if not version else None
    if runtime is not None:
        route = runtime.route
        if routed is None:
            decided_at = dataplane.clock() if stages is not None else 0.0
            routed = decide_routes(dataplane, name, [unit_id])[0]
            if stages is not None:
                stages.add("gateway.decide", decided_at, dataplane.clock(), {"banditgate.route": route.name,
                                                                             "banditgate.requests": 1})
        arm_index, propensity, shadow_row = routed
        arm = route.arms[arm_index]
        if route.shadows and shadow_row:
            shadows = [(route.shadows[j], j) for j in range(len(route.shadows)) if shadow_row[j]]
        model = dataplane.repository.get(arm.model, arm.version)
        arm_name, policy, route_name = arm.name, route.policy, route.name
    else:
        spec: int | str = "latest"
        if version:
            if not (version.isascii() and version.isdigit()):
                raise ModelNotFound(f"model version {version!r} is not a positive integer")
            spec = int(version)
        model = dataplane.repository.get(name, spec)
        arm_name, propensity, policy, route_name = None, 1.0, "direct", name
    checked = validate_arrays(model, feeds)
    rows = next(iter(checked.values())).shape[0]
    check_request_id(request_id, rows)  # each row's prediction id: <id>/<row>
    submitted_at = dataplane.clock() if stages is not None else 0.0
    try:
        future = dataplane.batcher(model).submit(checked, rows, reject_when_full=True, defer=defer)
    except GatewayError as exc:
        _count_failure(dataplane, route_name, arm_name, rows, exc)
        raise
    return TensorCall(dataplane, model, arm_name, propensity, policy, route_name, shadows, checked, rows, request_id,
                      ts_request, received_s, on_shadows, stages, submitted_at, future)


def finish_tensors(call: TensorCall) -> TensorAnswer:
    """The answer to a started request whose future is done (on the event loop): its outputs and
    prediction events; starts its shadows. Raises GatewayError subclasses (→ 4xx/5xx)."""
    dataplane = call.dataplane
    try:
        result: RowsResult = call.future.result()
    except GatewayError as exc:
        _count_failure(dataplane, call.route_name, call.arm_name, call.rows, exc)
        raise
    model, rows, arm_name, route_name = call.model, call.rows, call.arm_name, call.route_name
    if call.stages is not None:
        record_stages(call.stages, route_name, arm_name or model.name, model, rows, call.submitted_at,
                      call.submitted_at, result, dataplane.clock())
    if arm_name is not None:
        dataplane.count_calls(route_name, arm_name, rows, len(result.errors))
    if result.errors:
        first = min(result.errors)
        raise InferenceFailed(f"model {model.key} failed on row {first}: {result.errors[first]}")
    if dataplane.on_served is not None:
        dataplane.on_served(model, route_name, arm_name or model.name, call.checked, result.outputs)
    now_wall, now = dataplane.wall_clock(), dataplane.clock()
    events = _row_events(result.outputs, rows, call.request_id, route_name, arm_name or model.name, model,
                         call.policy, call.propensity, call.ts_request, now_wall, (now - call.received_s) * 1000.0)
    answer = TensorAnswer(model, arm_name, call.propensity, call.policy, result.outputs, events)
    if call.shadows and call.on_shadows is not None:
        asyncio.get_running_loop().create_task(
            _shadow_tensors(dataplane, route_name, call.shadows, call.checked, rows, call.request_id, arm_name or "",
                            call.ts_request, call.received_s, call.on_shadows))
    return answer


async def serve_tensors(dataplane: Dataplane, name: str, version: str | None, feeds: dict[str, np.ndarray],
                        request_id: str, unit_id: str | None, ts_request: float, received_s: float,
                        on_shadows: Callable[[list[JSONObject]], None] | None = None,
                        stages: Stages | None = None) -> TensorAnswer:
    """Serve one OIP request: `start_tensors`, wait for its rows, `finish_tensors`."""
    call = start_tensors(dataplane, name, version, feeds, request_id, unit_id, ts_request, received_s, on_shadows,
                         stages)
    if not call.future.done():
        try:
            await call.future  # cancelling the caller cancels the rows' future, as before
        except GatewayError:
            pass  # finish_tensors raises it, counted
    return finish_tensors(call)


def _row_events(outputs: dict[str, np.ndarray], rows: int, request_id: str, route: str, arm: str, model: OnnxModel,
                policy: str, propensity: float, ts_request: float, ts_predicted: float, latency_ms: float,
                primary_arm: str | None = None) -> list[JSONObject]:
    columns = {name: array.tolist() for name, array in outputs.items()}
    events = []
    for row in range(rows):
        event = prediction_event(request_id if rows == 1 else f"{request_id}/{row}", route, arm, model.name,
                                 model.version, policy, propensity,
                                 {name: values[row] for name, values in columns.items()}, ts_request, ts_predicted,
                                 round(latency_ms, 3))
        if primary_arm is not None:
            event["shadow"] = True
            event["primary_arm"] = primary_arm
        events.append(event)
    return events


async def _shadow_tensors(dataplane: Dataplane, route: str, shadows: list[tuple[Arm, int]], feeds: dict[str, np.ndarray],
                          rows: int, request_id: str, primary_arm: str, ts_request: float, received_s: float,
                          publish: Callable[[list[JSONObject]], None]) -> None:
    """Mirror one OIP request to its shadow arms; failures are logged by metrics, never surfaced."""
    from gateway.validation import validate_arrays

    for shadow, _index in shadows:
        try:
            model = dataplane.repository.get(shadow.model, shadow.version)
            checked = validate_arrays(model, feeds)
            result: RowsResult = await dataplane.batcher(model).submit(checked, rows, reject_when_full=True)
        except GatewayError:
            continue  # a shadow that cannot answer never affects the primary
        if result.errors:
            continue
        publish(_row_events(result.outputs, rows, request_id, route, shadow.name, model, "shadow", 1.0, ts_request,
                            dataplane.wall_clock(), (dataplane.clock() - received_s) * 1000.0, primary_arm))
