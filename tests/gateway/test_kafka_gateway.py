"""The gateway against the real broker: answers, dead-letters, hot swaps, corrupt models."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from loadtests.models import build_mlp
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic, request_event

pytestmark = pytest.mark.stack


def good_rows(n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.0, 5.0, size=(n, N_FEATURES)).round(4)
    return rows.tolist()


def malformed_events(n: int) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, expected reason) for every kind of bad input, cycled to n events."""
    row = [1.0] * N_FEATURES
    kinds: list[tuple[bytes | None, str]] = [
        (b"{not json", "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (orjson.dumps({"route": "fixed-route", "inputs": {"input": row}}), "missing_field"),
        (orjson.dumps({"request_id": 17, "route": "fixed-route", "inputs": {"input": row}}), "wrong_type"),
        (orjson.dumps({"request_id": "bad-unknown-route", "route": "nope", "inputs": {"input": row}}), "unknown_route"),
        (b'{"request_id": "bad-inf", "route": "fixed-route", "inputs": {"input": [1e999]}}', "not_finite"),
        (orjson.dumps({"request_id": "bad-deep", "route": "fixed-route", "inputs": {"input": [[[[[[1]]]]]]}}), "too_deep"),
        (orjson.dumps({"request_id": "bad-shape", "route": "fixed-route", "inputs": {"input": [1.0, 2.0]}}), "bad_input"),
        (orjson.dumps({"request_id": "bad-name", "route": "fixed-route", "inputs": {"pixels": row}}), "bad_input"),
        (orjson.dumps({"request_id": "bad-type", "route": "fixed-route",
                       "inputs": {"input": ["a"] * N_FEATURES}}), "wrong_type"),
        (orjson.dumps({"request_id": "bad-huge", "route": "fixed-route", "inputs": {"input": row},
                       "pad": "x" * 1_100_000}), "oversize"),
        (None, "not_json"),  # a tombstone
    ]
    out = []
    for i in range(n):
        value, reason = kinds[i % len(kinds)]
        out.append((f"bad-{i}".encode(), value, reason))
    return out


async def test_ten_thousand_requests_answered_exactly_once(stack, topics, running_gateway) -> None:
    rows = good_rows(10_000)
    routes = ["fixed-route", "bandit-route"]
    events = [(f"req-{i}".encode(), request_event(f"req-{i}", routes[i % 2], rows[i])) for i in range(10_000)]
    await produce(stack.kafka, topics.topics.requests, events)
    predictions = await read_topic(stack.kafka, topics.topics.predictions, 10_000, timeout_s=90)
    ids = Counter(p["request_id"] for p in predictions)
    assert len(predictions) == 10_000 and len(ids) == 10_000 and max(ids.values()) == 1
    for p in predictions:
        if p["route"] == "fixed-route":
            assert (p["arm"], p["model"]) in {("a", "m-a"), ("b", "m-b")}
            assert p["propensity"] == pytest.approx(0.75 if p["arm"] == "a" else 0.25)
        else:
            assert p["arm"] in {"x", "y"} and 0.0 < p["propensity"] <= 1.0
        assert p["model_version"] == 1 and p["policy"] in ("fixed", "thompson")
        assert 0 <= p["outputs"]["probability"][0] <= 1 and p["latency_ms"] >= 0
        assert p["ts_predicted"] >= p["ts_request"] - 5
    shares = Counter(p["arm"] for p in predictions if p["route"] == "fixed-route")
    assert abs(shares["a"] / 5000 - 0.75) < 0.03  # binomial sd 0.006: 5 sd
    shadows = await read_topic(stack.kafka, topics.topics.shadow_predictions, 5000, timeout_s=30)
    assert {s["request_id"] for s in shadows} == {f"req-{i}" for i in range(0, 10_000, 2)}
    assert all(s["shadow"] is True and s["arm"] == "c" and s["primary_arm"] in ("a", "b") for s in shadows)


async def test_malformed_events_are_dead_lettered_and_good_ones_answered(stack, topics, running_gateway) -> None:
    rows = good_rows(2000, seed=1)
    bad = malformed_events(1000)
    good = [(f"g-{i}".encode(), request_event(f"g-{i}", "fixed-route", rows[i])) for i in range(2000)]
    mixed: list[tuple[bytes | None, bytes]] = []
    for i in range(2000):
        mixed.append(good[i])
        if i % 2 == 0:
            key, value, _reason = bad[i // 2]
            mixed.append((key, value))  # type: ignore[arg-type]
    await produce(stack.kafka, topics.topics.requests, mixed)
    predictions = await read_topic(stack.kafka, topics.topics.predictions, 2000, timeout_s=60)
    assert sorted(p["request_id"] for p in predictions) == sorted(f"g-{i}" for i in range(2000))
    dead = await read_topic(stack.kafka, topics.topics.deadletter, 1000, timeout_s=60)
    assert len(dead) == 1000
    assert Counter(d["reason"] for d in dead) == Counter(reason for _k, _v, reason in bad)
    assert all(d["error"] and d["topic"] == topics.topics.requests and d["offset"] >= 0 for d in dead)
    assert not running_gateway.task.done()


async def test_out_of_range_rows_never_scored(stack, topics, repository, redis_prefix) -> None:
    config = gateway_config(stack, topics, repository, redis_prefix, routes=[
        {"name": "houses", "policy": "fixed", "arms": [{"name": "a", "model": "m-a", "version": 1}]}])
    running = await start_gateway(config)
    try:
        negative = [-8.0] + [1.0] * (N_FEATURES - 1)
        await produce(stack.kafka, topics.topics.requests,
                      [(b"h1", request_event("h1", "houses", negative)),
                       (b"h2", request_event("h2", "houses", [3.0] * N_FEATURES))])
        dead = await read_topic(stack.kafka, topics.topics.deadletter, 1, timeout_s=30)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 1, timeout_s=30)
    finally:
        assert await running.stop() == 0
    assert [p["request_id"] for p in predictions] == ["h2"]
    assert len(dead) == 1 and dead[0]["reason"] == "out_of_range"
    assert "bedrooms = -8 is outside the model's range [0, 20]" in dead[0]["error"]


async def test_hot_swap_under_load_loses_nothing(stack, topics, running_gateway, repository: Path) -> None:
    rows = good_rows(6000, seed=2)
    first = [(f"s-{i}".encode(), request_event(f"s-{i}", "fixed-route", rows[i])) for i in range(3000)]
    second = [(f"s-{i}".encode(), request_event(f"s-{i}", "fixed-route", rows[i])) for i in range(3000, 6000)]
    producer_task = asyncio.create_task(produce(stack.kafka, topics.topics.requests, first))
    # a new version of the shadow's model (version: latest) and a replaced file for a pinned version
    build_mlp(repository / "m-c" / "2" / "model.onnx", n_features=N_FEATURES, seed=99)
    tmp = repository / "m-a" / "1" / "model.onnx.tmp"
    build_mlp(tmp, n_features=N_FEATURES, seed=42)
    os.replace(tmp, repository / "m-a" / "1" / "model.onnx")
    await producer_task
    await asyncio.sleep(1.0)  # the repository is polled every 0.2 s
    await produce(stack.kafka, topics.topics.requests, second)
    predictions = await read_topic(stack.kafka, topics.topics.predictions, 6000, timeout_s=90)
    assert {p["request_id"] for p in predictions} == {f"s-{i}" for i in range(6000)}
    dead = await read_topic(stack.kafka, topics.topics.deadletter, 0, timeout_s=2, settle_s=0.5)
    assert dead == []
    shadows = await read_topic(stack.kafka, topics.topics.shadow_predictions, 6000, timeout_s=60)
    late_versions = {s["model_version"] for s in shadows if int(s["request_id"][2:]) >= 3000}
    assert late_versions == {2}


async def test_corrupt_model_file_keeps_old_version_serving(stack, topics, running_gateway, repository: Path) -> None:
    gateway = running_gateway.gateway
    (repository / "m-b" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    await asyncio.sleep(1.0)
    errors = gateway.repository.errors()
    assert "m-b:1" in errors and "ONNX Runtime cannot load it" in errors["m-b:1"]
    assert "\n" not in errors["m-b:1"]
    rows = good_rows(400, seed=3)
    await produce(stack.kafka, topics.topics.requests,
                  [(f"c-{i}".encode(), request_event(f"c-{i}", "fixed-route", rows[i])) for i in range(400)])
    predictions = await read_topic(stack.kafka, topics.topics.predictions, 400, timeout_s=60)
    assert {p["request_id"] for p in predictions} == {f"c-{i}" for i in range(400)}
    assert any(p["arm"] == "b" for p in predictions)  # still served by the previously loaded m-b:1


async def test_poison_rows_are_isolated(stack, topics, tmp_path: Path, redis_prefix) -> None:
    repo = tmp_path / "poison"
    build_mlp(repo / "p" / "1" / "model.onnx", n_features=N_FEATURES, fail_on_negative_first=True)
    config = gateway_config(stack, topics, repo, redis_prefix,
                            routes=[{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "p", "version": 1}]}],
                            batching={"max_batch_size": 256, "max_delay_us": 20000})
    running = await start_gateway(config)
    try:
        events = []
        for i in range(300):
            row = [1.0] * N_FEATURES
            if i % 50 == 7:
                row[0] = -1.0  # poison: the model's graph fails on any batch holding this row
            events.append((f"p-{i}".encode(), request_event(f"p-{i}", "r", row)))
        await produce(stack.kafka, topics.topics.requests, events)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 294, timeout_s=60)
        dead = await read_topic(stack.kafka, topics.topics.deadletter, 6, timeout_s=30)
    finally:
        assert await running.stop() == 0
    poisoned = {f"p-{i}" for i in range(300) if i % 50 == 7}
    assert {p["request_id"] for p in predictions} == {f"p-{i}" for i in range(300)} - poisoned
    assert {orjson.loads(d["payload"])["request_id"] for d in dead} == poisoned
    assert all(d["reason"] == "inference_failed" and "Reshape" in d["error"] for d in dead)


def test_missing_model_fails_start_with_one_line(tmp_path: Path) -> None:
    from gateway.errors import ModelError
    from gateway.models.repository import ModelRepository
    from banditgate.config import ModelsConfig

    repo = ModelRepository(tmp_path, ModelsConfig(), [("ghost", 1)])
    with pytest.raises(ModelError) as info:
        repo.load_all()
    assert "ghost" in str(info.value) and "\n" not in str(info.value)
    shutil.rmtree(tmp_path, ignore_errors=True)


async def test_exactly_once_mode_read_committed_sees_each_request_once(stack, topics, repository, redis_prefix) -> None:
    config = gateway_config(stack, topics, repository, redis_prefix, delivery="exactly_once")
    running = await start_gateway(config)
    try:
        rows = good_rows(3000, seed=5)
        await produce(stack.kafka, topics.topics.requests,
                      [(f"e-{i}".encode(), request_event(f"e-{i}", "fixed-route", rows[i])) for i in range(3000)])
        await produce(stack.kafka, topics.topics.requests, [(b"bad", b"{broken")])
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 3000, timeout_s=90)
        dead = await read_topic(stack.kafka, topics.topics.deadletter, 1, timeout_s=30)
    finally:
        assert await running.stop() == 0
    assert sorted(p["request_id"] for p in predictions) == sorted(f"e-{i}" for i in range(3000))
    assert len(dead) == 1 and dead[0]["reason"] == "not_json"
    # the offsets were committed inside the transactions: a new group member would start at the end
    assert await _committed_total(stack.kafka, config.kafka.group_id, topics.topics.requests) == 3001


async def _committed_total(bootstrap: str, group: str, topic: str, partitions: int = 4) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        total = 0
        for partition in range(partitions):
            total += (await consumer.committed(TopicPartition(topic, partition))) or 0
        return total
    finally:
        await consumer.stop()


async def test_paced_commits_catch_up_while_running_and_at_stop(stack, topics, repository, redis_prefix) -> None:
    """`kafka.commit_interval_ms` spaces commits out; it never leaves delivered work uncommitted:
    the newest offsets are committed within about one interval while the gateway runs, and a
    graceful stop commits at once instead of waiting out the interval."""
    config = gateway_config(stack, topics, repository, redis_prefix,
                            kafka={"bootstrap_servers": stack.kafka, "group_id": f"gw-{topics.prefix}",
                                   "topics": topics.topics.model_dump(), "commit_interval_ms": 3000})
    running = await start_gateway(config)
    group, requests = config.kafka.group_id, topics.topics.requests
    try:
        rows = good_rows(1200, seed=11)
        for burst in range(3):  # several fetches, each completing inside the interval of the last
            await produce(stack.kafka, requests, [(f"p-{burst}-{i}".encode(),
                                                   request_event(f"p-{burst}-{i}", "fixed-route", rows[burst * 400 + i]))
                                                  for i in range(400)])
            await asyncio.sleep(0.1)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 1200, timeout_s=60)
        assert len({p["request_id"] for p in predictions}) == 1200
        deadline = asyncio.get_running_loop().time() + 8.0
        committed = 0
        while asyncio.get_running_loop().time() < deadline:
            committed = await _committed_total(stack.kafka, group, requests)
            if committed == 1200:
                break
            await asyncio.sleep(0.1)
        assert committed == 1200, f"only {committed} of 1200 committed 8 s after the last answer"
        # work that arrives just before a stop is committed by the stop, not lost to the interval
        await produce(stack.kafka, requests, [(b"p-last", request_event("p-last", "fixed-route", rows[0]))])
        await read_topic(stack.kafka, topics.topics.predictions, 1201, timeout_s=30, settle_s=0)
    finally:
        assert await running.stop() == 0
    assert await _committed_total(stack.kafka, group, requests) == 1201
