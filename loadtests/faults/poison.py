"""Poison values mixed with good traffic, over HTTP and over Kafka, on a gaussian route.

A gaussian route takes any reward, so nothing but the events contract's bounds
(banditgate.events.MAX_MAGNITUDE, MAX_CLICKS, NAME_PATTERN) stands between a reward of 1e200 and
the ledger, where its square overflowed to inf (before: the ledger script failed half-way and the
feedback worker stopped, again on every restart). Every answered request gets one outcome:

* most a good one, over Kafka (or over ``POST /v2/outcomes``, which must answer 200);
* some a poison one instead: over Kafka (dead-lettered: not_finite / out_of_range / not_json) or
  over HTTP (refused with 400, never published): rewards and labels of 1e200, ``1e400`` /
  ``-1e400`` / ``NaN`` written as raw JSON, an integer past 2^64, 5 000 clicks.

Besides, predictions naming an arm or model that is not a name (``a:b``, ``a|b``, 200 characters,
``fault-a:1``) go straight onto the predictions topic (a producer that is not our gateway), each
with a good outcome: dead-lettered (bad_id), never counted.

The expected statistics are tallied here from what was sent and answered, independently of
the processes; Redis must equal them exactly, hold only finite numbers, and the feedback worker
must stay up throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from collections import Counter
from typing import Any

import orjson
import redis.asyncio as aredis
from aiokafka import AIOKafkaProducer

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import ARMS, ROUTE, FeedbackProc, feedback_config, route_config
from loadtests.faults.outages import OutcomeResponder, arm_statistics
from loadtests.faults.readback import Rec, delivery
from loadtests.faults.traffic import SteadyLoad, http_post

TAG = "poison"
POISON_EVERY = 8
"""One answered request in POISON_EVERY gets a poison outcome instead of a good one."""
HTTP_EVERY = 7
"""Of the rest, one in HTTP_EVERY gets its good outcome over POST /v2/outcomes."""


def _raw(request_id: str, body: str) -> bytes:
    return ('{"request_id": "' + request_id + '", ' + body + "}").encode()


POISON_KAFKA = {
    "reward_1e200": lambda rid: orjson.dumps({"request_id": rid, "reward": 1e200, "ts": time.time()}),
    "label_1e200": lambda rid: orjson.dumps({"request_id": rid, "label": 1e200, "ts": time.time()}),
    "reward_1e400": lambda rid: _raw(rid, '"reward": 1e400'),
    "reward_minus_1e400": lambda rid: _raw(rid, '"reward": -1e400, "label": 1'),
    "reward_nan": lambda rid: _raw(rid, '"reward": NaN'),
    "reward_past_2_64": lambda rid: _raw(rid, '"reward": 18446744073709551615'),
    "clicks_5000": lambda rid: orjson.dumps({"request_id": rid, "reward": 1.0, "clicks": [f"item-{k}" for k in range(5000)]}),
}
"""Outcome values the feedback worker must dead-letter (by kind)."""

POISON_HTTP = {
    "reward_1e200": lambda rid: orjson.dumps({"request_id": rid, "reward": 1e200}),
    "label_1e200": lambda rid: orjson.dumps({"request_id": rid, "label": -1e200}),
    "reward_1e400": lambda rid: _raw(rid, '"reward": 1e400'),
    "reward_nan": lambda rid: _raw(rid, '"reward": NaN'),
    "clicks_5000": lambda rid: orjson.dumps({"request_id": rid, "reward": 1.0, "clicks": ["i"] * 5000}),
    "one_bad_in_a_list": lambda rid: orjson.dumps([{"request_id": rid, "reward": 2.0},
                                                   {"request_id": rid, "reward": 1e300}]),
}
"""``POST /v2/outcomes`` bodies the gateway must refuse with 400 (by kind)."""

BAD_NAMES = [("a:b", None), ("a|b", None), ("x" * 200, None), (None, "fault-a:1"), ("-a", None)]
"""(arm, model) of predictions whose arm or model is not a name (None: the real one)."""


def good_outcome(request_id: str) -> tuple[float, int]:
    """A fixed gaussian reward and label per request (so the expected statistics are exact)."""
    crc = zlib.crc32(request_id.encode())
    return ((crc % 4001) - 2000) / 16.0, crc % 2


def fate(request_id: str) -> str:
    """What this request's outcome is: ``kafka`` / ``http`` (good), ``poison_kafka:<kind>`` or
    ``poison_http:<kind>``."""
    index = int(request_id.rsplit("-", 1)[1])
    if index % POISON_EVERY == POISON_EVERY - 1:
        round_ = index // POISON_EVERY
        if round_ % 2 == 0:
            kinds = sorted(POISON_KAFKA)
            return f"poison_kafka:{kinds[(round_ // 2) % len(kinds)]}"
        kinds = sorted(POISON_HTTP)
        return f"poison_http:{kinds[(round_ // 2) % len(kinds)]}"
    return "http" if index % HTTP_EVERY == 0 else "kafka"


class PoisonResponder(OutcomeResponder):
    """Answers each new prediction of the load (tag `poison`) with its outcome as `fate` says:
    over Kafka, or over HTTP with the status tallied; keeps the first prediction per request
    (OutcomeResponder) for the expectations."""

    def __init__(self, bootstrap: str, topic: str, http_port: int) -> None:
        super().__init__(bootstrap, topic)
        self.http_port = http_port
        self.statuses: Counter[tuple[str, int]] = Counter()  # (good / poison, status)
        self.http_failed: list[str] = []
        self.good_http: set[str] = set()
        self.poison_kafka: dict[str, str] = {}  # request id -> kind
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def on_predictions(self, records: list[Rec]) -> None:
        super().on_predictions([rec for rec in records if rec.key.startswith(f"{TAG}-")])

    async def _post(self, body: bytes) -> int | None:
        for _attempt in range(2):
            try:
                if self._conn is None:
                    self._conn = await asyncio.open_connection("127.0.0.1", self.http_port)
                status, headers, _ = await http_post(self._conn[0], self._conn[1], "/v2/outcomes", body)
                if headers.get("connection", "").lower() == "close":
                    self._close()
                return status
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                self._close()
        return None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def _run(self) -> None:
        assert self._producer is not None  # noqa: S101
        while not self._closing or self._queue:
            batch, self._queue = self._queue, []
            futures = []
            for request_id in batch:
                way = fate(request_id)
                reward, label = good_outcome(request_id)
                if way == "kafka":
                    value = orjson.dumps({"request_id": request_id, "reward": reward, "label": label, "ts": time.time()})
                elif way.startswith("poison_kafka:"):
                    kind = way.split(":", 1)[1]
                    value = POISON_KAFKA[kind](request_id)
                    self.poison_kafka[request_id] = kind
                else:
                    good = way == "http"
                    body = orjson.dumps({"request_id": request_id, "reward": reward, "label": label}) if good \
                        else POISON_HTTP[way.split(":", 1)[1]](request_id)
                    status = await self._post(body)
                    self.statuses[("good" if good else "poison", status or 0)] += 1
                    if good and status == 200:
                        self.good_http.add(request_id)
                        self.produced_at[request_id] = time.time()
                    elif good:
                        self.http_failed.append(request_id)
                    continue
                futures.append(await self._producer.send(self.topic, key=request_id.encode(), value=value))
                if way == "kafka":
                    self.produced_at[request_id] = time.time()
            if futures:
                await asyncio.gather(*futures)
            await asyncio.sleep(0.05)
        self._close()

    def expected_good(self) -> dict[str, tuple[int, float, float]]:
        """Per arm: (outcomes, reward sum, reward square sum) of the good outcomes delivered."""
        out = {arm: [0, 0.0, 0.0] for arm in ARMS}
        for request_id, (_offset, arm) in self.first.items():
            if request_id in self.produced_at:  # good over Kafka, or over HTTP and accepted (200)
                reward = good_outcome(request_id)[0]
                out[arm][0] += 1
                out[arm][1] += reward
                out[arm][2] += reward * reward
        return {arm: (int(v[0]), float(v[1]), float(v[2])) for arm, v in out.items()}


def bad_predictions(now: float) -> list[tuple[str, bytes, bytes]]:
    """(topic field, key, value): predictions with an arm or model that is not a name, and a good
    outcome for each (it waits in the join for a prediction that never counts)."""
    out = []
    for index, (arm, model) in enumerate(BAD_NAMES):
        request_id = f"badname-{index}"
        real_model, version = ARMS["a"]
        prediction = {"request_id": request_id, "route": ROUTE, "arm": arm or "a", "model": model or real_model,
                      "model_version": version, "policy": "thompson", "propensity": 0.5,
                      "outputs": {"probability": [0.7], "label": 1}, "ts_request": now, "ts_predicted": now,
                      "latency_ms": 1.0}
        out.append(("predictions", request_id, orjson.dumps(prediction)))
        out.append(("outcomes", request_id, orjson.dumps({"request_id": request_id, "reward": 3.0, "ts": now})))
    return out


async def _hash_numbers(client: aredis.Redis, key: str) -> dict[str, float]:
    raw = await client.hgetall(key)
    out = {}
    for name, value in raw.items():
        try:
            out[name.decode()] = float(value)
        except ValueError:  # a text field (an arm's state): not a number, not checked
            continue
    return out


async def _watch_alive(worker: FeedbackProc, stop: asyncio.Event, downs: list[float]) -> None:
    while not stop.is_set():
        if not worker.alive():
            downs.append(time.time())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def poison_values(ctx: Context) -> dict[str, Any]:
    rate, seconds = ctx.pick((200, 8.0), (500, 30.0))
    n = int(rate * seconds)
    routes = [{**route_config(), "reward": "gaussian"}]
    scene = await GatewayScene.create(ctx, "poison_values", routes=routes)
    prefix = ctx.prefix("poison_values")
    client = aredis.Redis.from_url(ctx.redis, socket_timeout=5, socket_connect_timeout=5)
    worker = FeedbackProc("poison_values-feedback", feedback_config(
        kafka=ctx.kafka, redis=ctx.redis, topics=scene.topics, app_id=f"{prefix}-fb", redis_prefix=prefix,
        routes=routes), ctx.work)
    scene.procs.add(worker)
    stop_watch = asyncio.Event()
    downs: list[float] = []
    responder: PoisonResponder | None = None
    try:
        worker.spawn()
        (gateway,) = await scene.start_replicas(1)
        await worker.wait_ready()
        watching = asyncio.get_running_loop().create_task(_watch_alive(worker, stop_watch, downs))
        responder = PoisonResponder(ctx.kafka, scene.topics["outcomes"], gateway.http_port)
        scene.predictions.keep_values = True
        scene.predictions.on_records = responder.on_predictions
        await responder.start()
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag=TAG, n=n, rate_rps=rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        await asyncio.sleep(seconds / 3)
        producer = AIOKafkaProducer(bootstrap_servers=ctx.kafka, enable_idempotence=True, linger_ms=5)
        await producer.start()
        try:
            bad = bad_predictions(time.time())
            await asyncio.gather(*[await producer.send(scene.topics[topic], key=key.encode(), value=value)
                                   for topic, key, value in bad])
        finally:
            await producer.stop()
        await sending
        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(120, 300))
        await asyncio.sleep(0.5)
        await responder.stop()
        expected = responder.expected_good()
        expected_total = sum(count for count, _, _ in expected.values())
        dead_wanted = set(responder.poison_kafka) | {key for topic, key, _ in bad if topic == "predictions"}
        deadline = time.monotonic() + ctx.pick(90, 240)
        stats = await arm_statistics(client, prefix)
        while (stats["counter"] < expected_total or dead_wanted - scene.dead_keys()) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            stats = await arm_statistics(client, prefix)
        await asyncio.sleep(2.0)  # a double count would land now
        stats = await arm_statistics(client, prefix)
        counts = await _hash_numbers(client, f"{prefix}:{{{ROUTE}}}:fb:counts")
        quality = await _hash_numbers(client, f"{prefix}:{{{ROUTE}}}:fb:quality")
        arms_hash = await _hash_numbers(client, f"{prefix}:{{{ROUTE}}}:arms")
        stop_watch.set()
        await watching
        mismatches = []

        def compare(what: str, got: float, want: float) -> None:
            if abs(got - want) > 1e-9 * max(1.0, abs(want)):
                mismatches.append(f"{what}: {got!r}, expected {want!r}")

        compare("arm statistics counter", stats["counter"], expected_total)
        compare("joined", counts.get("joined", 0.0), expected_total)
        for arm, (count, total, squares) in expected.items():
            model, version = ARMS[arm]
            weight, reward_sum = stats["arms"][arm]
            compare(f"arm {arm} weight", weight, count)
            compare(f"arm {arm} reward sum", reward_sum, total)
            compare(f"joined|{arm}", counts.get(f"joined|{arm}", 0.0), count)
            base = f"primary|{arm}|{model}|{version}"
            compare(f"{base} n_reward", quality.get(f"{base}|n_reward", 0.0), count)
            compare(f"{base} reward_sum", quality.get(f"{base}|reward_sum", 0.0), total)
            compare(f"{base} reward_sq_sum", quality.get(f"{base}|reward_sq_sum", 0.0), squares)
        for kind in ("invalid", "duplicate", "late", "orphan"):
            compare(f"count {kind}", counts.get(kind, 0.0), 0.0)
        non_finite = [name for values in (counts, quality, arms_hash) for name, value in values.items()
                      if not math.isfinite(value)]
        dead_by_topic: dict[str, set[str]] = {}
        for rec in scene.deadletter.records:
            if rec.value is not None:
                dead_by_topic.setdefault(orjson.loads(rec.value).get("topic", ""), set()).add(rec.key)
        # a poison outcome's dead letter has its request's key: only the requests topic's dead
        # letters are requests the gateway refused
        requests_dead = dead_by_topic.get(scene.topics["requests"], set())
        result = delivery(load.order, scene.predictions.records, requests_dead)
        dead = dead_by_topic.get(scene.topics["outcomes"], set()) | dead_by_topic.get(scene.topics["predictions"], set())
        not_dead_lettered = sorted(dead_wanted - dead)
        reasons: Counter[str] = Counter()
        for rec in scene.deadletter.records:
            if rec.value is not None and rec.key in dead_wanted:
                reasons[orjson.loads(rec.value).get("reason", "?")] += 1
        poison_http = sum(count for (what, _status), count in responder.statuses.items() if what == "poison")
        rejected_http = responder.statuses.get(("poison", 400), 0)
        good_http = sum(count for (what, _status), count in responder.statuses.items() if what == "good")
        output = worker.output()
        result.update(
            outcomes=expected_total, applied=stats["counter"],
            double_counted=max(0, stats["counter"] - expected_total),
            lost=result["lost"] + max(0, expected_total - stats["counter"]) + len(not_dead_lettered),
            client_errors=len(responder.http_failed) + len(set(load.ids()) & requests_dead),
            exact=not mismatches, mismatches=mismatches[:10], non_finite_values=len(non_finite),
            poison_kafka=len(responder.poison_kafka), poison_kafka_kinds=dict(Counter(responder.poison_kafka.values())),
            bad_name_predictions=len(BAD_NAMES), dead_lettered=len(dead_wanted & dead),
            not_dead_lettered=not_dead_lettered[:10], dead_letter_reasons=dict(reasons),
            poison_http=poison_http, rejected_http=rejected_http, poison_accepted=poison_http - rejected_http,
            good_http=good_http, good_http_accepted=len(responder.good_http),
            feedback_down_samples=len(downs), feedback_fatal_log_lines=output.count("stopping after an unexpected error"),
            drain_s=round(drain_s, 2),
        )
    finally:
        stop_watch.set()
        if responder is not None and not responder._closing:
            with contextlib.suppress(Exception):
                await responder.stop()
        await client.aclose()
        await scene.close()
    result.update(crashes=scene.procs.crashes() + (1 if downs else 0), unclean_exits=scene.procs.unclean_terms())
    return result
