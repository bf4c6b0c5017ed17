"""Assembles the serving process: model repository, dataplane, Kafka loop, metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop
from prometheus_client import start_http_server

from banditgate.config import Config
from banditgate.logs import setup_logging
from gateway.dataplane import Dataplane
from gateway.errors import ModelError
from gateway.metrics import GatewayMetrics
from gateway.models.repository import ModelRepository
from gateway.transport.kafka_loop import KafkaLoop

log = logging.getLogger("banditgate.gateway")


def wanted_models(config: Config) -> list[tuple[str, int | str]]:
    return [(arm.model, arm.version) for route in config.routes for arm in (*route.arms, *route.shadows)]


class Gateway:
    """The running gateway; `run()` returns when a stop was requested and shutdown finished."""

    def __init__(self, config: Config, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.repository = ModelRepository(config.models.repository, config.models, wanted_models(config))
        self.executor = ThreadPoolExecutor(max_workers=config.batching.inference_threads,
                                           thread_name_prefix="onnx")
        self.dataplane: Dataplane | None = None
        self.kafka: KafkaLoop | None = None
        self.stopping = asyncio.Event()
        self.ready = False

    def _on_batch(self, model, rows: int, queue_s: float, inference_s: float) -> None:  # type: ignore[no-untyped-def]
        self.metrics.observe_batch(model.name, model.version, rows, queue_s, inference_s)

    async def start(self) -> None:
        events = await asyncio.to_thread(self.repository.load_all)
        for model in self.repository.loaded():
            self.metrics.model_loaded.labels(model.name, str(model.version)).set(1)
        del events
        self.dataplane = Dataplane(self.config, self.repository, self.executor, on_batch=self._on_batch)
        self.kafka = KafkaLoop(self.config, self.dataplane, self.metrics)
        await self.kafka.start()
        self._banner()
        self.ready = True
        self.metrics.ready.set(1)

    def _banner(self) -> None:
        for route in self.config.routes:
            arms = ", ".join(f"{a.name}={a.model}:{self.repository.resolve(a.model, a.version)}" for a in route.arms)
            shadows = ", ".join(f"{s.name}={s.model}:{self.repository.resolve(s.model, s.version)}"
                                for s in route.shadows)
            log.info("route %s: policy %s, arms %s%s", route.name, route.policy, arms,
                     f", shadows {shadows}" if shadows else "")
        providers = sorted({p for m in self.repository.loaded() for p in m.providers})
        log.info("serving: kafka %s (requests %s, delivery %s), providers %s, batching %d rows / %d us, "
                 "metrics on %s:%d", self.config.kafka.bootstrap_servers, self.config.kafka.topics.requests,
                 self.config.delivery, ", ".join(providers), self.config.batching.max_batch_size,
                 self.config.batching.max_delay_us, self.config.server.host, self._metrics_port())

    def _metrics_port(self) -> int:
        return self.config.server.metrics_port or self.config.server.http_port

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

    async def run(self) -> int:
        assert self.kafka is not None  # noqa: S101 - start() first
        watcher = asyncio.get_running_loop().create_task(self._watch_models())
        loop_task = asyncio.get_running_loop().create_task(self.kafka.run(self.stopping))
        stop_wait = asyncio.get_running_loop().create_task(self.stopping.wait())
        done, _ = await asyncio.wait({loop_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if loop_task in done and loop_task.exception() is not None:
            log.error("the Kafka loop stopped: %s", loop_task.exception())
            self.stopping.set()
        return await self.shutdown(loop_task, watcher)

    async def shutdown(self, loop_task: asyncio.Task, watcher: asyncio.Task) -> int:
        """Readiness off first, then finish in-flight batches, publish, commit, close."""
        self.ready = False
        self.metrics.ready.set(0)
        started = time.monotonic()
        grace = self.config.shutdown_grace_s
        code = 0
        try:
            await asyncio.wait_for(asyncio.gather(loop_task, return_exceptions=True), timeout=grace)
            remaining = max(0.1, grace - (time.monotonic() - started))
            assert self.kafka is not None  # noqa: S101
            await asyncio.wait_for(self.kafka.stop(), timeout=remaining)
        except TimeoutError:
            log.error("shutdown took longer than the %.1fs grace period; exiting with work unfinished "
                      "(it will be served again from the last committed offsets)", grace)
            code = 1
        watcher.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("gateway stopped in %.2fs", time.monotonic() - started)
        return code


async def _main(config: Config) -> int:
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stopping.set)
    start_http_server(gateway._metrics_port(), addr=config.server.host)
    try:
        await gateway.start()
    except ModelError:
        raise
    return await gateway.run()


def run_gateway(config: Config, log_level: str | None = None, json_logs: bool | None = None) -> int:
    """`banditgate serve`: run until SIGTERM/SIGINT; return the exit code."""
    setup_logging(log_level or config.logging.level, config.logging.json_format if json_logs is None else json_logs)
    return uvloop.run(_main(config))
