"""Assembles the serving process: model repository, dataplane, Kafka loop, metrics, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import orjson
import uvicorn
import uvloop
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, start_http_server

from banditgate import cloudevents, redis_errors
from banditgate.config import Config
from banditgate.connections import check_redis, redis_client, server_ssl_context
from banditgate.events import alert_from_obj
from banditgate.jsontypes import JSONObject
from banditgate.logs import setup_logging
from banditgate.redaction import redact_url
from banditgate.tracing import SHUTDOWN_TIMEOUT_S, Tracing
from gateway.admin import Admin
from gateway.batching.circuit import STATE_CODES
from gateway.dataplane import Dataplane
from gateway.drift_watch import DriftWatch
from gateway.errors import InvalidInput, ModelError, ModelNotFound, Unavailable
from gateway.guardrail_watch import GuardrailWatch
from gateway.metrics import GatewayMetrics
from gateway.models.onnx_runtime import OnnxModel
from gateway.models.repository import ModelRepository
from gateway.rollout_apply import RolloutApplier
from gateway.transport.delivery import refusal
from gateway.transport.grpc_server import GrpcServer, build_server
from gateway.transport.http import SidecarContext, build_app
from gateway.transport.http_limits import bounded_httptools_protocol
from gateway.transport.kafka_batches import OutboundBatches, OutputRefused, delivered
from gateway.transport.kafka_loop import KafkaLoop
from gateway.transport.kafka_transactions import TransactionalKafkaLoop
from gateway.transport.publisher import PredictionPublisher, event_types
from router.rollout_store import RolloutStore
from router.stats_store import ArmStatsStore, SnapshotRefresher
from router.thompson import Posterior

if TYPE_CHECKING:
    import redis.asyncio as redis_asyncio

log = logging.getLogger("banditgate.gateway")


class _UvicornTLS(TypedDict, total=False):
    """The TLS keywords of uvicorn.Config the gateway passes (none without a certificate)."""

    ssl_certfile: str
    ssl_keyfile: str
    ssl_ca_certs: str
    ssl_cert_reqs: int

KAFKA_PROBE_S = 1.0
"""How often readiness re-checks that the broker answers."""
CALLS_FLUSH_S = 1.0
"""How often the arms' served/failed counts go to the store (for the guardrail's error-rate test)."""


def posterior_interval(posterior: Posterior) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per arm: posterior mean and a 95% interval (mean -/+ 1.96 posterior scale, clipped to the
    support). A normal approximation: close for the Beta and Student-t posteriors once an arm has
    a few dozen outcomes, wider than exact before that."""
    mean = np.asarray(posterior.mean(), dtype=float)
    _, scale = posterior.location_scale()
    low, high = posterior.support()
    spread = 1.96 * np.asarray(scale, dtype=float)
    return mean, np.clip(mean - spread, low, high), np.clip(mean + spread, low, high)


def wanted_models(config: Config) -> list[tuple[str, int | str]]:
    return [(arm.model, arm.version) for route in config.routes for arm in (*route.arms, *route.shadows)]


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: the gateway, not uvicorn, owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    """The running gateway; `run()` returns when a stop was requested and shutdown finished."""

    def __init__(self, config: Config, metrics: GatewayMetrics | None = None,
                 registry: CollectorRegistry | None = None, tracing: Tracing | None = None) -> None:
        self.config = config
        self._tracing = tracing  # spans (banditgate.tracing); None: from config.tracing
        self.registry = registry or REGISTRY
        self.metrics = metrics or GatewayMetrics(self.registry)
        self.repository = ModelRepository(config.models.repository, config.models, wanted_models(config))
        self.executor = ThreadPoolExecutor(max_workers=config.batching.inference_threads,
                                           thread_name_prefix="onnx")
        self.dataplane: Dataplane | None = None
        self.drift: DriftWatch | None = None
        self.kafka: KafkaLoop | None = None
        self.stopping = asyncio.Event()
        self.ready = False
        self.kafka_ok = True  # the broker answers (checked every KAFKA_PROBE_S); readiness needs it
        self.publisher: PredictionPublisher | None = None
        self.http: _EmbeddedUvicorn | None = None
        self.grpc: GrpcServer | None = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._servers: list[asyncio.Task] = []
        self.store: ArmStatsStore | None = None
        self.refresher: SnapshotRefresher | None = None
        self._redis: redis_asyncio.Redis | None = None
        self.metrics_port: int | None = None
        self._exported: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._timeouts_counted: dict[str, int] = {}  # per batcher: timeouts already in the counter
        self.rollouts: RolloutApplier | None = None

    def _on_batch(self, model, rows: int, queue_s: float, inference_s: float) -> None:  # type: ignore[no-untyped-def]
        self.metrics.observe_batch(model.name, model.version, rows, queue_s, inference_s)
        if self.rollouts is not None:
            self.rollouts.observe_batch(model, rows, queue_s, inference_s)

    async def start(self) -> None:
        events = await asyncio.to_thread(self.repository.load_all)
        for model in self.repository.loaded():
            self.metrics.model_loaded.labels(model.name, str(model.version)).set(1)
        del events
        self.dataplane = Dataplane(self.config, self.repository, self.executor, on_batch=self._on_batch)
        self.dataplane.on_retired.append(self._forget_model)
        await self._start_snapshots()
        # rollouts' lineups (candidates, canaries, drains) are in place before the first request
        self.rollouts = RolloutApplier(self.config, self.dataplane, self.repository,
                                       RolloutStore(self._redis, prefix=self.config.redis.key_prefix),
                                       metrics=self.metrics)
        await self.rollouts.refresh_once()
        self.drift = DriftWatch(self.config.drift.arl0, self.metrics, self._publish_alert,
                                enabled=self.config.drift.enabled, quiet_s=self.config.drift.episode_quiet_s,
                                redis=self._redis, prefix=self.config.redis.key_prefix)
        self.dataplane.on_served = self.drift.observe
        for model in self.repository.loaded():
            self.drift.prepare(model)  # calibrate in the background from the start
        loop_class = TransactionalKafkaLoop if self.config.delivery == "exactly_once" else KafkaLoop
        self.kafka = loop_class(self.config, self.dataplane, self.metrics, tracing=self._tracing)
        await self.kafka.start()
        await self._start_sidecar()
        self._banner()
        if self.config.server.admin_open:
            log.warning("the admin API is open without a token (server.admin_open: true): any local process can "
                        "drain arms, reload models and operate rollouts; set server.admin_tokens instead")
        self.ready = True
        self.metrics.ready.set(1)

    async def _start_snapshots(self) -> None:
        """Arm posteriors from Redis every snapshot_refresh_ms (never per request); keep the last on outage."""
        assert self.dataplane is not None  # noqa: S101
        redis_config = self.config.redis
        self._redis = redis_client(redis_config)
        self.store = ArmStatsStore(self._redis, prefix=redis_config.key_prefix, dedup_ttl_s=redis_config.dedup_ttl_s)
        policies = {name: runtime.policy for name, runtime in self.dataplane.routes.items()}

        def redis_state(ok: bool) -> None:
            self.metrics.redis_up.set(1 if ok else 0)

        def unusable(route: str, arms: tuple[str, ...]) -> None:
            self.metrics.arm_stats_unusable.labels(route).set(len(arms))

        self.refresher = SnapshotRefresher(self.store, policies, redis_config.snapshot_refresh_ms,
                                           on_state_change=redis_state, on_unusable=unusable)
        # a wrong password, a missing ACL permission or an untrusted certificate stops start-up
        # (ConnectionCheckError); an unreachable Redis does not: the routes start on their priors
        # and the refresher says so once and picks the statistics up when Redis answers
        probe_key = self.store.stats_key(next(iter(policies))) if policies else None
        await check_redis(self._redis, redis_config, probe_key)
        self.metrics.redis_up.set(1 if await self.refresher.refresh_once() else 0)
        self.refresher.start()

    async def _export_shares(self) -> None:
        """Routing state per arm (shares, posteriors, drains, serving versions) and queue depths as
        gauges, refreshed with the snapshots (never per request)."""
        assert self.dataplane is not None  # noqa: S101
        interval = self.config.redis.snapshot_refresh_ms / 1000.0
        while not self.stopping.is_set():
            self.export_routing_state()
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)
            except TimeoutError:
                pass

    def export_routing_state(self) -> None:
        """Set the per-arm and per-queue gauges from the policies' current snapshots."""
        assert self.dataplane is not None  # noqa: S101
        metrics = self.metrics
        for name, runtime in self.dataplane.routes.items():
            policy = runtime.policy
            drained = policy.drained
            for arm, share, preferred in zip(policy.arm_names, policy.shares, policy.preferred):
                metrics.arm_share.labels(name, arm).set(float(share))
                metrics.arm_policy_share.labels(name, arm).set(float(preferred))
                metrics.arm_drained.labels(name, arm).set(1 if arm in drained else 0)
            posterior = policy.posterior
            if posterior is not None:
                means, lower, upper = posterior_interval(posterior)
                for arm, mean, low, high in zip(policy.arm_names, means, lower, upper):
                    metrics.arm_posterior_mean.labels(name, arm).set(float(mean))
                    metrics.arm_posterior_lower.labels(name, arm).set(float(low))
                    metrics.arm_posterior_upper.labels(name, arm).set(float(high))
            for role, arms in (("primary", runtime.route.arms), ("shadow", runtime.route.shadows)):
                for arm_config in arms:
                    try:
                        version = str(self.repository.resolve(arm_config.model, arm_config.version))
                    except ModelNotFound:
                        continue  # `latest` of a model with no loaded version: nothing serves it
                    self._set_info((name, arm_config.name, role), metrics.arm_info,
                                   (name, arm_config.name, role, arm_config.model, version), 1)
        for key, batcher in list(self.dataplane.batchers.items()):
            model = batcher.model
            labels = (model.name, str(model.version))
            self._set_info(("queue", key), metrics.queue_depth, labels, batcher.queued_rows)
            circuit = batcher.circuit
            metrics.model_circuit_state.labels(*labels).set(STATE_CODES[circuit.state])
            metrics.model_threads.labels(*labels).set(circuit.running)
            counted = self._timeouts_counted.get(key, 0)
            if circuit.timeouts > counted:
                metrics.inference_timeouts.labels(*labels).inc(circuit.timeouts - counted)
                self._timeouts_counted[key] = circuit.timeouts

    def _set_info(self, owner: tuple[str, ...], gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        """Set `gauge` at `labels` for `owner`, removing the owner's previous label set if it changed
        (a `latest` arm moving to a new version must not leave the old one behind)."""
        previous = self._exported.get(owner)
        if previous is not None and previous != labels:
            with contextlib.suppress(KeyError):
                gauge.remove(*previous)
        self._exported[owner] = labels
        gauge.labels(*labels).set(value)

    def _banner(self) -> None:
        """One block at start-up: what is served (routes, arms, model versions) and where."""
        for route in self.config.routes:
            arms = ", ".join(f"{a.name}={a.model}:{self.repository.resolve(a.model, a.version)}" for a in route.arms)
            shadows = ", ".join(f"{s.name}={s.model}:{self.repository.resolve(s.model, s.version)}"
                                for s in route.shadows)
            log.info("route %s: policy %s, arms %s%s", route.name, route.policy, arms,
                     f", shadows {shadows}" if shadows else "")
        providers = sorted({p for m in self.repository.loaded() for p in m.providers})
        server = self.config.server
        metrics_url = (f"http://{server.host}:{self.metrics_port}/metrics" if self.metrics_port is not None
                       else f"http://{server.host}:{self.http_port}/metrics" if self.http_port else "off")
        log.info("serving: kafka %s (requests %s, delivery %s), redis %s (prefix %s), models %s, providers %s, "
                 "batching %d rows / %d us, http %s:%s, grpc %s:%s, metrics %s",
                 self.config.kafka.bootstrap_servers, self.config.kafka.topics.requests, self.config.delivery,
                 redact_url(self.config.redis.url), self.config.redis.key_prefix, self.config.models.repository,
                 ", ".join(providers), self.config.batching.max_batch_size, self.config.batching.max_delay_us,
                 server.host, self.http_port or "off", server.host, self.grpc_port or "off", metrics_url)

    def _metrics_port(self) -> int:
        return self.config.server.metrics_port or self.http_port or self.config.server.http_port

    def _publish_alert(self, alert: JSONObject) -> None:
        if self.rollouts is not None:
            self.rollouts.note_alarm(alert)  # drift alarms feed retraining triggers
        if self.publisher is not None:
            # through the one definition (banditgate.events.Alert): checked, with its schema_version
            self.publisher.publish(self.config.kafka.topics.alerts, [alert_from_obj(alert).to_dict()],
                                   key_field="route")

    async def _produce_outcomes(self, outcomes: list[JSONObject], trace: cloudevents.Headers | None = None) -> None:
        """Publish outcomes posted over HTTP/gRPC and wait for the broker. A failed publication
        replaces the shared producer (as the Kafka loop does; a failed send can leave its sequence
        numbers ahead of the broker's) and is tried once more. Raises InvalidInput when the topic
        refuses an outcome for good (too large, not authorized), Unavailable (503) when Kafka
        still does not take them."""
        assert self.kafka is not None  # noqa: S101
        shared, topic = self.kafka.shared, self.config.kafka.topics.outcomes
        values = [(str(outcome["request_id"]).encode(), orjson.dumps(outcome)) for outcome in outcomes]
        ce_source = cloudevents.source("gateway")  # an outcome names no route
        enabled = self.config.kafka.cloudevents
        headers = [cloudevents.headers("outcome", ce_source, cloudevents.content_id(topic, key, value), trace, enabled)
                   for key, value in values]
        for _attempt in (1, 2):
            producer = shared.producer
            out: OutboundBatches[None] = OutboundBatches(producer, self.kafka.partitions, shared.limits)
            try:
                for (key, value), record_headers in zip(values, headers):
                    out.add(topic, key, value, headers=record_headers)  # CloudEvents + the caller's trace context
            except OutputRefused as exc:
                raise InvalidInput(f"outcome not accepted: {exc}", exc.reason) from None
            try:
                failures = await delivered(await out.send())
                if not failures:
                    return
                cause: BaseException = failures[0][1]
            except (KafkaError, OSError, TimeoutError) as exc:
                cause = exc
            found = refusal(cause)
            log.warning("outcomes could not be published (%s: %s)", type(cause).__name__, str(cause)[:200])
            try:
                await shared.replace(producer)
            except (KafkaError, OSError, TimeoutError):
                break
            if found is not None and found.reason == "not_authorized":  # the operator's ACLs, not the client
                raise Unavailable(f"outcomes refused by {topic}: {found.error}; the gateway's principal needs "
                                  "WRITE on it (retry once the ACL is fixed)")
            if found is not None:
                raise InvalidInput(f"outcome not accepted by {topic}: {found.error}", found.reason)
        raise Unavailable("Kafka does not take outcomes right now; retry later")

    async def _start_sidecar(self) -> None:
        """REST (uvicorn) in this event loop and gRPC (grpc threads handing their work to this loop),
        sharing the dataplane and producer."""
        assert self.kafka is not None and self.kafka.producer is not None and self.dataplane is not None  # noqa: S101
        server = self.config.server
        # the publisher shares the Kafka loop's producer and replaces it the same way after a failure
        self.publisher = PredictionPublisher(self.kafka.shared, self.kafka.partitions, metrics=self.metrics,
                                            deadletter_topic=self.config.kafka.topics.deadletter,
                                            flush_interval_s=self.config.server.publish_interval_ms / 1000,
                                            event_types=event_types(self.config.kafka.topics),
                                            cloudevents=self.config.kafka.cloudevents)
        self.publisher.start()
        publisher = self.publisher
        context = SidecarContext(config=self.config, dataplane=self.dataplane,
                                 publish=lambda topic, events, trace=None: publisher.publish(topic, events, trace=trace),
                                 produce_outcomes=self._produce_outcomes, is_ready=self.is_ready,
                                 admin=Admin(self.dataplane, self.repository, self.store, self._redis,
                                             rollouts=self.rollouts),
                                 registry=self.registry,
                                 metrics=self.metrics, tracing=self.kafka.tracing)
        server_ssl_context(server)  # unreadable certificate, key or client CA: one line naming the file
        if server.enable_http:
            ssl_kwargs: _UvicornTLS = {}
            if server.tls_cert_file and server.tls_key_file:
                import ssl

                ssl_kwargs = {"ssl_certfile": str(server.tls_cert_file), "ssl_keyfile": str(server.tls_key_file)}
                if server.client_ca_file:
                    ssl_kwargs["ssl_ca_certs"] = str(server.client_ca_file)
                    ssl_kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            config = uvicorn.Config(build_app(context), host=server.host, port=server.http_port, loop="none",
                                    lifespan="off", http=bounded_httptools_protocol(server.max_header_bytes),
                                    log_level="warning", access_log=False,
                                    timeout_keep_alive=30, h11_max_incomplete_event_size=server.max_header_bytes,
                                    **ssl_kwargs)
            self.http = _EmbeddedUvicorn(config)
            self._servers.append(asyncio.get_running_loop().create_task(self.http.serve()))
            while not self.http.started:
                if self._servers[-1].done():
                    self._servers[-1].result()
                    raise ModelError(f"the HTTP server could not start on {server.host}:{server.http_port}")
                await asyncio.sleep(0.01)
            self.http_port = self.http.servers[0].sockets[0].getsockname()[1]
        if server.enable_grpc:
            import grpc

            credentials = None
            if server.tls_cert_file and server.tls_key_file:
                client_ca = server.client_ca_file.read_bytes() if server.client_ca_file else None
                credentials = grpc.ssl_server_credentials(
                    [(server.tls_key_file.read_bytes(), server.tls_cert_file.read_bytes())],
                    root_certificates=client_ca, require_client_auth=client_ca is not None)
            self.grpc, self.grpc_port = build_server(context, credentials)
            await self.grpc.start()
        if server.metrics_port is not None or not server.enable_http:
            started = start_http_server(server.metrics_port or 0, addr=server.host, registry=self.registry)
            # prometheus_client >= 0.20 returns (server, thread); older versions return None
            self.metrics_port = started[0].server_port if started else server.metrics_port

    async def _watch_models(self) -> None:
        interval = self.config.models.poll_interval_s
        if interval <= 0:
            return
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            for event in await asyncio.to_thread(self.repository.scan):
                if event.ok:
                    self.metrics.model_loaded.labels(event.model, str(event.version)).set(1)
                else:
                    self.metrics.model_load_failures.labels(event.model).inc()
            assert self.dataplane is not None  # noqa: S101 - start() first
            self.dataplane.collect_retired()  # superseded `latest` versions: freed when their batches end

    def _forget_model(self, model: OnnxModel) -> None:
        """Remove every series of a model version that was unloaded (after its last batch)."""
        labels = (model.name, str(model.version))
        self.metrics.forget_version(*labels)
        self._timeouts_counted.pop(model.key, None)
        owner = ("queue", model.key)
        exported = self._exported.pop(owner, None)
        if exported is not None:
            with contextlib.suppress(KeyError):
                self.metrics.queue_depth.remove(*exported)
        if self.drift is not None:
            self.drift.forget(model)

    def is_ready(self) -> bool:
        """Readiness: started, not stopping, and the broker reachable. Redis being away does not
        count: routing goes on on the last arm snapshot (and the redis_up gauge says so)."""
        return self.ready and self.kafka_ok

    async def _watch_kafka(self) -> None:
        """Probe the broker every KAFKA_PROBE_S; readiness and kafka_up follow, one log line per change."""
        assert self.kafka is not None  # noqa: S101
        down_since: float | None = None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=KAFKA_PROBE_S)
                return
            except TimeoutError:
                pass
            ok = await self.kafka.broker_reachable()
            if ok != self.kafka_ok:
                if ok:
                    log.info("Kafka answers again after %.1fs; ready", time.monotonic() - (down_since or time.monotonic()))
                else:
                    down_since = time.monotonic()
                    log.warning("Kafka does not answer at %s; not ready until it does (work in flight is "
                                "held and retried)", self.config.kafka.bootstrap_servers)
            self.kafka_ok = ok
            self.metrics.kafka_up.set(1 if ok else 0)

    async def _record_calls(self) -> None:
        """Every CALLS_FLUSH_S add the arms' served and failed rows to the store, one pipeline per
        route; while Redis is away they wait here for the next try. The guardrail drains an arm whose
        error rate is significantly the worst (a model that crashes or hangs past its timeout)."""
        assert self.dataplane is not None and self.store is not None  # noqa: S101
        pending: dict[str, dict[str, tuple[int, int]]] = {}
        episodes = redis_errors.FailureEpisodes(
            log, "arm call counts", lambda kind: self.metrics.redis_errors.labels("call_counts", kind).inc())
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=CALLS_FLUSH_S)
            except TimeoutError:
                pass
            for route, counts in self.dataplane.take_call_counts().items():
                held = pending.setdefault(route, {})
                for arm, (calls, errors) in counts.items():
                    before = held.get(arm, (0, 0))
                    held[arm] = (before[0] + calls, before[1] + errors)
            for route in list(pending):
                try:
                    await asyncio.wait_for(self.store.record_calls(route, pending[route]), timeout=2.0)
                except Exception as exc:  # noqa: BLE001 - classified: an outage (READONLY, OOM...) keeps them
                    if episodes.failed(exc) in (redis_errors.TRANSIENT, redis_errors.OPERATOR):
                        break
                else:
                    episodes.succeeded()
                del pending[route]  # recorded, or refused for good (logged)

    async def run(self) -> int:
        assert self.kafka is not None  # noqa: S101 - start() first
        watcher = asyncio.get_running_loop().create_task(self._watch_models())
        exporter = asyncio.get_running_loop().create_task(self._export_shares())
        assert self.store is not None and self._redis is not None and self.dataplane is not None  # noqa: S101 - start() first
        guardrail = GuardrailWatch(self.store, self._redis, {n: r.route for n, r in self.dataplane.routes.items()},
                                   self._publish_alert,
                                   on_failure=lambda kind: self.metrics.redis_errors.labels("guardrail", kind).inc())
        guard_task = asyncio.get_running_loop().create_task(guardrail.run(self.stopping))
        kafka_watch = asyncio.get_running_loop().create_task(self._watch_kafka())
        call_counts = asyncio.get_running_loop().create_task(self._record_calls())
        assert self.rollouts is not None and self.drift is not None  # noqa: S101 - start() first
        rollout_task = asyncio.get_running_loop().create_task(self.rollouts.run(self.stopping))
        drift_task = asyncio.get_running_loop().create_task(self.drift.run(self.stopping))
        loop_task = asyncio.get_running_loop().create_task(self.kafka.run(self.stopping))
        stop_wait = asyncio.get_running_loop().create_task(self.stopping.wait())
        # a background task that dies is a defect: exit non-zero (readiness would stay true otherwise)
        background = {loop_task: "Kafka loop", guard_task: "guardrail", rollout_task: "rollout", drift_task: "drift"}
        if self.publisher is not None and self.publisher.task is not None:
            background[self.publisher.task] = "sidecar publisher"
        done, _ = await asyncio.wait({*background, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        dead = [t for t in background if t in done and not t.cancelled() and t.exception() is not None]
        crashed = bool(dead)
        if crashed:
            error = dead[0].exception()
            log.error("the %s crashed (%s: %s); shutting down with exit code 1", background[dead[0]],
                      type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", exc_info=error)
            self.stopping.set()
        stop_wait.cancel()
        code = await self.shutdown(loop_task, watcher)
        if crashed or (loop_task.done() and not loop_task.cancelled() and loop_task.exception() is not None):
            code = 1  # also a loop that crashed while it drained after SIGTERM
        exporter.cancel()
        guard_task.cancel()
        kafka_watch.cancel()
        call_counts.cancel()
        rollout_task.cancel()
        drift_task.cancel()
        return code

    async def shutdown(self, loop_task: asyncio.Task, watcher: asyncio.Task) -> int:
        """Readiness off first, then finish in-flight batches, publish, commit, close."""
        self.ready = False
        self.metrics.ready.set(0)
        started = time.monotonic()
        grace = self.config.shutdown_grace_s
        code = 0
        try:
            await asyncio.wait_for(asyncio.gather(loop_task, return_exceptions=True), timeout=grace)
            if self.grpc is not None:
                await self.grpc.stop(grace=1.0)
                self.grpc = None
            if self.http is not None:
                self.http.should_exit = True
                await asyncio.gather(*self._servers, return_exceptions=True)
                self.http = None
            if self.publisher is not None:
                await self.publisher.close()  # flush sidecar predictions while the producer is open
                self.publisher = None
            remaining = max(0.1, grace - (time.monotonic() - started))
            assert self.kafka is not None  # noqa: S101
            await asyncio.wait_for(self.kafka.stop(), timeout=remaining)
        except TimeoutError:
            log.error("shutdown took longer than the %.1fs grace period; exiting with work unfinished "
                      "(it will be served again from the last committed offsets)", grace)
            code = 1
            if self.kafka is not None:
                loop_task.cancel()
                # leave the group now, so the partitions move to other replicas at once rather than
                # after the session timeout
                await self.kafka.close_now()
        watcher.cancel()
        if self.grpc is not None:
            await self.grpc.stop(grace=1.0)
        if self.http is not None:
            self.http.should_exit = True
            await asyncio.gather(*self._servers, return_exceptions=True)
        if self.publisher is not None:
            await self.publisher.close()
        if self.refresher is not None:
            await self.refresher.stop()
        if self._redis is not None:
            await self._redis.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.kafka is not None and self.kafka.tracing.enabled:
            # the last spans: after the Kafka work (not counted against its grace, where a collector
            # that is away would turn a clean stop into exit 1) and on both paths; off the loop, bounded
            await self.kafka.tracing.stop(min(SHUTDOWN_TIMEOUT_S, max(0.5, grace - (time.monotonic() - started))))
        log.info("gateway stopped in %.2fs", time.monotonic() - started)
        return code


async def _main(config: Config) -> int:
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stopping.set)
    await gateway.start()
    # everything made while starting (modules, models, clients) lives as long as the process: keep
    # it out of the cyclic collector, so its full passes (which stall the loop, a tail-latency
    # source) only walk what requests allocate
    gc.collect()
    gc.freeze()
    return await gateway.run()


def run_gateway(config: Config, log_level: str | None = None, json_logs: bool | None = None) -> int:
    """`banditgate serve`: run until SIGTERM/SIGINT; return the exit code."""
    setup_logging(log_level or config.logging.level, config.logging.json_format if json_logs is None else json_logs)
    return uvloop.run(_main(config))
