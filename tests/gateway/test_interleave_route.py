"""Interleave routes end to end in the gateway: ranking requests in, merged lists with teams out."""

from __future__ import annotations

from collections import Counter

import numpy as np
import orjson
import pytest

from tests.gateway.support import N_FEATURES, gateway_config, start_gateway
from tests.kafka_helpers import produce, read_topic

pytestmark = pytest.mark.stack


def ranking_request(request_id: str, items: list[str], rows: list[list[float]]) -> bytes:
    return orjson.dumps({"request_id": request_id, "route": "search", "items": items, "inputs": {"input": rows}})


async def test_ranking_requests_get_interleaved_lists(stack, topics, repository, redis_prefix) -> None:
    config = gateway_config(stack, topics, repository, redis_prefix, routes=[
        {"name": "search", "policy": "interleave", "method": "team_draft", "k": 5,
         "arms": [{"name": "x", "model": "m-b", "version": 1}, {"name": "y", "model": "m-c", "version": 1}]}])
    running = await start_gateway(config)
    rng = np.random.default_rng(3)
    try:
        events = []
        for i in range(200):
            n = 12 if i % 10 else 3  # some requests have fewer candidates than k
            items = [f"item-{i}-{j}" for j in range(n)]
            events.append((f"q-{i}".encode(), ranking_request(f"q-{i}", items, rng.uniform(0, 3, (n, N_FEATURES)).tolist())))
        events.append((b"bad", ranking_request("bad", ["a", "b"], [[1.0] * N_FEATURES])))  # rows != items
        await produce(stack.kafka, topics.topics.requests, events)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, 200, timeout_s=60)
        dead = await read_topic(stack.kafka, topics.topics.deadletter, 1, timeout_s=30)
    finally:
        assert await running.stop() == 0
    assert sorted(p["request_id"] for p in predictions) == sorted(f"q-{i}" for i in range(200))
    for p in predictions:
        shown, teams, own = p["outputs"]["items"], p["outputs"]["teams"], p["outputs"]["rankings"]
        i = int(p["request_id"][2:])
        candidates = {f"item-{i}-{j}" for j in range(12 if i % 10 else 3)}
        assert len(shown) == min(5, len(candidates)) and len(set(shown)) == len(shown) and set(shown) <= candidates
        assert set(teams) <= {"x", "y"} and len(teams) == len(shown)
        counts = Counter(teams)
        assert abs(counts["x"] - counts["y"]) <= 1
        assert set(own) == {"x", "y"} and all(len(r) == len(shown) for r in own.values())
        assert p["policy"] == "interleave" and p["rankers"]["x"] == {"model": "m-b", "model_version": 1}
    assert len(dead) == 1 and "one row per item" in dead[0]["error"]
