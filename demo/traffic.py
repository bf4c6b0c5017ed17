"""The simulated product service: requests to Kafka, predictions back, outcomes after a delay.

Requests carry held-out rows sampled with replacement (shifted once the scenario says so). The
service reads every prediction and shadow prediction from the beginning of the run's topics
(`read_committed`), keeps the first per request_id and counts the rest as duplicates (the
gateway is at-least-once), and for each first prediction schedules an outcome after an
exponential delay: `reward` 1 when the served arm's label equals the true label, else 0, and
the true `label`, which scores the shadow too. It also reads the alerts and dead-letter topics.

Every count is exact: a request or outcome counts as sent once Kafka acknowledged it.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from demo.deployment import PARTITIONS, DemoError, Plan
from demo.models import INPUT_NAME, ROUTE, Dataset
from demo.scenario import Scenario
from demo.telemetry import Telemetry

TICK_S = 0.01


class ProductService:
    """Plays the product side of the loop against the run's topics. Use start() / stop()."""

    def __init__(self, plan: Plan, scenario: Scenario, dataset: Dataset, telemetry: Telemetry) -> None:
        self.plan = plan
        self.scenario = scenario
        self.dataset = dataset
        self.telemetry = telemetry
        self.rng = np.random.default_rng(scenario.seed + 1)
        # exact float32 values as JSON doubles: the gateway's float32 cast gives back the same bits
        self._rows_clean = dataset.x_pool.astype(np.float64).tolist()
        self._rows_shifted = scenario.shifted(dataset.x_pool, dataset.feature_names).astype(np.float64).tolist()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._due: list[tuple[float, int, str, str, float, int]] = []
        self._sequence = 0
        self._pending_sends: set[asyncio.Future[object]] = set()
        self.failure: BaseException | None = None
        self.sending_done = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the producer and the reader (assigned every partition, from the start)."""
        try:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.plan.kafka,
                                              client_id=f"demo-{self.plan.run_id}-service",
                                              enable_idempotence=True, acks="all", linger_ms=5)
            await self._producer.start()
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.plan.kafka, group_id=None,
                                              client_id=f"demo-{self.plan.run_id}-reader", enable_auto_commit=False,
                                              auto_offset_reset="earliest", isolation_level="read_committed")
            await self._consumer.start()
        except KafkaError as exc:
            raise DemoError(f"the simulated product service cannot reach Kafka at {self.plan.kafka}: {exc}") from None
        topics = self.plan.topics
        watched = [topics.predictions, topics.shadow_predictions, topics.alerts, topics.deadletter]
        partitions = [TopicPartition(topic, p) for topic in watched for p in range(PARTITIONS)]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(), name="demo-read"),
                       loop.create_task(self._send_outcomes(), name="demo-outcomes")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    def check(self) -> None:
        """Raise DemoError if a background task failed."""
        if self.failure is not None:
            raise DemoError(f"the simulated product service failed: {type(self.failure).__name__}: {self.failure}")
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                raise DemoError(f"the simulated product service failed: {type(exc).__name__}: {exc}")

    # -- requests ----------------------------------------------------------------------------
    async def _send_request(self, warmup: bool) -> None:
        assert self._producer is not None  # noqa: S101 - start() ran
        t = self.telemetry.now_s()
        shifted = not warmup and t >= self.scenario.drift_at_s
        row = int(self.rng.integers(len(self._rows_clean)))
        self._sequence += 1
        request_id = f"{self.plan.run_id}-{'w' if warmup else 'r'}{self._sequence:06d}"
        value = orjson.dumps({"request_id": request_id, "route": ROUTE,
                              "inputs": {INPUT_NAME: (self._rows_shifted if shifted else self._rows_clean)[row]},
                              "ts": time.time()})
        self.telemetry.record_sent(request_id, row, shifted, int(self.dataset.y_pool[row]), warmup)
        future = await self._producer.send(self.plan.topics.requests, key=request_id.encode(), value=value)
        self._track(future)

    def _track(self, future: asyncio.Future[object]) -> None:
        self._pending_sends.add(future)

        def done(f: asyncio.Future[object]) -> None:
            self._pending_sends.discard(f)
            if not f.cancelled() and f.exception() is not None and self.failure is None:
                self.failure = f.exception()

        future.add_done_callback(done)

    async def warm_up(self, count: int) -> None:
        """Send `count` clean requests before the scenario clock starts (so every model serves a
        batch and the gateway builds its drift monitors before the timed part)."""
        for _ in range(count):
            await self._send_request(warmup=True)
        await self._producer.flush()  # type: ignore[union-attr]

    async def run_scenario(self, at_times: list[tuple[float, Callable[[], Awaitable[None]]]],
                           tick: Callable[[], None] | None = None) -> None:
        """Send requests at the scenario's rate until its end; run each (time, action) once when
        the scenario clock passes its time. `tick` is called every loop (raise there to abort)."""
        self.telemetry.start()
        pending = sorted(at_times, key=lambda item: item[0])
        sent = 0
        total = self.scenario.total_requests
        while sent < total:
            t = self.telemetry.now_s()
            while pending and t >= pending[0][0]:
                _, action = pending.pop(0)
                await action()
            due = min(total, int(t * self.scenario.rate_rps) + 1)
            while sent < due:
                await self._send_request(warmup=False)
                sent += 1
            self.check()
            if tick is not None:
                tick()
            await asyncio.sleep(TICK_S)
        for _, action in pending:
            await action()
        await self._producer.flush()  # type: ignore[union-attr]
        self.sending_done = True

    # -- predictions, alerts, dead letters ----------------------------------------------------
    async def _read(self) -> None:
        assert self._consumer is not None  # noqa: S101
        try:
            while True:
                batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
                for tp, records in batch.items():
                    for record in records:
                        self._on_record(tp.topic, record.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - surfaced by check() as one line
            self.failure = exc
            raise

    def _on_record(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        event = orjson.loads(value)
        plan_topics = self.plan.topics
        if topic == plan_topics.predictions:
            record = self.telemetry.record_prediction(event, shadow=False)
            if record is not None:
                request_id = event["request_id"]
                truth = self.telemetry.requests[request_id].label
                reward = 1.0 if record.label == truth else 0.0
                due = self.telemetry.now_s() + float(self.rng.exponential(self.scenario.outcome_delay_mean_s))
                self.telemetry.outcomes_scheduled += 1
                heapq.heappush(self._due, (due, self.telemetry.outcomes_scheduled, request_id, record.arm, reward, truth))
        elif topic == plan_topics.shadow_predictions:
            self.telemetry.record_prediction(event, shadow=True)
        elif topic == plan_topics.alerts:
            self.telemetry.record_alert(event)
        elif topic == plan_topics.deadletter:
            self.telemetry.record_deadletter(event)

    # -- outcomes ----------------------------------------------------------------------------
    async def _send_outcomes(self) -> None:
        assert self._producer is not None  # noqa: S101
        topic = self.plan.topics.outcomes
        try:
            while True:
                now = self.telemetry.now_s()
                batch = []
                while self._due and self._due[0][0] <= now:
                    batch.append(heapq.heappop(self._due))
                if batch:
                    futures = []
                    for _, _, request_id, _, reward, label in batch:
                        value = orjson.dumps({"request_id": request_id, "reward": reward, "label": label,
                                              "ts": time.time()})
                        futures.append(await self._producer.send(topic, key=request_id.encode(), value=value))
                    await asyncio.gather(*futures)
                    for _, _, request_id, arm, reward, _ in batch:
                        self.telemetry.record_outcome(request_id, arm, reward)
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - surfaced by check() as one line
            self.failure = exc
            raise

    # -- the end -----------------------------------------------------------------------------
    @property
    def outcomes_waiting(self) -> int:
        return len(self._due)

    async def drain(self, timeout_s: float, tick: Callable[[], None] | None = None) -> bool:
        """Wait until every request has its prediction and every outcome went out (or the
        timeout). Returns True when nothing is missing."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            if tick is not None:
                tick()
            answered = len(self.telemetry.predictions) >= self.telemetry.sent
            if answered and not self._due and not self._pending_sends \
                    and self.telemetry.outcomes_sent == self.telemetry.outcomes_scheduled:
                return True
            await asyncio.sleep(0.1)
        return False
